"""Eager attention that answers and writes without copying the key/value cache.

transformers' eager attention repeats each key/value head for the query heads
that share it (grouped-query attention: SmolLM2-135M has 9 query heads over 3
key/value heads) before its two matmuls, a copy of the layer's whole cache at
every decoded token. With a passage in every prompt (the in-context check of
model-written questions: dozens of rows of ~400 tokens) those copies move more
memory than the weights do. Here the query heads of a group are stacked
instead, so each key/value head is read in place: the same dot products, the
same softmax, the same outputs (bit for bit in every comparison made: tests,
BENCHMARKS.md), 1.3-3x faster with a passage in the prompt.

Only inference takes the grouped path: with gradients on (the inner loop) the
standard function runs unchanged. And it is installed only on models whose
own eager attention is transformers' standard one (Llama, Qwen2, Mistral,
...); one with softcapping or attention sinks (Gemma 2, gpt-oss) keeps its own.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.llama import modeling_llama

NAME = "seal_grouped_eager"
_standard = modeling_llama.eager_attention_forward


def grouped_eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                                    **kwargs):
    """transformers' eager attention; without gradients, grouped-query heads are
    stacked onto their shared key/value head instead of the cache being repeated."""
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    if (torch.is_grad_enabled() or module.training or heads == kv_heads
            or (attention_mask is not None and attention_mask.shape[1] != 1)):
        return _standard(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    group = heads // kv_heads
    # query head h attends with key/value head h // group: rows (h % group, position) per key/value head
    stacked = query.reshape(batch, kv_heads, group * length, query.shape[-1])
    weights = torch.matmul(stacked, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = (weights.view(batch, kv_heads, group, length, -1) + attention_mask[:, :, None]).view_as(weights)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).view(batch, heads, length, value.shape[-1])
    return out.transpose(1, 2).contiguous(), weights.view(batch, heads, length, -1)


AttentionInterface.register(NAME, grouped_eager_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)


def has_standard_eager(model: PreTrainedModel) -> bool:
    """Whether the model's family computes eager attention with transformers'
    standard function (the same source as Llama's)."""
    family = sys.modules.get(type(model).__module__)
    own = getattr(family, "eager_attention_forward", None)
    if own is None:
        return False
    if own is _standard:
        return True
    try:
        return inspect.getsource(own) == inspect.getsource(_standard)
    except (OSError, TypeError):
        return False


def use_grouped(model: PreTrainedModel) -> None:
    """Switch an eager-attention model to the grouped form where that computes
    the same thing (see the module's docstring)."""
    if (model.config._attn_implementation == "eager" and has_standard_eager(model)
            and model._can_set_attn_implementation()):
        model.set_attn_implementation(NAME)
