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
    enc = _shared_prefix_inputs(model, rows, groups, tok.pad_token_id)
    n_a, n_b = common_prefix(rows[:2]), common_prefix(rows[2:5])
    p = max(n_a, n_b)
    assert enc["past_key_values"].get_seq_length() == p  # computed once per passage, not per row
    mask = enc["attention_mask"]
    assert mask[0, :p].sum() == n_a and mask[2, :p].sum() == n_b and mask[5, :p].sum() == 0
    assert mask.sum(dim=1).tolist() == [len(r) for r in rows]  # every row: all of its tokens, nothing else


def test_no_sharing_without_a_long_common_prefix(tiny):
    model, tok = tiny
    rows = tok(["Who led them?", "Who won?"], add_special_tokens=False)["input_ids"]
    assert _shared_prefix_inputs(model, rows, ["a", "a"], tok.pad_token_id) is None
    assert _shared_prefix_inputs(model, [[1] * 40, [1] * 40], ["a", "b"], tok.pad_token_id) is None


@torch.inference_mode()
def test_bf16_shared_prefix_runs_and_restores_the_weights(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [PASSAGE_A + "Who led them?", PASSAGE_A + "Where did they settle?"]
    out = generate(model, tok, prompts, Sampling(max_new_tokens=6), compute_dtype=torch.bfloat16, groups=[1, 1])
    assert len(out) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
