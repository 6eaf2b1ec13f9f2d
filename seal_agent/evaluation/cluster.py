"""`seal-agent bench --part restem`: one small ReSTEM round, locally and on a
local Ray instance with 1 and 2 workers, side by side in one run.

The round is the knowledge domain's on the first passages of `eval.data`
(2 training contexts x 2 samples, 1 held-out context compared for two policy
versions: 6 inner loops), each executor in a scratch state of its own, so all
three start from the same weights and seeds. The local round trains with
torch's threads (one per core); one Ray worker gets every core, two get half
each, so that the comparison is of where the work runs, not of threads.

A candidate's cost is the round's "candidates" stage (the wall time of its
jobs as the round sees them: handed out, trained and scored, results back)
divided by its jobs: `ray_overhead_1` is one worker's over local's (what Ray
adds per candidate: dispatch, results, the actor's own process). The start of
the pool (actors, the weights shipped) is reported apart, and so is the ratio
of the whole training stages (reward and held-out test, which include this
process's own sampling and scoring).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import SealError
from .scratch import scratch_config

CONTEXTS, SAMPLES, HELDOUT = 2, 2, 1


def restem_executors(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    from ..agent import SealAgent

    if cfg.eval_data is None or not cfg.eval_data.exists():
        raise SealError("bench --part restem needs eval.data (a SQuAD-style file) for its round's passages")
    cores = os.cpu_count() or 1
    runs = {"local": {"executor": "local"},
            "ray-1": {"executor": "ray", "workers": 1, "worker_cpus": float(cores)},
            "ray-2": {"executor": "ray", "workers": 2, "worker_cpus": max(1.0, cores / 2)}}
    out: dict[str, Any] = {}
    for name, cluster in runs.items():
        log(f"restem round: {name} ...")
        with tempfile.TemporaryDirectory() as tmp:
            scratch = scratch_config(cfg, Path(tmp) / "state", cluster=cluster, replay={"enabled": False},
                                     restem={"heldout_fraction": 0.5, "heldout_contexts": HELDOUT})
            agent = SealAgent(scratch)
            try:
                agent.live  # noqa: B018 - loaded outside the timed part
                rec = agent.restem(contexts=CONTEXTS, samples=SAMPLES, seeds=1, data=[cfg.eval_data])
            finally:
                agent.close()
        jobs = len(rec["rewards"]) + 2 * len(rec["heldout_contexts"])
        stages = rec["stage_seconds"]
        training = stages.get("reward", 0.0) + stages.get("heldout", 0.0)
        out[name] = {"jobs": jobs, "seconds": rec["seconds"], "stage_seconds": stages,
                     "seconds_per_candidate": round(stages.get("candidates", 0.0) / jobs, 2) if jobs else None,
                     "training_seconds_per_candidate": round(training / jobs, 2) if jobs else None,
                     "pool_start_seconds": rec.get("pool_start_seconds"), "per_worker": rec.get("per_worker"),
                     "decision": rec["decision"], "rewards": [r["reward"] for r in rec["rewards"]]}
    result: dict[str, Any] = {"restem_executors": out, "cores": cores}
    for key, label in (("seconds_per_candidate", "per_candidate"), ("training_seconds_per_candidate", "training")):
        local = out["local"][key]
        for name in ("ray-1", "ray-2"):
            per = out[name][key]
            result[f"{name.replace('-', '_')}_{label}_ratio"] = round(per / local, 3) if local and per else None
    result["ray_overhead_1"] = (round(result["ray_1_per_candidate_ratio"] - 1, 3)
                                if result["ray_1_per_candidate_ratio"] is not None else None)
    result["same_rewards"] = len({tuple(o["rewards"]) for o in out.values()}) == 1
    return result


def summary(result: dict[str, Any]) -> str:
    r = result["restem_executors"]
    head = f"ReSTEM round ({CONTEXTS} contexts x {SAMPLES} samples + {HELDOUT} held-out x 2 policies)"
    lines = [f"{head}, {result['cores']} cores:"]
    for name, o in r.items():
        start = f", pool start {o['pool_start_seconds']:.1f} s" if o["pool_start_seconds"] is not None else ""
        lines.append(f"  {name:6s} {o['jobs']} candidates, {o['seconds_per_candidate']:.2f} s each, "
                     f"round {o['seconds']:.0f} s{start}")
    lines.append(f"  Ray's per-candidate cost over local: 1 worker {result['ray_1_per_candidate_ratio']}x, "
                 f"2 workers {result['ray_2_per_candidate_ratio']}x (the training stages: "
                 f"{result['ray_1_training_ratio']}x, {result['ray_2_training_ratio']}x); "
                 f"same rewards: {result['same_rewards']}")
    return "\n".join(lines)
