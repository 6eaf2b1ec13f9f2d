"""`eval arc`: the paper's Table 1 ladder on ARC tasks.

Conditions, each on the same tasks and seed:
  icl         the demonstrations in context, no training;
  ttt-self    test-time training by the recipe the policy's prompt alone writes
              (policy version 0: the paper's "TTT + self-edit, no RL");
  ttt-oracle  the best of a fixed grid of recipes (`ORACLE`): a task counts as
              solved when any of them solves it, as the paper's oracle;
  seal        the recipe the promoted ARC policy version writes (after ReSTEM).
A task is solved when every test input is answered exactly. Where an answer
fails is kept (parse, shape, cells; or refused: over the context or over
`arc.budget_s` of training), so a ladder of zeros still says what to fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arc.grids import GridError, Task, load_tasks
from ..arc.recipe import parse
from ..arc.writing import Written
from ..errors import SealError
from ..progress import Progress, no_progress
from .ladder import bar_chart, wilson_interval

if TYPE_CHECKING:
    from ..agent import SealAgent

CONDITIONS = ("icl", "ttt-self", "ttt-oracle", "seal")

# The oracle's grid: a cheap recipe without augmentations, the one that solved a task
# in the first measurements (basic augmentations, lr 1e-3, 3 epochs), and a longer one
# with more views. Loss on the output: the grid is what must be learned.
ORACLE = (
    '{"data_generation": {"use_basic_augmentations": false, "use_size_augmentations": false, '
    '"use_chain_augmentations": false, "use_repeat_augmentations": false}, '
    '"training": {"strategy": "train_using_output_tokens", "learning_rate": 0.003, "num_train_epochs": 5}}',
    '{"data_generation": {"use_basic_augmentations": true, "use_size_augmentations": false, '
    '"use_chain_augmentations": false, "use_repeat_augmentations": false}, '
    '"training": {"strategy": "train_using_output_tokens", "learning_rate": 0.001, "num_train_epochs": 3}}',
    '{"data_generation": {"use_basic_augmentations": true, "use_size_augmentations": false, '
    '"use_chain_augmentations": true, "use_repeat_augmentations": false}, '
    '"training": {"strategy": "train_using_output_tokens", "learning_rate": 0.001, "num_train_epochs": 2}}',
)


def parse_conditions(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONDITIONS]
    if unknown or not names:
        raise SealError(f"unknown ARC condition(s) {', '.join(unknown) or '(none given)'}; "
                        f"known: {', '.join(CONDITIONS)}")
    return list(dict.fromkeys(names))


def failure(result: dict[str, Any]) -> str | None:
    """Why a task's result is not a solve: refused, parse, shape, cells (None: solved)."""
    if "refused" in result:
        return "refused"
    if result["solved"]:
        return None
    for v in result["verdicts"]:
        if not v["correct"]:
            return v["reason"].split(":")[0]
    return None


def condition_row(condition: str, results: list[dict[str, Any]], seconds: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    n = len(results)
    solved = sum(bool(r["solved"]) for r in results)
    fails: dict[str, int] = {}
    for r in results:
        why = failure(r)
        if why is not None:
            fails[why] = fails.get(why, 0) + 1
    lo, hi = wilson_interval(solved, n)
    return {"condition": condition, "solved": solved, "n": n, "success_rate": round(solved / n, 4) if n else 0.0,
            "ci95": [round(lo, 4), round(hi, 4)], "failures": fails, "seconds": round(seconds, 2), **(extra or {}),
            "tasks": results}


@dataclass
class ArcLadder:
    rows: list[dict[str, Any]]
    data: Path
    files: dict[str, Path]


def eval_tasks(cfg, data: Path | None, solutions: Path | None, n: int | None,
               only: list[str] | None) -> tuple[Path, list[Task]]:
    """The tasks of `data` (default: arc.eval_data) with their solutions: all, the
    ones named in `only`, or the first n."""
    if data is None:
        if not cfg.arc.eval_data:
            raise SealError("no ARC tasks: pass --data FILE (and --solutions) or set arc.eval_data in config.toml")
        data = cfg.root / cfg.arc.eval_data
        if solutions is None and cfg.arc.eval_solutions:
            solutions = cfg.root / cfg.arc.eval_solutions
    try:
        tasks = load_tasks(data, solutions)
    except GridError as e:
        raise SealError(str(e)) from None
    if only:
        known = {t.id for t in tasks}
        missing = [t for t in only if t not in known]
        if missing:
            raise SealError(f"{data}: no task {', '.join(missing)}")
        tasks = [t for t in tasks if t.id in only]
    tasks = tasks[:n] if n is not None else tasks
    unchecked = [t.id for t in tasks if t.solutions is None]
    if unchecked:
        raise SealError(f"{data}: no solutions for {', '.join(unchecked[:5])}: pass --solutions FILE")
    return data, tasks


def run_arc(agent: SealAgent, conditions: str, *, data: Path | None = None, solutions: Path | None = None,
            n: int | None = None, tasks: list[str] | None = None, seed: int = 0, out_dir: Path | None = None,
            policy_version: int | None = None, progress: Progress = no_progress) -> ArcLadder:
    """The ladder on `agent`'s live weights; results.json and chart.png go to
    `out_dir` (default STATE/state/eval/arc-TIME)."""
    cfg = agent.cfg
    conds = parse_conditions(conditions)
    data, chosen = eval_tasks(cfg, data, solutions, n, tasks)
    seal_version = agent.arc_versions.active() if policy_version is None else policy_version
    solvers = {"ttt-self": agent.solver(0)}
    if "seal" in conds:
        solvers["seal"] = agent.solver(seal_version)
    oracle = [Written((text,), parse(text)) for text in ORACLE]
    t_start = datetime.now()
    progress("start", {"tasks": len(chosen), "conditions": conds})
    rows: list[dict[str, Any]] = []
    for condition in conds:
        done = {r["condition"]: r for r in rows}
        if condition == "seal" and seal_version == 0 and "ttt-self" in done:
            # The same policy version, prompts and seed as ttt-self: its results, not a second run.
            rows.append({**done["ttt-self"], "condition": "seal", "same_as": "ttt-self",
                         "note": "no promoted ARC policy version: seal is ttt-self"})
            progress("condition", rows[-1])
            continue
        t0 = time.perf_counter()
        results = []
        for i, task in enumerate(chosen):
            progress("task", {"condition": condition, "index": i, "total": len(chosen), "task": task.id})
            if condition == "icl":
                r = solvers["ttt-self"].solve(task, seed=seed, untrained=True)
            elif condition == "ttt-oracle":
                r = _oracle(solvers["ttt-self"], task, oracle, seed)
            else:
                r = solvers[condition].solve(task, seed=seed)
            results.append(r)
            progress("solved", {"condition": condition, "task": task.id, "solved": r["solved"]})
        extra = {}
        if condition in ("ttt-self", "seal"):
            extra["policy"] = solvers[condition].policy_label
        if condition == "seal" and seal_version == 0:
            extra["note"] = "no promoted ARC policy version: seal samples as ttt-self does"
        rows.append(condition_row(condition, results, time.perf_counter() - t0, extra))
        progress("condition", rows[-1])
    out_dir = out_dir or cfg.state_dir / "state" / "eval" / f"arc-{t_start:%Y%m%d-%H%M%S}"
    meta = {"data": str(data), "tasks": [t.id for t in chosen], "seed": seed, "model": cfg.model.base,
            "budget_s": cfg.arc.budget_s, "oracle": list(ORACLE), "started": t_start.isoformat(timespec="seconds")}
    return ArcLadder(rows, data, _write(rows, meta, out_dir, f"seal-agent eval arc: {len(chosen)} tasks of "
                                                              f"{data.name}, {cfg.model.base}"))


def _oracle(solver, task: Task, grid: list[Written], seed: int) -> dict[str, Any]:
    """Every recipe of the grid on the task; solved when one of them solves it."""
    t0 = time.perf_counter()
    tries = [solver.solve(task, seed=seed, given=w) for w in grid]
    best = next((r for r in tries if r["solved"]), None)
    pick = best or next((r for r in tries if "refused" not in r), tries[0])
    return {**pick, "oracle": [{"recipe": i, "solved": r["solved"], "failure": failure(r), "seconds": r["seconds"]}
                               for i, r in enumerate(tries)],
            "seconds": round(time.perf_counter() - t0, 2)}


def _write(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.json"
    results.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n", encoding="utf-8")
    chart = out_dir / "chart.png"
    bar_chart([{**r, "accuracy": r["success_rate"]} for r in rows], chart, title=title,
              ylabel="tasks solved (%)  [95% Wilson CI]")
    return {"results": results, "chart": chart}
