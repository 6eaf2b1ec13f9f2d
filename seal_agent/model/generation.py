"""Prompt rendering and batched text generation with a Hugging Face model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .precision import computing_in


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """Messages -> prompt text through the tokenizer's chat template, ending
    where the assistant's answer begins."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(
    tokenizer, *, system: str | None, user: str, base: str, use_chat: bool
) -> str:
    """A chat model gets system+user through its template; a base model (or
    use_chat off) gets the plain `base` text, which ends in a header to continue."""
    if use_chat and has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        return render_chat(tokenizer, messages)
    return base


def first_stop(text: str, stop: tuple[str, ...]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)


def _truncate_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cut = first_stop(text, stop)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_kwargs(tokenizer, sampling: Sampling) -> dict:
    """`model.generate` arguments for a Sampling (greedy at temperature 0)."""
    kwargs: dict = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sampling.stop:
        kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    return kwargs


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix all `rows` share."""
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def _shared_prefix_inputs(model, rows: list[list[int]], groups: list, pad_id: int) -> dict | None:
    """Inputs for `model.generate` in which each group of rows with a common
    token prefix has that prefix's keys and values computed once, not per row.

    Row layout: [pad][prefix][pad][rest]. Prefixes end in the same column, so
    the cache covers the first P columns of every row; padding is masked and
    positions count only real tokens, so each row sees exactly its own prompt.
    None when no two rows share a prefix worth it."""
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    prefix = [0] * len(rows)
    for idx in members.values():
        if len(idx) > 1:  # keep one token of each row to be fed as input
            n = min(common_prefix([rows[i] for i in idx]), min(len(rows[i]) for i in idx) - 1)
            for i in idx:
                prefix[i] = n
    if max(prefix) < 16:
        return None
    p_max = max(prefix)
    s_max = max(len(r) - n for r, n in zip(rows, prefix))
    ids, mask = [], []
    for r, n in zip(rows, prefix):
        rest = len(r) - n
        ids.append([pad_id] * (p_max - n) + r[:n] + [pad_id] * (s_max - rest) + r[n:])
        mask.append([0] * (p_max - n) + [1] * n + [0] * (s_max - rest) + [1] * rest)
    device = next(model.parameters()).device
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for idx in members.values():
        n = prefix[idx[0]]
        if n == 0:
            continue
        past = model(input_ids=torch.tensor([rows[idx[0]][:n]], device=device), use_cache=True).past_key_values
        if type(past) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in past.layers):
            return None  # sliding windows, recurrent state: left to generate's own prefill
        kv = [(layer.keys, layer.values) for layer in past.layers]
        if layers is None:
            layers = [(k.new_zeros(len(rows), k.shape[1], p_max, k.shape[3]),
                       v.new_zeros(len(rows), v.shape[1], p_max, v.shape[3])) for k, v in kv]
        for (keys, values), (k, v) in zip(layers, kv):
            keys[idx, :, p_max - n:] = k[0]
            values[idx, :, p_max - n:] = v[0]
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device),
            "past_key_values": DynamicCache(layers, config=model.config)}


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    sampling: Sampling,
    *,
    compute_dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    seed: int | None = None,
    groups: list | None = None,
) -> list[str]:
    """Complete each prompt; batched with left padding. Returns only the new text.

    `groups` (one key per prompt): prompts of a group start alike (the same
    passage before different questions), and the keys and values of their
    common token prefix are computed once per batch instead of once per row."""
    if seed is not None:
        torch.manual_seed(seed)
    outputs: list[str] = []
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with computing_in(model, compute_dtype):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                enc = None
                if groups is not None:
                    rows = tokenizer(chunk, add_special_tokens=False)["input_ids"]
                    enc = _shared_prefix_inputs(model, rows, groups[start : start + batch_size],
                                                tokenizer.pad_token_id)
                if enc is None:
                    enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
                    enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(**enc, **generate_kwargs(tokenizer, sampling))
                new = out[:, enc["input_ids"].shape[1] :]
                for row in new:
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    text, _ = _truncate_at_stop(text, sampling.stop)
                    outputs.append(text.strip())
    finally:
        tokenizer.padding_side = old_side
    return outputs

