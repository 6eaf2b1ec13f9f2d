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

import dataclasses
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..arc.grids import GridError, Task, load_tasks
from ..arc.recipe import parse
from ..arc.writing import Written
from ..cluster.pool import pool_if_asked
from ..errors import SealError
from ..progress import Progress, no_progress
from .ladder import bar_chart, wilson_interval

if TYPE_CHECKING:
    from ..agent import SealAgent

CONDITIONS = ("icl", "ttt-self", "ttt-oracle", "seal")

# The oracle's grid: a cheap recipe without augmentations, the one that solved a task
# in the first measurements (basic augmentations, lr 1e-3, 3 epochs), and a longer one
# with more views. Loss on the output: the grid is what must be learned.
def _recipe(basic: bool, chain: bool, lr: float, epochs: int) -> str:
    return json.dumps({"data_generation": {"use_basic_augmentations": basic, "use_size_augmentations": False,
                                           "use_chain_augmentations": chain, "use_repeat_augmentations": False},
                       "training": {"strategy": "train_using_output_tokens", "learning_rate": lr,
                                    "num_train_epochs": epochs}})


ORACLE = (_recipe(False, False, 0.003, 5), _recipe(True, False, 0.001, 3), _recipe(True, True, 0.001, 2))


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
    `out_dir` (default STATE/state/eval/arc-TIME). With cluster.executor = "ray"
    the (condition, task) cases are solved side by side on a pool of workers
    (cluster/pool.py, `Cases` as its work); else here, one after another."""
    cfg = agent.cfg
    conds = parse_conditions(conditions)
    data, chosen = eval_tasks(cfg, data, solutions, n, tasks)
    seal_version = agent.arc_versions.active() if policy_version is None else policy_version
    solvers = {"ttt-self": agent.solver(0)}
    if "seal" in conds:
        solvers["seal"] = agent.solver(seal_version)
    # seal with no promoted version is ttt-self (same policy, prompts, seed): its results, not a second run
    copied = "seal" in conds and seal_version == 0 and "ttt-self" in conds
    runs = [c for c in conds if not (copied and c == "seal")]
    t_start = datetime.now()
    progress("start", {"tasks": len(chosen), "conditions": runs})
    cases = [(c, t) for c in runs for t in chosen]
    work = Cases({c: dataclasses.replace(s, model=None, writer=None) for c, s in solvers.items()})
    with pool_if_asked(cfg, agent.live.base_dir, agent.live.model, work) as pool:  # the cluster of ReSTEM's rounds
        results, seconds, workers = _solve_cases(solvers, cases, chosen, seed, pool, progress)
    rows: list[dict[str, Any]] = []
    for c in runs:
        mine = [i for i, (cc, _) in enumerate(cases) if cc == c]
        extra: dict[str, Any] = {"policy": solvers[c].policy_label} if c in ("ttt-self", "seal") else {}
        if c == "seal" and seal_version == 0:
            extra["note"] = "no promoted ARC policy version: seal samples as ttt-self does"
        rows.append(condition_row(c, [results[i] for i in mine], sum(seconds[i] for i in mine), extra))
        progress("condition", rows[-1])
    if copied:
        ttt_self = next(r for r in rows if r["condition"] == "ttt-self")
        rows.insert(conds.index("seal"), {**ttt_self, "condition": "seal", "same_as": "ttt-self",
                                           "note": "no promoted ARC policy version: seal is ttt-self"})
    out_dir = out_dir or cfg.state_dir / "state" / "eval" / f"arc-{t_start:%Y%m%d-%H%M%S}"
    meta = {"data": str(data), "tasks": [t.id for t in chosen], "seed": seed, "model": cfg.model.base,
            "budget_s": cfg.arc.budget_s, "oracle": list(ORACLE), "started": t_start.isoformat(timespec="seconds"),
            "executor": "local" if workers is None else "ray", "per_worker": workers}
    return ArcLadder(rows, data, _write(rows, meta, out_dir, f"seal-agent eval arc: {len(chosen)} tasks of "
                                                              f"{data.name}, {cfg.model.base}"))


def _solve_cases(solvers, cases: list[tuple[str, Task]], chosen: list[Task], seed: int, pool,
                 progress: Progress) -> tuple[list[dict[str, Any]], list[float], dict[str, Any] | None]:
    """Every (condition, task) case's result and seconds: here, or on the pool (with
    which worker solved it, and the pool's per-worker figures)."""
    if pool is None:
        results, seconds = [], []
        for i, (c, task) in enumerate(cases):
            progress("task", {"condition": c, "index": i % len(chosen), "total": len(chosen), "task": task.id})
            t0 = time.perf_counter()
            results.append(case(solvers, c, task, seed))
            seconds.append(time.perf_counter() - t0)
            progress("solved", {"condition": c, "task": task.id, "solved": results[-1]["solved"]})
        return results, seconds, None
    done = pool.map([(c, task, seed) for c, task in cases])
    results = [{**r, "worker": w} for r, _, w in done]
    for (c, task), r in zip(cases, results):
        progress("solved", {"condition": c, "task": task.id, "solved": r["solved"]})
    return results, [sec for _, sec, _ in done], pool.stats.per_worker


def case(solvers: dict[str, Any], condition: str, task: Task, seed: int) -> dict[str, Any]:
    """One task under one condition: what a local run and a pool's worker both do."""
    if condition == "icl":
        return solvers["ttt-self"].solve(task, seed=seed, untrained=True)
    if condition == "ttt-oracle":
        return _oracle(solvers["ttt-self"], task, [Written((text,), parse(text)) for text in ORACLE], seed)
    return solvers[condition].solve(task, seed=seed)


@dataclass(frozen=True)
class Cases:
    """A pool's work for `eval arc`: (condition, task, seed) solved on the worker's
    replica, its recipes written by it too (torch) with the solvers' policy adapters."""

    solvers: dict[str, Any]  # condition -> a Solver, its model and writer left out (set per replica)

    def __call__(self, model, job: tuple[str, Task, int]) -> dict[str, Any]:
        condition, task, seed = job
        here = {c: dataclasses.replace(s, model=model, writer=model) for c, s in self.solvers.items()}
        return case(here, condition, task, seed)


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
