from pathlib import Path

import pytest

from seal_agent.errors import PolicyError
from seal_agent.policy import ParseRules, available_policies, load_active_policy, load_policy, split_items

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
SHIPPED = ["implications", "implications-long", "implications-very-long", "rewrite", "self-qa"]


def test_all_shipped_policies_load():
    assert set(SHIPPED) <= set(available_policies(POLICIES))
    for name in SHIPPED:
        p = load_active_policy(POLICIES, name)
        assert p.name == name and "{passage}" in p.base_prompt
        assert p.sampling.max_new_tokens > 0


def test_longer_policies_ask_for_more():
    sizes = [load_active_policy(POLICIES, n).sampling.max_new_tokens
             for n in ("implications", "implications-long", "implications-very-long")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_implications_split_drops_chatty_preamble_and_keeps_items():
    p = load_active_policy(POLICIES, "implications")
    completion = "Sure, here are the implications:\n1. The Shah fled.\n\n2. Otrar was seized.\n3. Silver was used."
    assert p.items(completion) == ["1. The Shah fled.", "2. Otrar was seized.", "3. Silver was used."]
    gpt = "**Implications:**\n\n1. Feuds split the army.\n2. The Mongols won."
    assert p.items(gpt) == ["1. Feuds split the army.", "2. The Mongols won."]


def test_separator_segments_then_lines():
    rules = ParseRules(mode="lines")
    assert split_items("a fact here\nanother fact\n---\nthird fact", rules) == ["a fact here", "another fact", "third fact"]
    rules = ParseRules(mode="segments")
    assert split_items("a fact here\nanother fact\n---\nthird fact", rules) == ["a fact here\nanother fact", "third fact"]


def test_examples_prefix_title_and_end_with_the_passage():
    p = load_active_policy(POLICIES, "implications")
    examples = p.examples("1. The Shah fled.\n2. Otrar fell.", "Genghis Khan", "  The passage text.  ")
    assert [e.text for e in examples] == [
        "Genghis Khan\n1. The Shah fled.", "Genghis Khan\n2. Otrar fell.", "Genghis Khan\nThe passage text."]
    assert all(e.prompt == "Genghis Khan\n" for e in examples)
    # an empty self-edit still trains on the passage
    assert [e.text for e in p.examples("", "T", "P")] == ["T\nP"]


def test_self_qa_keeps_each_pair_whole():
    p = load_active_policy(POLICIES, "self-qa")
    completion = ("Here are some questions:\nQuestion 1: Who fled?\nAnswer: The Shah\n\n"
                  "Question 2: Which town fell?\nAnswer: Otrar\n")
    assert p.items(completion) == ["Question 1: Who fled?\nAnswer: The Shah", "Question 2: Which town fell?\nAnswer: Otrar"]


def test_self_qa_base_prompt_prefix_is_restored(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p = load_active_policy(POLICIES, "self-qa")
    raw = "Who fled?\nAnswer: The Shah\nQuestion 2: Which town?\nAnswer: Otrar"
    base_text = p.completion_text(tok, raw, use_chat=False)
    assert base_text.startswith("Question 1: Who fled?")
    assert p.items(base_text)[0] == "Question 1: Who fled?\nAnswer: The Shah"
    assert p.completion_text(tok, raw, use_chat=True) == raw  # chat prompt did not say it
    assert p.prompt(tok, "T", "Body", use_chat=False).endswith("Question 1: ")
    chat = p.prompt(tok, "T", "Body", use_chat=True)
    assert "<|im_start|>user" in chat and "Body" in chat and chat.endswith("<|im_start|>assistant\n")


def _write(tmp_path, text, name="bad"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


GOOD = '''
name = "bad"
[chat]
user = "{title} {passage}"
[base]
prompt = "{passage}"
'''


@pytest.mark.parametrize("text, message", [
    ("[chat\n", "not valid TOML"),
    ('name = "bad"\n[base]\nprompt = "{passage}"\n', "missing field 'chat.user'"),
    (GOOD + "[sampling]\ntemperature = 'hot'\n", "field 'sampling.temperature' must be float"),
    (GOOD + "[sampling]\ntop_p = 2.0\n", "field 'sampling.top_p'"),
    (GOOD + "[parse]\nmode = 'words'\n", "field 'parse.mode' must be one of"),
    (GOOD + "[parse]\nqa_item_start = '(['\n", "field 'parse.qa_item_start' is not a valid regex"),
    (GOOD + "[parse]\nsequence_template = '{title}'\n", "field 'parse.sequence_template' must contain"),
    (GOOD + "[parse]\ncolour = 1\n", r"unknown field 'colour' in \[parse\]"),
    (GOOD.replace("{title} {passage}", "{title} {pasage}"), "field 'chat.user' uses unknown placeholder"),
    (GOOD.replace('prompt = "{passage}"', 'prompt = "no text"'), "field 'base.prompt' must contain"),
    (GOOD.replace('name = "bad"', 'name = "other"'), "field 'name'"),
    (GOOD + "[questions]\nmode = 'quiz'\n", "field 'questions.mode' must be one of"),
    (GOOD + "[questions]\ncloze_template = 'no blank'\n", "field 'questions.cloze_template' must contain"),
])
def test_malformed_policy_names_file_and_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError, match=message) as info:
        load_policy(path)
    assert str(path) in str(info.value)


def test_unknown_active_policy_lists_the_available_ones():
    with pytest.raises(PolicyError, match="available: .*implications"):
        load_active_policy(POLICIES, "nonexistent")


def test_ungrounded_names_and_numbers_are_detected():
    from seal_agent.policy import ungrounded_terms

    source = "European Union law\nThe Working Time Directive gives 4 weeks of paid holiday. In the early 1990s Advocate Generals argued."
    assert ungrounded_terms("1. Workers get 4 weeks under the Working Time Directive.", source) == set()
    assert ungrounded_terms("Advocate Generals argued in the 1990s.", source) == set()
    assert ungrounded_terms("2. The EU was founded by Yair Levy in 1957.", source) == {"EU", "Yair", "Levy", "1957"}
    assert ungrounded_terms("Question 3: How long? Answer: 6 weeks", source) == {"6"}


def test_grounded_only_drops_hallucinated_items(tmp_path):
    text = (POLICIES / "implications.toml").read_text().replace("drop_preamble = true", "drop_preamble = true\ngrounded_only = true")
    path = tmp_path / "implications.toml"
    path.write_text(text)
    p = load_policy(path)
    assert p.parse.grounded_only
    completion = "1. Rollo led the raiders.\n2. Rollo was born in 1850 in Paris.\n3. The raiders settled in Normandy."
    passage = "The Norse raiders, led by Rollo, settled in Normandy."
    assert p.items(completion, "Normans", passage) == ["1. Rollo led the raiders.", "3. The raiders settled in Normandy."]
    assert len(p.items(completion)) == 3  # without the passage nothing is filtered
    assert [e.completion for e in p.examples(completion, "Normans", passage)][-1] == passage
