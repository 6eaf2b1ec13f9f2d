"""Solving ARC tasks: `seal-agent solve`, `eval arc`'s conditions, and the
inbox, which keeps what it solved as skill modules (memory/skills.py).

One task: the recipe policy (with its promoted ReSTEM adapter, if any) writes
a recipe, the live model is test-time trained on the demonstrations as it
says, and the adapted model answers the test inputs. The live weights are
exactly as they were afterwards; in the inbox the trained adapter is saved
before it is taken off.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arc import ttt
from ..arc.grids import GridError, Task, load_tasks
from ..arc.writing import RecipePolicy, Written, write_recipe
from ..config import Config
from ..documents import file_hash
from ..errors import DocumentError
from ..memory.skills import SkillStore
from ..memory.state import State
from .self_edit import policy_adapter


@dataclass
class Solver:
    """What solving a task uses."""

    cfg: Config
    model: Any  # the live weights, trained on and answered with
    tokenizer: Any
    writer: Any  # what writes recipes: the model, or an engine on its weights (engine.generate)
    policy: RecipePolicy
    policy_adapter: Path | None  # the promoted ARC policy version's adapter (None: the prompt alone)
    policy_label: str
    context: int | None  # the model's context length: a task over it is refused

    def write(self, task: Task, seed: int) -> Written:
        with policy_adapter(self.writer, self.policy_adapter) as writer:
            return write_recipe(writer, self.tokenizer, self.policy, task,
                                use_chat=self.cfg.model.use_chat_template, seed=seed)

    def solve(self, task: Task, *, seed: int = 0, given: Written | None = None, untrained: bool = False,
              keep: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """One task's result: the self-edit, the answers and their verdicts, what
        training did, seconds; or `refused` (over the context, or over
        `arc.budget_s` of training) with the reason. `given`: a recipe written
        elsewhere (`--recipe`, an oracle's); `untrained`: the demonstrations in
        context only (`eval arc`'s icl). `keep(adapted)`: called with the trained
        model before its adapter is taken off."""
        t0 = time.perf_counter()
        written = None if untrained else given or self.write(task, seed)
        chosen = written.parsed.recipe if written is not None else None
        try:
            solved = ttt.solve(self.model, self.tokenizer, task, chosen, self.cfg.lora, self.cfg.train,
                               use_chat=self.cfg.model.use_chat_template, seed=seed, context=self.context,
                               budget_s=self.cfg.arc.budget_s, keep=keep, voting=self.cfg.arc.vote)
        except (ValueError, ttt.OverBudget) as e:  # over the model's context, or over the time budget
            return {"task": task.id, "refused": str(e), "self_edit": _self_edit(written, given, self.policy_label),
                    "solved": False if task.solutions is not None else None,
                    "seconds": round(time.perf_counter() - t0, 2)}
        return {
            "task": task.id, "self_edit": _self_edit(written, given, self.policy_label),
            "trained": chosen is not None and solved.train["sequences"] > 0,
            "outputs": [list(map(list, g)) if g else None for g in solved.outputs],
            "answers": solved.answers, "verdicts": solved.verdicts, "solved": solved.solved,
            "train": solved.train, **({"votes": solved.votes} if solved.votes is not None else {}),
            "seconds": round(time.perf_counter() - t0, 2),
        }


def _self_edit(written: Written | None, given: Written | None, label: str) -> dict[str, Any] | None:
    if written is None:
        return None
    chosen = written.parsed.recipe
    return {"text": written.texts[-1], "samples": len(written.texts), "given": given is not None,
            "policy": None if given is not None else label,
            "recipe": dataclasses.asdict(chosen) if chosen else None, "refused": written.parsed.reason}


@dataclass
class SkillReport:
    """An ARC task file learned through `learn` or the inbox."""

    document: str
    document_id: int
    results: list[dict[str, Any]] = field(default_factory=list)  # per task, as Solver.solve, plus skill
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "done" if any("refused" not in r for r in self.results) else "failed"

    def as_dict(self) -> dict[str, Any]:
        checked = [r for r in self.results if r.get("solved") is not None]
        return {"document": self.document, "document_id": self.document_id, "kind": "arc", "status": self.status,
                "tasks": len(self.results), "solved": sum(r["solved"] for r in checked), "checked": len(checked),
                "skills": [r["skill"] for r in self.results if r.get("skill") is not None],
                "results": self.results, "seconds": round(self.seconds, 2)}


def read_tasks(path: Path) -> list[Task]:
    """An ARC task file, or a DocumentError saying why it is not one (the inbox rejects it)."""
    try:
        return load_tasks(path)
    except GridError as e:
        raise DocumentError(f"{path.name}: {e}") from None


def learn_tasks(solver: Solver, state: State, skills: SkillStore, path: Path, recorded_as: str | None = None,
                seed: int = 0) -> SkillReport:
    """Solve every task of an ARC file, keeping each trained adapter as a skill module."""
    t0 = time.perf_counter()
    tasks = read_tasks(path)
    recorded = recorded_as or str(Path(path).resolve())
    doc_id = state.add_document(recorded, file_hash(Path(path)), Path(recorded).name, "arc")
    report = SkillReport(recorded, doc_id)
    try:
        for task in tasks:
            skill_id = skills.next_id()
            saved: list[Path] = []

            def keep(adapted, sid: int = skill_id, task_id: str = task.id, saved: list[Path] = saved) -> None:
                saved.append(skills.save_adapter(sid, lambda d: adapted.save_pretrained(str(d)),
                                                 {"task": task_id, "document_id": doc_id}))

            result = solver.solve(task, seed=seed, keep=keep)
            result["skill"] = skill_id
            with state.transaction() as c:
                skills.add(skill_id, doc_id, task, bool(saved), result, c)
                state.event("skill", _summary(task, result, skill_id, bool(saved)), document_id=doc_id, conn=c,
                            data={"skill": skill_id, "task": task.id, "solved": result.get("solved"),
                                  "refused": result.get("refused")})
            report.results.append(result)
    except BaseException:
        state.finish_document(doc_id, "failed", {"kind": "arc", "results": report.results})
        raise
    report.seconds = time.perf_counter() - t0
    state.finish_document(doc_id, report.status, report.as_dict())
    return report


def _summary(task: Task, result: dict[str, Any], skill_id: int, kept: bool) -> str:
    if "refused" in result:
        return f"ARC task {task.id}: refused: {result['refused']}"
    verdict = {True: "solved", False: "not solved", None: "answered (no solution to check)"}[result["solved"]]
    where = f"skill module s{skill_id:04d}" if kept else "nothing trained (no recipe parsed)"
    return f"ARC task {task.id}: {verdict}; {where}"
