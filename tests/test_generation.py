"""Batched generation: questions about one passage share the passage's keys and values."""

import pytest
import torch

from seal_agent.model.generation import Sampling, _shared_prefix_inputs, common_prefix, generate
from seal_agent.model.loader import load_model, load_tokenizer

PASSAGE_A = ("The Normans were descended from Norse raiders led by Rollo, who settled in Normandy in the 10th "
             "century and gave the region its name. ")
PASSAGE_B = "In 1066 William the Conqueror led the Normans to victory at the Battle of Hastings, in England. "


@pytest.fixture
def tiny(tiny_model_dir, tiny_cfg):
    return load_model(tiny_model_dir, tiny_cfg), load_tokenizer(tiny_model_dir)


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5, 6], [7]]) == 0
    assert common_prefix([[1, 2], [1, 2]]) == 2


def test_shared_prefix_answers_exactly_as_one_prompt_per_row(tiny):
    """Two passages with questions of different lengths, and a prompt alone in
    its group: the same greedy tokens as plain left-padded batches (fp32), with
    each passage's prefix computed once and laid out so every row sees only
    its own prompt."""
    model, tok = tiny
    prompts = [PASSAGE_A + q for q in ("Who led them?", "When did the Normans settle in Normandy at last?")]
    prompts += [PASSAGE_B + q for q in ("Who won?", "Where was the battle?", "What year was it, exactly?")]
    prompts += ["A lone question with no passage?"]
    groups = ["a", "a", "b", "b", "b", "c"]
    sampling = Sampling(max_new_tokens=10)
    plain = generate(model, tok, prompts, sampling, batch_size=8)
    shared = generate(model, tok, prompts, sampling, batch_size=8, groups=groups)
    assert shared == plain and any(plain)

    rows = tok(prompts, add_special_tokens=False)["input_ids"]
    enc = _shared_prefix_inputs(model, rows, groups, tok.pad_token_id, 10)
    n_a, n_b = common_prefix(rows[:2]), common_prefix(rows[2:5])
    p = max(n_a, n_b)
    assert enc["past_key_values"].get_seq_length() == p  # computed once per passage, not per row
    mask = enc["attention_mask"]
    assert mask[0, :p].sum() == n_a and mask[2, :p].sum() == n_b and mask[5, :p].sum() == 0
    assert mask.sum(dim=1).tolist() == [len(r) for r in rows]  # every row: all of its tokens, nothing else


def test_no_sharing_without_a_long_common_prefix(tiny):
    model, tok = tiny
    rows = tok(["Who led them?", "Who won?"], add_special_tokens=False)["input_ids"]
    assert _shared_prefix_inputs(model, rows, ["a", "a"], tok.pad_token_id, 10) is None
    assert _shared_prefix_inputs(model, [[1] * 40, [1] * 40], ["a", "b"], tok.pad_token_id, 10) is None


@torch.inference_mode()
def test_bf16_shared_prefix_runs_and_restores_the_weights(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [PASSAGE_A + "Who led them?", PASSAGE_A + "Where did they settle?"]
    out = generate(model, tok, prompts, Sampling(max_new_tokens=6), compute_dtype=torch.bfloat16, groups=[1, 1])
    assert len(out) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _model_tokens(model, tok, prompts: list[str], **kwargs) -> list[list[int]]:
    """`model.generate` itself, left-padded: the new tokens of each row."""
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, pad_token_id=tok.pad_token_id, **kwargs)
    finally:
        tok.padding_side = side
    return out[:, enc["input_ids"].shape[1]:].tolist()


def _texts(tok, rows: list[list[int]]) -> list[str]:
    return [tok.decode(row, skip_special_tokens=True).strip() for row in rows]


def _model_generate(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """`model.generate` greedy: what generate() must write."""
    return _texts(tok, _model_tokens(model, tok, prompts, max_new_tokens=max_new_tokens, do_sample=False))


PROMPTS = ["Who led the Normans?", "Where is Normandy, and why is it called that?", "When?",
           "In 1066 William the Conqueror led the Normans to victory. Who lost?"]


def test_greedy_writes_what_model_generate_writes(tiny):
    """generate()'s own decoding loop (cache room reserved up front, rows that
    end leaving the batch) against transformers' generate, left-padded, fp32;
    then with an end token that one row writes early: that row stops there,
    as in model.generate, and the others write on unchanged."""
    model, tok = tiny
    sampling = Sampling(max_new_tokens=12)
    assert generate(model, tok, PROMPTS, sampling, batch_size=4) == _model_generate(model, tok, PROMPTS, 12)

    end = _model_tokens(model, tok, PROMPTS, max_new_tokens=12, do_sample=False)[1][3]  # the 4th token row 1 writes
    model.generation_config.eos_token_id = end
    ours, theirs = generate(model, tok, PROMPTS, sampling, batch_size=4), _model_generate(model, tok, PROMPTS, 12)
    assert ours == theirs
    assert len(tok(ours[1], add_special_tokens=False)["input_ids"]) <= 4  # it stopped at the end token


def _model_sample(model, tok, prompts: list[str], sampling: Sampling, seed: int) -> list[list[int]]:
    """`model.generate` sampling from `seed`: the tokens each row draws."""
    torch.manual_seed(seed)
    return _model_tokens(model, tok, prompts, max_new_tokens=sampling.max_new_tokens, do_sample=True,
                         temperature=sampling.temperature, top_p=sampling.top_p)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.95), (0.7, 1.0)])
def test_sampling_draws_what_model_generate_draws(tiny, temperature, top_p):
    """generate()'s own loop samples as `model.generate` does (temperature, the
    generation config's or transformers' default top-k, top-p, one multinomial
    draw per row and step on the global generator): from the same seed, the
    same tokens while no row has left the batch; a different seed draws others."""
    model, tok = tiny
    sampling = Sampling(max_new_tokens=12, temperature=temperature, top_p=top_p)
    theirs = _model_sample(model, tok, PROMPTS, sampling, seed=3)
    eos = model.generation_config.eos_token_id
    assert all(len(row) == 12 and eos not in row for row in theirs)  # no row ended early: all draws comparable
    ours = generate(model, tok, PROMPTS, sampling, batch_size=4, seed=3)
    assert ours == _texts(tok, theirs)
    assert generate(model, tok, PROMPTS, sampling, batch_size=4, seed=4) != ours
    model.generation_config.top_k = 5  # the model's own top-k is honoured
    assert generate(model, tok, PROMPTS, sampling, batch_size=4, seed=3) == \
        _texts(tok, _model_sample(model, tok, PROMPTS, sampling, 3))


def test_sampling_with_other_filters_goes_to_model_generate(tiny):
    """A generation config that samples with a filter the own loop lacks (min-p)
    is left to `model.generate`, and its draws are model.generate's."""
    from seal_agent.model.generation import plain_sampling

    model, tok = tiny
    assert plain_sampling(model)
    model.generation_config.min_p = 0.2
    assert not plain_sampling(model)
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    theirs = _model_sample(model, tok, PROMPTS, sampling, seed=5)
    assert generate(model, tok, PROMPTS, sampling, batch_size=4, seed=5) == _texts(tok, theirs)


def test_done_stops_rows_and_the_others_write_on_unchanged(tiny):
    """`done(i, text)`: a row stops where it says so (its text so far is kept);
    once a quarter of the batch has stopped, the batch shrinks, and the rows
    still writing get exactly the tokens they get in a full batch."""
    model, tok = tiny
    sampling = Sampling(max_new_tokens=12)
    whole = generate(model, tok, PROMPTS, sampling, batch_size=4)
    last: dict[int, str] = {}

    def done(i: int, text: str) -> bool:
        last[i] = text
        return (i == 1 and len(text) >= 3) or (i == 3 and len(text) >= 12)

    out = generate(model, tok, PROMPTS, sampling, batch_size=4, done=done)
    assert out[0] == whole[0] and out[2] == whole[2]
    for i in (1, 3):  # stopped at the first step done said so
        assert out[i] == last[i].strip() and whole[i].startswith(out[i]) and len(out[i]) < len(whole[i])
    assert set(last) == {0, 1, 2, 3}
    # done sees prompt indices across batches
    out2 = generate(model, tok, PROMPTS, sampling, batch_size=2, done=lambda i, text: i == 3)
    assert out2[:3] == whole[:3] and whole[3].startswith(out2[3]) and len(out2[3]) < len(whole[3])


def test_preallocated_cache_layer_holds_what_concatenation_holds():
    from seal_agent.model.generation import _Preallocated

    torch.manual_seed(0)
    parts = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 4)]
    layer = _Preallocated(room=2)
    for part in parts:  # the last part outgrows the room reserved: the layer grows
        keys, values = layer.update(part, part * 2)
    assert torch.equal(keys, torch.cat(parts, dim=-2)) and torch.equal(values, 2 * keys)
    assert layer.get_seq_length() == 11
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(layer.keys, torch.cat(parts, dim=-2)[[0, 2]])
    layer.update(parts[1][:2], parts[1][:2])
    assert layer.get_seq_length() == 12 and torch.equal(layer.keys[:, :, -1:], parts[1][:2])


def test_answers_until_correct_keep_every_grade(tiny, tiny_cfg):
    """Where only the grade matters, a correct answer ends once its gold is
    settled; the grades are those of whole answers, a wrong answer is whole."""
    import dataclasses

    from seal_agent.qa.answering import Question, evaluate
    from seal_agent.qa.grading import normalize_answer

    model, tok = tiny
    questions = [Question(q, "-", "The Normans") for q in ("Who led them?", "When did they settle?", "Who lost?")]
    whole = evaluate(model, tok, questions, tiny_cfg.qa, use_chat=True, compute_dtype=torch.float32)
    words = [normalize_answer(s.prediction).split() for s in whole]
    golds = [words[0][1], "zq xv never written", words[2][2]]  # written early / never / early
    questions = [dataclasses.replace(q, answer=g) for q, g in zip(questions, golds)]
    full = evaluate(model, tok, questions, tiny_cfg.qa, use_chat=True, compute_dtype=torch.float32)
    early = evaluate(model, tok, questions, tiny_cfg.qa, use_chat=True, compute_dtype=torch.float32,
                     until_correct=True)
    assert [s.correct for s in early] == [s.correct for s in full] == [True, False, True]
    assert early[1].prediction == full[1].prediction
    for i in (0, 2):
        assert full[i].prediction.startswith(early[i].prediction) and len(early[i].prediction) < len(full[i].prediction)


def test_a_precision_by_rows_writes_small_batches_in_fp32(tiny):
    """ByRows(bf16, 3): a batch of fewer than 3 rows runs in fp32 (the same
    tokens as fp32), a larger one in bf16 (the same tokens as bf16)."""
    from seal_agent.model.precision import ByRows, batch_dtype

    rule = ByRows(torch.bfloat16, 3)
    assert batch_dtype(rule, 2) == torch.float32 and batch_dtype(rule, 3) == torch.bfloat16
    assert batch_dtype(torch.bfloat16, 1) == torch.bfloat16 and str(rule) == "bfloat16 from 3 rows, float32 below"
    model, tok = tiny
    sampling = Sampling(max_new_tokens=8)
    assert generate(model, tok, PROMPTS, sampling, compute_dtype=torch.float32) != \
        generate(model, tok, PROMPTS, sampling, compute_dtype=torch.bfloat16)  # so the dtype shows
    for prompts, dtype in ((PROMPTS[:2], torch.float32), (PROMPTS, torch.bfloat16)):
        assert generate(model, tok, prompts, sampling, compute_dtype=rule, batch_size=4) == \
            generate(model, tok, prompts, sampling, compute_dtype=dtype, batch_size=4)
    # batches of one call are chosen one by one: 4 rows in batches of 3 and 1
    mixed = generate(model, tok, PROMPTS, sampling, compute_dtype=rule, batch_size=3)
    assert mixed[:3] == generate(model, tok, PROMPTS[:3], sampling, compute_dtype=torch.bfloat16, batch_size=3)
    assert mixed[3:] == generate(model, tok, PROMPTS[3:], sampling, compute_dtype=torch.float32)


def test_writing_dtype_auto_and_explicit(tiny_cfg):
    """An explicit bfloat16 writes every batch in bf16; "auto" is bf16 where the
    CPU has it natively, by rows (fp32 for 1-3) on CPUs with AMX tiles."""
    import dataclasses

    from seal_agent.model.loader import generate_dtype
    from seal_agent.model.precision import ByRows

    def writing(choice: str):
        return generate_dtype(dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model,
                                                                                       generate_dtype=choice)))

    assert writing("bfloat16") == torch.bfloat16 and writing("float32") == torch.float32
    native = torch.cpu._is_avx512_bf16_supported()
    amx = native and torch.cpu._is_amx_tile_supported()
    assert writing("auto") == (ByRows(torch.bfloat16, 4) if amx else torch.bfloat16 if native else torch.float32)
