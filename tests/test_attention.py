"""Grouped eager attention: the same answers as transformers' eager, without copying the cache."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

from seal_agent.model import attention
from seal_agent.model.generation import Sampling, generate
from seal_agent.model.loader import load_model, load_tokenizer

PASSAGE = ("The Normans were descended from Norse raiders led by Rollo, who settled in Normandy in the 10th "
           "century and gave the region its name. ")
QUESTIONS = ["Who led them?", "When did the Normans settle in Normandy at last?", "Where?"]


@pytest.fixture
def pair(tiny_model_dir, tiny_cfg):
    """The tiny Llama (4 query heads over 2 key/value heads) through the loader,
    and the same weights with transformers' own eager attention."""
    ours = load_model(tiny_model_dir, tiny_cfg)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    return ours, reference, load_tokenizer(tiny_model_dir)


def test_loader_installs_grouped_attention_for_eager_llama(pair):
    ours, reference, _ = pair
    assert ours.config._attn_implementation == attention.NAME
    assert reference.config._attn_implementation == "eager"
    assert ours.config.num_attention_heads != ours.config.num_key_value_heads  # grouped-query heads


def test_grouped_attention_answers_as_eager(pair):
    """A left-padded batch: the same logits; greedy decoding with the reserved
    cache, with and without a shared passage prefix, writes the same tokens."""
    ours, reference, tok = pair
    prompts = [PASSAGE + q for q in QUESTIONS] + ["A lone question with no passage?"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        torch.testing.assert_close(ours(**enc).logits, reference(**enc).logits)
    sampling = Sampling(max_new_tokens=12)
    for groups in (None, ["p", "p", "p", "alone"]):
        expected = generate(reference, tok, prompts, sampling, groups=groups)
        assert generate(ours, tok, prompts, sampling, groups=groups) == expected
        assert any(expected)


def test_training_keeps_transformers_eager_attention(pair):
    """With gradients on, the same loss and gradients as the reference."""
    ours, reference, tok = pair
    enc = tok([PASSAGE], return_tensors="pt")
    grads = []
    for model in (ours, reference):
        model.train()
        model.zero_grad()
        loss = model(**enc, labels=enc["input_ids"]).loss
        loss.backward()
        grads.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
        model.eval()
    torch.testing.assert_close(grads[0], grads[1])


def test_other_eager_attention_and_sdpa_are_left_alone(tmp_path, tiny_model_dir, tiny_cfg):
    """Gemma 2 softcaps its attention in its own eager function: it keeps it.
    An sdpa config stays sdpa."""
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    gemma.save_pretrained(tmp_path / "gemma2")
    assert not attention.has_standard_eager(gemma)
    assert load_model(tmp_path / "gemma2", tiny_cfg).config._attn_implementation == "eager"

    sdpa = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, attn_implementation="sdpa"))
    assert load_model(tiny_model_dir, sdpa).config._attn_implementation == "sdpa"
