"""Writing self-edits: the model, prompted by a policy (and, once ReSTEM has
trained one, a policy adapter), writes training data for a passage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from ..documents import Passage
from ..model.generation import Decoder, generate
from ..model.inner_loop import Example
from ..model.precision import Precision
from ..policy import Policy


@dataclass
class SelfEdit:
    prompt: str
    text: str  # the completion as the model meant it (the auditable trace)
    examples: list[Example]  # items under the title, then the passage

    @property
    def n_items(self) -> int:
        return len(self.examples) - 1


@contextlib.contextmanager
def policy_adapter(model, adapter_dir: Path | None) -> Iterator:
    """`model` with a trained policy adapter (a LoRA from ReSTEM) attached; it is
    taken off again afterwards, leaving `model`'s weights exactly as they were.
    No adapter (policy version 0): `model` itself, prompted by the policy file."""
    if adapter_dir is None:
        yield model
        return
    if isinstance(model, Decoder):  # an engine takes the adapter as a request option
        yield model.with_adapter(adapter_dir)
        return
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()


def write_self_edits(
    model, tokenizer, policy: Policy, passage: Passage, *, n: int = 1, use_chat: bool = True,
    dtype: Precision = torch.float32, seed: int = 0, adapter: Path | None = None,
) -> list[SelfEdit]:
    """Sample `n` self-edits for one passage (batched), with the policy adapter if given."""
    return write_for(model, tokenizer, policy, [passage] * n, use_chat=use_chat, dtype=dtype, seed=seed,
                     adapter=adapter, batch_size=n)


def write_for(
    model, tokenizer, policy: Policy, passages: list[Passage], *, use_chat: bool = True,
    dtype: Precision = torch.float32, seed: int = 0, adapter: Path | None = None, batch_size: int = 8,
) -> list[SelfEdit]:
    """One self-edit per passage, `batch_size` passages per generate call (one
    sampling stream, seeded once): decoding several rows at once costs little
    more per step than one."""
    prompts = [policy.prompt(tokenizer, p.title, p.text, use_chat) for p in passages]
    with policy_adapter(model, adapter) as writer:
        completions = generate(writer, tokenizer, prompts, policy.sampling, compute_dtype=dtype, seed=seed,
                               batch_size=batch_size)
    return [parse(policy, tokenizer, p, prompt, c, use_chat) for p, prompt, c in zip(passages, prompts, completions)]


def sample(model, tokenizer, policy: Policy, prompt: str, n: int, dtype: Precision, seed: int) -> list[str]:
    """`n` raw completions of a policy prompt, sampled as the policy file says, in one batch."""
    return generate(model, tokenizer, [prompt] * n, policy.sampling, compute_dtype=dtype, seed=seed, batch_size=n)


def parse(policy: Policy, tokenizer, passage: Passage, prompt: str, completion: str, use_chat: bool) -> SelfEdit:
    """A sampled completion as a self-edit: its text as meant, its training examples."""
    text = policy.completion_text(tokenizer, completion, use_chat)
    return SelfEdit(prompt, text, policy.examples(text, passage.title, passage.text))


def from_text(policy: Policy, passage: Passage, text: str) -> SelfEdit:
    """A self-edit written elsewhere (e.g. another model's), parsed by `policy`."""
    return SelfEdit("", text, policy.examples(text, passage.title, passage.text))
