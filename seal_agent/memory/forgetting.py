"""The forgetting check and gate: pure logic over correctness before and after an update.

A check compares, on a replay sample of earlier QAs, what the live model got
right (before) with what the candidate update gets right (after). The gate
accepts when the share of previously-correct replay QAs that the candidate
gets wrong is at most `max_forgetting` (0.0: not a single one lost). QAs the
live model already got wrong cannot be forgotten and do not count against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    replay_ids: list[int]
    before: dict[int, bool]
    after: dict[int, bool]
    nearest_ids: list[int] = field(default_factory=list)
    gain_n: int = 0
    gain_before: float | None = None
    gain_after: float | None = None

    @property
    def replay_n(self) -> int:
        return len(self.replay_ids)

    def accuracy(self, side: dict[int, bool]) -> float | None:
        return sum(side[i] for i in self.replay_ids) / self.replay_n if self.replay_n else None

    @property
    def flipped(self) -> list[int]:
        """Replay QAs right before and wrong after."""
        return [i for i in self.replay_ids if self.before[i] and not self.after[i]]

    @property
    def recovered(self) -> list[int]:
        return [i for i in self.replay_ids if not self.before[i] and self.after[i]]

    @property
    def lost_fraction(self) -> float:
        right_before = sum(self.before[i] for i in self.replay_ids)
        return len(self.flipped) / right_before if right_before else 0.0


def passes(check: Check, max_forgetting: float) -> bool:
    return check.lost_fraction <= max_forgetting + 1e-12


def summary(check: Check | None, attempts: int, decision: str, questions: dict[int, str] | None = None,
            ) -> dict[str, Any]:
    """The `forgetting` object of `learn --json`."""
    if check is None:
        return {"replay_n": 0, "before": None, "after": None, "flipped": [], "attempts": attempts,
                "decision": decision}
    questions = questions or {}

    def rnd(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "replay_n": check.replay_n,
        "nearest_n": len(check.nearest_ids),
        "before": rnd(check.accuracy(check.before)),
        "after": rnd(check.accuracy(check.after)),
        "flipped": [{"id": i, "question": questions.get(i, "")} for i in check.flipped],
        "recovered": len(check.recovered),
        "lost_fraction": rnd(check.lost_fraction),
        "gain": {"n": check.gain_n, "before": rnd(check.gain_before), "after": rnd(check.gain_after)},
        "attempts": attempts,
        "decision": decision,
    }
