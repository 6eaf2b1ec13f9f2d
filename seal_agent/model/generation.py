"""Prompt rendering and batched text generation with a Hugging Face model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
) -> list[str]:
    """Complete each prompt; batched with left padding. Returns only the new text."""
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

