"""Skill modules: what the daemon kept of the ARC tasks it was given.

A task dropped into the inbox is solved as `seal-agent solve` solves it (the
model writes a recipe, is test-time trained on the demonstrations as it says,
and answers the test inputs). The trained adapter is kept as a skill module,
a plain PEFT adapter with its manifest (`adapters/skills/s0003/`), and the
task, its self-edit and its answers as a row of the `skills` table. A skill
module is never merged into the knowledge weights and never routed to a
question: the knowledge versions do not list it. The tasks are ReSTEM's ARC
contexts too (the daemon's own experience), newest first.

The adapter directory is written first and the row after, in the document's
transaction; a directory with no row (a crash between the two) is moved
aside by `discard_uncommitted`, as knowledge modules are.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arc.grids import Pair, Task, grid
from .adapter_log import AdapterLog
from .state import State, now


@dataclass(frozen=True)
class Skill:
    id: int
    document_id: int | None
    task: Task
    adapter: bool  # whether a trained adapter is kept (no recipe parsed: none was trained)
    created_at: str
    record: dict[str, Any]  # the self-edit, the answers, their verdicts, the training, seconds


def task_json(task: Task) -> str:
    return json.dumps({"id": task.id, "train": [{"input": p.input, "output": p.output} for p in task.train],
                       "test": list(task.test), "solutions": list(task.solutions) if task.solutions else None})


def _task(text: str) -> Task:
    d = json.loads(text)
    return Task(d["id"], tuple(Pair(grid(p["input"]), grid(p["output"])) for p in d["train"]),
                tuple(grid(g) for g in d["test"]),
                tuple(grid(g) for g in d["solutions"]) if d["solutions"] is not None else None)


def _skill(r: sqlite3.Row) -> Skill:
    return Skill(r["id"], r["document_id"], _task(r["task"]), bool(r["adapter"]), r["created_at"],
                 json.loads(r["record"]))


class SkillStore:
    def __init__(self, state: State, log: AdapterLog):
        self.state = state
        self.log = log

    def next_id(self) -> int:
        top = self.state.query("SELECT COALESCE(MAX(id), 0) AS m FROM skills")[0]["m"]
        return max(int(top), max(self.log.versions(), default=0)) + 1

    def save_adapter(self, skill_id: int, save: Callable[[Path], None], manifest: dict[str, Any]) -> Path:
        """The trained adapter's directory, written atomically before its row."""
        return self.log.write_version(skill_id, save, lambda: {"skill": skill_id, "created_at": now(), **manifest})

    def add(self, skill_id: int, document_id: int | None, task: Task, adapter: bool, record: dict[str, Any],
            conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO skills(id, document_id, task_id, task, adapter, created_at, record)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (skill_id, document_id, task.id, task_json(task), int(adapter), now(), json.dumps(record)))

    def all(self) -> list[Skill]:
        """Every skill, newest first."""
        return [_skill(r) for r in self.state.query("SELECT * FROM skills ORDER BY id DESC")]

    def count(self) -> int:
        return int(self.state.query("SELECT COUNT(*) AS n FROM skills")[0]["n"])

    def of_document(self, document_id: int) -> list[Skill]:
        return [_skill(r) for r in self.state.query("SELECT * FROM skills WHERE document_id = ? ORDER BY id",
                                                    (document_id,))]

    def path(self, skill_id: int) -> Path:
        return self.log.path(skill_id)

    def discard_uncommitted(self) -> list[int]:
        known = {r["id"] for r in self.state.query("SELECT id FROM skills WHERE adapter = 1")}
        discarded = []
        for s in self.log.versions():
            if s not in known:
                where = self.log.quarantine(s, "written but never committed to the database (interrupted solve)")
                self.state.event("discard", f"uncommitted skill module s{s:04d} moved to {where}")
                discarded.append(s)
        return discarded
