"""Data augmentations of ARC tasks, the families a self-edit chooses from (the
SEAL authors' `get_augmenters`): basic (rotations, flips, transposition),
size (each cell doubled across, down, or both), chained (a basic one, then
cells doubled) and repeats (the grid tiled twice across, down, or both).

Each is a pure function of a grid, applied alike to a pair's input and
output. Each has an inverse on the grids it makes, so an answer written for
an augmented view of a test input maps back to the original (voting over
views needs that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .grids import MAX_SIDE, Grid, Pair, Task


def _to_grid(a: np.ndarray) -> Grid:
    return tuple(tuple(int(c) for c in row) for row in a)


@dataclass(frozen=True)
class Augmentation:
    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]

    def __call__(self, g: Grid) -> Grid:
        return _to_grid(self.forward(np.array(g)))

    def undo(self, g: Grid) -> Grid:
        return _to_grid(self.inverse(np.array(g)))

    def fits(self, g: Grid) -> bool:
        """Whether the augmented grid stays within ARC's 30x30."""
        return self.pairs((Pair(g, g),)) is not None

    def pairs(self, pairs: tuple[Pair, ...]) -> tuple[Pair, ...] | None:
        """Every pair augmented (input and output alike); None when a grid would go over 30x30."""
        out = []
        for p in pairs:
            i, o = self(p.input), self(p.output)
            if max(len(i), len(i[0]), len(o), len(o[0])) > MAX_SIDE:
                return None
            out.append(Pair(i, o))
        return tuple(out)


def _every(n: int, axis: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a[::n] if axis == 0 else a[:, ::n]


def _first(n: int, axis: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a[: a.shape[0] // n] if axis == 0 else a[:, : a.shape[1] // n]


BASIC = (
    Augmentation("rotate90", lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
    Augmentation("rotate180", lambda a: np.rot90(a, 2), lambda a: np.rot90(a, -2)),
    Augmentation("rotate270", lambda a: np.rot90(a, 3), lambda a: np.rot90(a, -3)),
    Augmentation("flip_updown", np.flipud, np.flipud),
    Augmentation("flip_leftright", np.fliplr, np.fliplr),
    Augmentation("transpose", np.transpose, np.transpose),
)
_DOUBLE = Augmentation("double_cells", lambda a: np.repeat(np.repeat(a, 2, 0), 2, 1),
                       lambda a: a[::2, ::2])
SIZE = (
    _DOUBLE,
    Augmentation("double_height", lambda a: np.repeat(a, 2, 0), _every(2, 0)),
    Augmentation("double_width", lambda a: np.repeat(a, 2, 1), _every(2, 1)),
)
CHAIN = tuple(
    Augmentation(f"{b.name}+double_cells", lambda a, b=b: _DOUBLE.forward(b.forward(a)),
                 lambda a, b=b: b.inverse(_DOUBLE.inverse(a)))
    for b in BASIC
)
REPEAT = (
    Augmentation("tile_down", lambda a: np.concatenate([a, a], 0), _first(2, 0)),
    Augmentation("tile_across", lambda a: np.concatenate([a, a], 1), _first(2, 1)),
    Augmentation("tile_both", lambda a: np.tile(a, (2, 2)), lambda a: _first(2, 1)(_first(2, 0)(a))),
)
FAMILIES = {"basic": BASIC, "size": SIZE, "chain": CHAIN, "repeat": REPEAT}


def chosen(basic: bool, size: bool, chain: bool, repeat: bool) -> list[Augmentation]:
    """The augmentations of the families a recipe turns on, in a fixed order."""
    return [a for name, on in (("basic", basic), ("size", size), ("chain", chain), ("repeat", repeat)) if on
            for a in FAMILIES[name]]


def augment_pairs(pairs: tuple[Pair, ...], augmentations: list[Augmentation]) -> list[tuple[Pair, ...]]:
    """Each augmentation applied to every pair (input and output alike); one that
    would take a grid over 30x30 is left out for these pairs."""
    return [a for a in (aug.pairs(pairs) for aug in augmentations) if a is not None]


def leave_one_out(task: Task) -> list[tuple[tuple[Pair, ...], Pair]]:
    """Training tasks from the demonstrations alone: each demonstration in turn
    is the one to answer, the others shown (never the test output)."""
    pairs = task.train
    if len(pairs) < 2:
        return [((), pairs[0])] if pairs else []
    return [(pairs[:i] + pairs[i + 1:], pairs[i]) for i in range(len(pairs))]
