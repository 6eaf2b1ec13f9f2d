"""The ARC self-edit: a JSON recipe choosing augmentations and training settings.

The model writes, as the SEAL authors' prompt asks,

    {"data_generation": {"use_basic_augmentations": true, "use_size_augmentations": false,
                         "use_chain_augmentations": false, "use_repeat_augmentations": true},
     "training": {"strategy": "train_using_output_tokens", "learning_rate": 0.0001, "num_train_epochs": 3}}

and `parse` validates it against that schema (pydantic). A value out of its
range is clamped to the range and the reason recorded; a missing or
unreadable part is a refused recipe with the reason, never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

# What a recipe may ask for. The rate and epochs bound the cost of one
# test-time training run and keep a typo (a rate of 1.0) from diverging it.
LR_RANGE = (1e-5, 1e-2)
EPOCHS_RANGE = (1, 10)
STRATEGIES = {"train_using_all_tokens": "all", "train_using_output_tokens": "completion"}


class _DataGeneration(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    use_basic_augmentations: bool
    use_size_augmentations: bool
    use_chain_augmentations: bool
    use_repeat_augmentations: bool


class _Training(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: Literal["train_using_all_tokens", "train_using_output_tokens"]
    learning_rate: float
    num_train_epochs: int


class _Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data_generation: _DataGeneration
    training: _Training


def _schema() -> str:
    """The schema as JSON: what constrained decoding holds a sampled recipe to
    (model/constrained.py), ranges included. `parse`
    still clamps, for recipes written without it."""
    schema = _Recipe.model_json_schema()
    training = schema["$defs"]["_Training"]["properties"]
    training["learning_rate"].update(minimum=LR_RANGE[0], maximum=LR_RANGE[1])
    training["num_train_epochs"].update(minimum=EPOCHS_RANGE[0], maximum=EPOCHS_RANGE[1])
    return json.dumps(schema)


SCHEMA = _schema()


@dataclass(frozen=True)
class Recipe:
    basic: bool
    size: bool
    chain: bool
    repeat: bool
    loss_on: str  # "all" or "completion" (train.loss_on)
    lr: float
    epochs: int
    notes: tuple[str, ...] = field(default=())  # what parsing changed, and why


@dataclass(frozen=True)
class Parsed:
    recipe: Recipe | None
    reason: str | None  # why it was refused (None when parsed)


def _json_object(text: str) -> str | None:
    """The JSON object in a completion: all of it, or the first {...} in it (a model
    may wrap it in a code fence or a sentence)."""
    text = text.strip()
    if text.startswith("{"):
        return text
    match = re.search(r"\{.*\}", text, re.DOTALL)
    return match.group(0) if match else None


def _clamp(value, low, high, name: str, notes: list[str]):
    if value < low or value > high:
        clamped = min(max(value, low), high)
        notes.append(f"{name} {value} out of [{low}, {high}]: clamped to {clamped}")
        return clamped
    return value


def parse(text: str) -> Parsed:
    raw = _json_object(text)
    if raw is None:
        return Parsed(None, "no JSON object in the self-edit")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        return Parsed(None, f"not valid JSON: {e.msg} at character {e.pos}")
    try:
        r = _Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return Parsed(None, f"does not match the recipe schema: {where}: {first['msg']}")
    notes: list[str] = []
    t = r.training
    lr = _clamp(t.learning_rate, *LR_RANGE, "learning_rate", notes)
    epochs = _clamp(t.num_train_epochs, *EPOCHS_RANGE, "num_train_epochs", notes)
    d = r.data_generation
    return Parsed(Recipe(d.use_basic_augmentations, d.use_size_augmentations, d.use_chain_augmentations,
                         d.use_repeat_augmentations, STRATEGIES[t.strategy], float(lr), int(epochs), tuple(notes)),
                  None)
