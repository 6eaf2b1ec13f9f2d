"""Writing self-edits: the model, prompted by a policy, writes training data for a passage."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .documents import Passage
from .inner_loop import Example
from .model.generation import generate
from .policy import Policy


@dataclass
class SelfEdit:
    prompt: str
    text: str  # the completion as the model meant it (the auditable trace)
    examples: list[Example]  # items under the title, then the passage

    @property
    def n_items(self) -> int:
        return len(self.examples) - 1


def write_self_edits(
    model, tokenizer, policy: Policy, passage: Passage, *, n: int = 1, use_chat: bool = True,
    dtype: torch.dtype = torch.float32, seed: int = 0,
) -> list[SelfEdit]:
    """Sample `n` self-edits for one passage (batched)."""
    prompt = policy.prompt(tokenizer, passage.title, passage.text, use_chat)
    completions = generate(model, tokenizer, [prompt] * n, policy.sampling, compute_dtype=dtype, seed=seed,
                           batch_size=n)
    edits = []
    for completion in completions:
        text = policy.completion_text(tokenizer, completion, use_chat)
        edits.append(SelfEdit(prompt, text, policy.examples(text, passage.title, passage.text)))
    return edits


def from_text(policy: Policy, passage: Passage, text: str) -> SelfEdit:
    """A self-edit written elsewhere (e.g. another model's), parsed by `policy`."""
    return SelfEdit("", text, policy.examples(text, passage.title, passage.text))
