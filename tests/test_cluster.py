"""ReSTEM on a real local Ray instance: the same round locally and on a pool of
Ray actors gives the same rewards and decisions; a killed worker's candidates
are run again elsewhere; a pool that loses every worker, or a cluster that
cannot be reached, fails the round without touching the policy.

The rounds are on ARC tasks whose demonstrations share one 1x1 output: the
tiny model solves one only when a recipe trains hard enough, so the rewards
are real outcomes that differ between samples (test_arc_learning.py)."""

import json
import os
import signal
import threading
import time

import pytest
from click.testing import CliRunner
from conftest import write_config
from test_arc_learning import constant_task, task_file

from seal_agent.cli import main

ray = pytest.importorskip("ray")

COMMON = "[arc]\nbudget_s = 120\n[restem]\nheldout_fraction = 0.34\nheldout_contexts = 2\n"
# Both executors train with one thread, so their float sums (and so every greedy
# answer) are the same: a worker's torch threads are its cluster.worker_cpus.
ONE_THREAD = ["--set", "model.threads=1"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module (a real cluster of one node)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


def config(tmp_path, model_dir, name: str, cluster: str = ""):
    extra = COMMON + (f"[cluster]\n{cluster}\n" if cluster else "")
    return write_config(tmp_path / f"{name}.toml", model_dir, tmp_path / name, extra=extra), ONE_THREAD


def restem(cfg, sets, data, *extra, code: int = 0) -> dict | str:
    r = CliRunner().invoke(main, ["--config", str(cfg), *sets, "restem", "--domain", "arc", "--data", str(data),
                                  "--contexts", "3", "--samples", "3", *extra, "--json"], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return json.loads(r.stdout.splitlines()[-1]) if code == 0 else r.output


DECISIONS = ("contexts", "heldout_contexts", "samples", "winners", "heldout", "decision", "reason")


def decisions(rec: dict) -> dict:
    out = {k: rec[k] for k in DECISIONS}
    out["sft"] = {k: rec["sft"][k] for k in ("pairs", "steps", "epoch_losses")} if rec["sft"] else None
    out["rewards"] = [{k: r[k] for k in ("context", "sample", "before", "after", "gain", "reward")}
                      for r in rec["rewards"]]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return task_file(tmp_path_factory.mktemp("arc") / "tasks.json",
                     [constant_task(f"const{c}", c, c, answer=(c + 1) % 10) for c in (1, 4, 6, 7, 8, 9)])


@pytest.fixture(scope="module")
def here(tmp_path_factory, arc_tiny_dir, data):
    """The round run locally: what every Ray round of this module must equal."""
    local_cfg, sets = config(tmp_path_factory.mktemp("local"), arc_tiny_dir, "local")
    return restem(local_cfg, sets, data)


def test_a_round_on_ray_has_the_local_rounds_rewards_and_decisions(tmp_path, arc_tiny_dir, data, here):
    ray_cfg, sets = config(tmp_path, arc_tiny_dir, "ray", 'executor = "ray"\nworkers = 2')
    there = restem(ray_cfg, sets, data)
    assert here["executor"] == "local" and there["executor"] == "ray" and there["workers"] == 2
    assert decisions(there) == decisions(here)
    assert here["winners"], "no winner: the fixture no longer tests a decision"
    jobs = len(there["rewards"]) + 2 * len(there["heldout_contexts"])  # 1 seed; held-out: old and new policy
    per = there["per_worker"]
    assert sum(w["jobs"] for w in per.values()) == jobs and all(w["alive"] for w in per.values())
    assert set(per) == {"worker-0", "worker-1"} and all(w["jobs"] > 0 for w in per.values())
    assert {w for r in there["rewards"] for w in r["workers"]} <= set(per)
    assert there["reruns"] == [] and there["workers_lost"] == []


def _replica_pids() -> list[int]:
    """The pool's actor processes: Ray titles each `ray::_Replica...`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::_Replica"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _kill_workers(count: int, stop: threading.Event, after_s: float = 15.0) -> None:
    """SIGKILL `count` of the pool's actor processes once each has lived `after_s`
    seconds: past loading its replica (the pool starts in about 8 s here), so
    mid-round, while the round's jobs run (a round takes about a minute)."""
    seen: dict[int, float] = {}
    killed: set[int] = set()
    while not stop.is_set() and len(killed) < count:
        for pid in _replica_pids():
            seen.setdefault(pid, time.monotonic())
            if pid not in killed and len(killed) < count and time.monotonic() - seen[pid] >= after_s:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.2)


def test_a_killed_worker_has_its_candidates_rerun_and_the_round_decides_as_locally(tmp_path, arc_tiny_dir, data,
                                                                                   here):
    ray_cfg, sets = config(tmp_path, arc_tiny_dir, "ray", 'executor = "ray"\nworkers = 2')
    stop = threading.Event()
    killer = threading.Thread(target=_kill_workers, args=(1, stop), daemon=True)
    killer.start()
    try:
        there = restem(ray_cfg, sets, data)
    finally:
        stop.set()
        killer.join()
    assert len(there["workers_lost"]) == 1 and len(there["reruns"]) >= 1
    assert {r["worker"] for r in there["reruns"]} == set(there["workers_lost"])
    assert decisions(there) == decisions(here)  # nothing lost, nothing counted twice


def test_a_pool_that_loses_every_worker_fails_the_round_and_keeps_the_policy(tmp_path, arc_tiny_dir, data):
    ray_cfg, sets = config(tmp_path, arc_tiny_dir, "ray", 'executor = "ray"\nworkers = 1')
    stop = threading.Event()
    killer = threading.Thread(target=_kill_workers, args=(1, stop), daemon=True)
    killer.start()
    try:
        out = restem(ray_cfg, sets, data, code=1)
    finally:
        stop.set()
        killer.join()
    assert "stopped without a decision, the policy unchanged" in out
    # mid-round (a slower machine: while the pool starts, which fails it as well)
    why = "every worker of the pool died" if "every worker of the pool died" in out else "could not start"
    assert why in out
    _round_failed_policy_kept(ray_cfg, sets, why)


def test_a_cluster_that_cannot_be_reached_fails_at_once_saying_so(tmp_path, arc_tiny_dir, data):
    cfg, sets = config(tmp_path, arc_tiny_dir, "far", 'executor = "ray"\naddress = "127.0.0.1:1"\n'
                                                       "connect_timeout_s = 2")
    t0 = time.monotonic()
    out = restem(cfg, sets, data, code=1)
    assert time.monotonic() - t0 < 60
    assert "the Ray cluster at 127.0.0.1:1 cannot be reached" in out and "the policy is unchanged" in out
    _round_failed_policy_kept(cfg, sets, "cannot be reached")
    bad, _ = config(tmp_path, arc_tiny_dir, "bad", 'executor = "ray"\naddress = "nowhere"')
    assert "is not host:port" in restem(bad, sets, data, code=1)


def _round_failed_policy_kept(cfg, sets, why: str) -> None:
    from seal_agent.config import load_config
    from seal_agent.memory.state import State

    state = State(load_config(cfg).state_path("database"))
    [row] = state.query("SELECT decision, record FROM restem_rounds")
    assert row["decision"] == "failed" and why in json.loads(row["record"])["reason"]
    assert state.get_meta("policy_version:arc-recipe", "0") == "0"
    state.close()


def test_a_knowledge_round_runs_on_ray_and_refuses_the_retention_penalty(tmp_path, tiny_model_dir, squad_file):
    cfg, sets = config(tmp_path, tiny_model_dir, "k", 'executor = "ray"\nworkers = 2')
    args = ["--config", str(cfg), *sets, "--set", "replay.enabled=false", "restem", "--data", str(squad_file),
            "--contexts", "1", "--samples", "2", "--json"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.splitlines()[-1])
    assert rec["domain"] == "knowledge" and rec["executor"] == "ray" and len(rec["rewards"]) == 2
    r = CliRunner().invoke(main, ["--config", str(cfg), *sets, "--set", "restem.retention_penalty=0.5", "restem",
                                  "--data", str(squad_file), "--contexts", "1", "--samples", "1"])
    assert r.exit_code == 1 and "restem.retention_penalty needs the replay bank" in r.output


def test_eval_arc_on_ray_solves_the_cases_side_by_side_as_locally(tmp_path, arc_tiny_dir):
    tasks = [constant_task("a", 5, 2), constant_task("b", 8, 3)]
    data = task_file(tmp_path / "tasks.json", tasks)
    rows = {}
    for name, cluster in (("local", ""), ("ray", 'executor = "ray"\nworkers = 2')):
        cfg, sets = config(tmp_path, arc_tiny_dir, name, cluster)
        r = CliRunner().invoke(main, ["--config", str(cfg), *sets, "eval", "arc", "--data", str(data),
                                      "--conditions", "icl,ttt-self,ttt-oracle", "--out", str(tmp_path / name),
                                      "--json"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        rows[name] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        meta = json.loads((tmp_path / name / "results.json").read_text())
        assert meta["executor"] == name
    def same(row):  # what was decided, without the seconds and the worker
        tasks = [{"task": t["task"], "solved": t["solved"], "answers": t.get("answers"),
                  "verdicts": t.get("verdicts"), "self_edit": t["self_edit"],
                  "oracle": [(o["recipe"], o["solved"]) for o in t.get("oracle", [])]} for t in row["tasks"]]
        return {"condition": row["condition"], "solved": row["solved"], "failures": row["failures"], "tasks": tasks}

    assert [same(r) for r in rows["ray"]] == [same(r) for r in rows["local"]]
    assert rows["local"][2]["solved"] == 2  # the oracle solves both: a real outcome to agree on
    assert {t["worker"] for r in rows["ray"] for t in r["tasks"]} == {"worker-0", "worker-1"}


def test_eval_squad_and_cpt_on_ray_answer_as_locally(tmp_path, tiny_model_dir, squad_file):
    answers = {}
    for name, cluster in (("local", ""), ("ray", 'executor = "ray"\nworkers = 2')):
        cfg, sets = config(tmp_path, tiny_model_dir, name, cluster)
        for kind, conditions in (("squad", "base,passage,self,in-context"), ("cpt", "base,passage")):
            out = tmp_path / f"{name}-{kind}"
            r = CliRunner().invoke(main, ["--config", str(cfg), *sets, "eval", kind, "--data", str(squad_file),
                                          "--conditions", conditions, "--out", str(out), "--json"],
                                   catch_exceptions=False)
            assert r.exit_code == 0, r.output
            rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
            meta = json.loads((out / "results.json").read_text())
            assert meta["executor"] == name and [row["condition"] for row in rows] == conditions.split(",")
            answers[name, kind] = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
            if name == "ray":
                cases = 2 * 4 if kind == "squad" else 2  # passages x conditions; cpt: one update per condition
                assert sum(w["jobs"] for w in meta["per_worker"].values()) == cases == len(meta["cases"])
                assert all(sum(row["workers"].values()) == (2 if kind == "squad" else 1) for row in rows)
                if kind == "squad":
                    assert {c["worker"] for c in meta["cases"]} == {"worker-0", "worker-1"}
    for kind in ("squad", "cpt"):
        assert answers["ray", kind] == answers["local", kind]
        by = {}
        for a in answers["local", kind]:
            by.setdefault(a["condition"], []).append(a["prediction"])
        # the update changed the answers: a pool that skipped or misplaced it would differ from local
        assert by["passage"] != by["base"]


def test_bench_restem_times_one_round_locally_and_on_ray(tmp_path, tiny_model_dir):
    from conftest import SQUAD_DEV

    from seal_agent.config import load_config
    from seal_agent.evaluation.cluster import restem_executors, summary

    cfg = load_config(write_config(tmp_path / "b.toml", tiny_model_dir, tmp_path / "state",
                                   extra=f'[eval]\ndata = "{SQUAD_DEV}"\n'))
    r = restem_executors(cfg, log=lambda m: None)
    assert set(r["restem_executors"]) == {"local", "ray-1", "ray-2"}
    for name, o in r["restem_executors"].items():
        assert o["jobs"] == 2 * 2 + 2 and o["seconds_per_candidate"] > 0
        assert (o["pool_start_seconds"] is None) == (name == "local")
    assert r["restem_executors"]["ray-2"]["per_worker"].keys() == {"worker-0", "worker-1"}
    assert r["ray_1_per_candidate_ratio"] == round(r["restem_executors"]["ray-1"]["seconds_per_candidate"]
                                                   / r["restem_executors"]["local"]["seconds_per_candidate"], 3)
    assert isinstance(r["same_rewards"], bool) and "Ray's per-candidate cost over local" in summary(r)
