"""ARC grids as text, and the exact-match check of an answer.

A grid is rows of cells, each a colour 0-9, at most 30x30 (ARC's limits). As
text it is one line per row, one digit per cell, no separators: a 30x30 grid
is 30 lines of 30 digits (930 characters, about as many tokens for a
digit-by-digit tokenizer such as SmolLM2's). Demonstrations and the test input
are laid out as

    Input:
    012
    340

    Output:
    ...

and the model answers with the output grid's rows. An answer that is not a
grid is a wrong answer with the reason recorded, never an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SealError

Grid = tuple[tuple[int, ...], ...]
MAX_SIDE = 30


class GridError(SealError):
    """A grid (of a task, not of an answer) that breaks ARC's rules."""


def grid(rows) -> Grid:
    """`rows` (lists of ints) as a Grid, checked: rectangular, 1-30 a side, colours 0-9."""
    try:
        g = tuple(tuple(int(c) for c in row) for row in rows)
    except (TypeError, ValueError):
        raise GridError(f"not a grid of integers: {str(rows)[:80]}") from None
    if not g or not g[0]:
        raise GridError("an empty grid")
    if len(g) > MAX_SIDE or len(g[0]) > MAX_SIDE:
        raise GridError(f"a {len(g)}x{len(g[0])} grid: ARC grids are at most {MAX_SIDE}x{MAX_SIDE}")
    if any(len(row) != len(g[0]) for row in g):
        raise GridError("rows of different lengths")
    if any(not 0 <= c <= 9 for row in g for c in row):
        raise GridError("a colour outside 0-9")
    return g


def shape(g: Grid) -> tuple[int, int]:
    return len(g), len(g[0])


def encode(g: Grid) -> str:
    return "\n".join("".join(str(c) for c in row) for row in g)


@dataclass(frozen=True)
class Parsed:
    grid: Grid | None
    reason: str | None  # why it is not a grid (None when it is)


def decode(text: str) -> Parsed:
    """The grid an answer writes: its first block of digit rows (blank lines and a
    trailing explanation end it; an "Output:" header before it, on its own line or
    the first row's, is skipped). Not a grid: `grid` None and the reason."""
    rows: list[str] = []
    for line in text.strip().splitlines():
        line = line.strip()
        head, _, rest = line.partition(":")
        if not rows and head.strip().lower() in ("output", "answer") and rest.strip().isdigit():
            line = rest.strip()  # "Output: 012" (the header echoed on the first row's line)
        if not line:
            if rows:
                break
            continue
        if line.isdigit():
            rows.append(line)
        elif rows:
            break
        elif line.lower().rstrip(":") in ("output", "answer"):
            continue
        else:
            return Parsed(None, f"not rows of digits: {line[:40]!r}")
    if not rows:
        return Parsed(None, "no grid in the answer")
    if any(len(r) != len(rows[0]) for r in rows):
        return Parsed(None, f"rows of different lengths ({sorted({len(r) for r in rows})})")
    if len(rows) > MAX_SIDE or len(rows[0]) > MAX_SIDE:
        return Parsed(None, f"a {len(rows)}x{len(rows[0])} grid, over {MAX_SIDE}x{MAX_SIDE}")
    return Parsed(tuple(tuple(int(c) for c in r) for r in rows), None)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str  # "correct", or where it fails: "parse: ...", "shape: ...", "cells: ..."


def check(answer: str, gold: Grid) -> Verdict:
    """Exact match: the answer's grid has the gold's shape and every cell."""
    parsed = decode(answer)
    if parsed.grid is None:
        return Verdict(False, f"parse: {parsed.reason}")
    got = parsed.grid
    if shape(got) != shape(gold):
        return Verdict(False, f"shape: {shape(got)[0]}x{shape(got)[1]}, expected {shape(gold)[0]}x{shape(gold)[1]}")
    wrong = sum(a != b for ra, rb in zip(got, gold) for a, b in zip(ra, rb))
    if wrong:
        return Verdict(False, f"cells: {wrong} of {shape(gold)[0] * shape(gold)[1]} wrong")
    return Verdict(True, "correct")


@dataclass(frozen=True)
class Pair:
    input: Grid
    output: Grid


@dataclass(frozen=True)
class Task:
    id: str
    train: tuple[Pair, ...]  # the demonstrations
    test: tuple[Grid, ...]  # the test inputs
    solutions: tuple[Grid, ...] | None = None  # their outputs, where known


def pair_text(p: Pair) -> str:
    return f"Input:\n{encode(p.input)}\n\nOutput:\n{encode(p.output)}"


def prompt_text(demonstrations: tuple[Pair, ...], test_input: Grid) -> str:
    """The demonstrations and a test input, the model to continue with the output grid."""
    shown = "\n\n".join(pair_text(p) for p in demonstrations)
    return f"{shown}\n\nInput:\n{encode(test_input)}\n\nOutput:\n"


def _is_task(data) -> bool:
    return isinstance(data, dict) and "train" in data and "test" in data


def is_task_file(path: Path) -> bool:
    """Whether a file holds ARC tasks (one task, or an ARC Prize challenges file)
    rather than a document: how `learn` and the inbox tell the two .json kinds apart.
    A file that is not JSON is not a task file (the document reader says why)."""
    if Path(path).suffix.lower() != ".json":
        return False
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # a nesting too deep is the document reader's to refuse
        return False
    return _is_task(data) or (isinstance(data, dict) and bool(data) and all(_is_task(t) for t in data.values()))


def load_tasks(challenges: Path, solutions: Path | None = None) -> list[Task]:
    """Tasks in the ARC Prize JSON layout ({id: {"train": [...], "test": [...]}}, and
    solutions {id: [grid, ...]}), or one task in ARC's own layout (its test pairs may
    carry their outputs); a malformed task is refused naming it."""
    try:
        data = json.loads(Path(challenges).read_text(encoding="utf-8"))
        sols = json.loads(Path(solutions).read_text(encoding="utf-8")) if solutions else {}
    except (OSError, ValueError) as e:
        raise GridError(f"cannot read ARC tasks: {e}") from None
    if _is_task(data):  # one task, ARC's own file layout
        data = {Path(challenges).stem: data}
    if not isinstance(data, dict):
        raise GridError(f"{challenges}: not ARC tasks (an object of task id -> task, or one task)")
    tasks = []
    for task_id, t in data.items():
        try:
            train = tuple(Pair(grid(p["input"]), grid(p["output"])) for p in t["train"])
            test = tuple(grid(p["input"]) for p in t["test"])
            if task_id in sols:
                solved = tuple(grid(g) for g in sols[task_id])
            elif all("output" in p for p in t["test"]):  # a task file that carries its answers
                solved = tuple(grid(p["output"]) for p in t["test"])
            else:
                solved = None
        except (KeyError, TypeError, GridError) as e:
            raise GridError(f"ARC task {task_id}: {e}") from None
        if not train or not test:
            raise GridError(f"ARC task {task_id}: no demonstrations or no test input")
        tasks.append(Task(task_id, train, test, solved))
    return tasks
