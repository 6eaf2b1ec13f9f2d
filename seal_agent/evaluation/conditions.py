"""The conditions of the ladder (`eval squad`, `eval cpt`): their names, the
defaults, and the check of a list against what the data carries. Pure and
light: the CLI reads the defaults without loading the model code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SealError

if TYPE_CHECKING:
    from ..documents import Passage

BASE, PASSAGE, SELF, IN_CONTEXT = "base", "passage", "self", "in-context"
EXTERNAL = "external:"
SIMPLE = (BASE, PASSAGE, SELF, IN_CONTEXT)
# cpt has no in-context condition, so its default lacks it.
DEFAULT_CPT_CONDITIONS = f"{BASE},{PASSAGE},{SELF},{EXTERNAL}gpt-4.1"
DEFAULT_CONDITIONS = f"{DEFAULT_CPT_CONDITIONS},{IN_CONTEXT}"


def parse_conditions(text: str, passages: list[Passage], cpt: bool = False) -> list[str]:
    """Validate a comma-separated condition list against what the data carries."""
    conditions = [c.strip() for c in text.split(",") if c.strip()]
    if not conditions:
        raise SealError("no conditions given")
    allowed = (BASE, PASSAGE, SELF) if cpt else SIMPLE
    for c in conditions:
        if c.startswith(EXTERNAL):
            require_external(passages, c[len(EXTERNAL):], f"condition '{c}'")
        elif c not in allowed:
            raise SealError(f"unknown condition '{c}' (known: {', '.join(allowed)}, {EXTERNAL}<name>)")
    if len(set(conditions)) != len(conditions):
        raise SealError("a condition is listed twice")
    return conditions


def require_external(passages: list[Passage], name: str, asked_by: str) -> None:
    """Refuse an external self-edit `name` that some passage does not carry."""
    missing = [i for i, p in enumerate(passages) if not p.external_self_edits.get(name)]
    if missing:
        have = sorted({k for p in passages for k in p.external_self_edits})
        raise SealError(f"{asked_by}: passage(s) {missing[:5]} carry no external self-edit '{name}' "
                        f"(the data has: {', '.join(have) or 'none'})")
