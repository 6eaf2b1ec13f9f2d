"""A pool of Ray actors that train and score ReSTEM's candidates.

Each actor holds one replica of the round's weights (shipped once through
Ray's object store) and the round's domain, and runs jobs exactly as the
local executor does (`restem.loop.run_job`: the update put on, scored, taken
off), so the same jobs with the same seeds give the same outcomes wherever
they run. The pool hands each idle actor the next job; a job whose actor dies
is run again on another one, and the rerun is recorded. With every actor
gone, the jobs left fail the round with `ClusterError`: nothing is decided on
a part of the results.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from ..config import ClusterConfig, Config
from ..errors import SealError
from ..restem.loop import Job, Outcome, run_job


class ClusterError(SealError):
    """The cluster cannot be reached, or lost every worker mid-round."""


def _reachable(address: str, timeout: float) -> None:
    """A "host:port" or "ray://host:port" address answers a TCP connect, or ClusterError.
    (Ray itself retries an unreachable address for minutes before it gives up.)"""
    target = urlparse(address if "://" in address else f"tcp://{address}")
    if target.hostname is None or target.port is None:
        raise ClusterError(f"cluster.address {address!r} is not host:port, ray://host:port, auto or empty")
    try:
        socket.create_connection((target.hostname, target.port), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"the Ray cluster at {address} cannot be reached ({e.strerror or e}); the refresh "
                           f"did not run and the policy is unchanged (cluster.address, or cluster.executor = "
                           f'"local")') from None


def connect(cfg: ClusterConfig) -> None:
    """Ray, started here (address "") or joined."""
    try:
        import ray
    except ImportError:
        raise ClusterError('cluster.executor = "ray" needs Ray: pip install \'seal-agent[cluster]\' '
                           "(make setup installs it)") from None
    address = cfg.address or None
    if address not in (None, "auto"):  # checked even when this process has joined one already
        _reachable(address, cfg.connect_timeout_s)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "logging_level": "warning"}
    if address is None:  # a Ray instance of this machine for this process: room for the pool
        kwargs["num_cpus"] = max(os.cpu_count() or 1, int(cfg.workers * cfg.worker_cpus + 0.999))
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"cannot join the Ray cluster ({address or 'local'}): {e}; the refresh did not run "
                           "and the policy is unchanged") from None


@dataclass(frozen=True)
class Rewards:
    """A ReSTEM pool's work: a job trained and scored as the local executor does."""

    domain: Any  # the domain's portable() copy

    def __call__(self, model, job: Job) -> tuple[float, float | None]:
        return run_job(self.domain, model, job)


class _Replica:
    """A Ray actor's state: the weights and the work it does with them, built once."""

    def __init__(self, cfg: Config, base_dir, weights, work: Callable[[Any, Any], Any], threads: int):
        import torch

        from ..model.loader import load_model

        self.model = load_model(base_dir, cfg)
        torch.set_num_threads(max(1, threads))  # the worker's CPUs, whatever model.threads says
        self.model.load_state_dict(weights)
        self.model.eval()
        self.work = work

    def pid(self) -> int:
        return os.getpid()

    def run(self, job) -> tuple[Any, float]:
        t0 = time.perf_counter()
        result = self.work(self.model, job)
        return result, round(time.perf_counter() - t0, 2)


@dataclass
class _Worker:
    name: str
    actor: Any
    jobs: int = 0
    seconds: float = 0.0


@dataclass
class PoolStats:
    executor: str = "ray"
    address: str = ""
    workers: int = 0
    per_worker: dict[str, dict[str, Any]] = field(default_factory=dict)
    reruns: list[dict[str, Any]] = field(default_factory=list)  # jobs whose worker died, run again elsewhere
    lost: list[str] = field(default_factory=list)  # workers that died
    start_seconds: float = 0.0  # starting the actors and shipping the weights


class RayPool:
    """Jobs on Ray actors, each with a replica of `model` and the `work` to do with it
    (`Rewards`: an `Executor` of restem.loop)."""

    def __init__(self, cfg: Config, base_dir, model, work: Callable[[Any, Any], Any]):
        import ray

        connect(cfg.cluster)
        c = cfg.cluster
        t0 = time.perf_counter()
        weights = ray.put({k: v.detach().clone() for k, v in model.state_dict().items()})
        actor = ray.remote(num_cpus=c.worker_cpus, num_gpus=c.worker_gpus, max_restarts=0)(_Replica)
        threads = max(1, int(c.worker_cpus))
        self.workers = [_Worker(f"worker-{i}", actor.remote(cfg, base_dir, weights, work, threads))
                        for i in range(c.workers)]
        self.stats = PoolStats(address=c.address or "local", workers=c.workers)
        failures = []
        for w in self.workers:  # every replica built before the first job; one that dies now is lost
            try:
                ray.get(w.actor.pid.remote())
            except ray.exceptions.RayError as e:
                self.stats.lost.append(w.name)
                failures.append(f"{w.name}: {str(e).splitlines()[0]}")
        if len(self.stats.lost) == len(self.workers):
            self.close()
            raise ClusterError(f"the pool's workers could not start ({'; '.join(failures)})")
        self.stats.start_seconds = round(time.perf_counter() - t0, 2)

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """ReSTEM's jobs (with `Rewards` as the work): their outcomes, in order."""
        return [Outcome(score, forgot, seconds, worker) for (score, forgot), seconds, worker in self.map(jobs)]

    def map(self, jobs: list[Any]) -> list[tuple[Any, float, str]]:
        """Every job's result, seconds and worker, in the order given; a job whose
        worker died is run again on another."""
        import ray

        todo = collections.deque(enumerate(jobs))
        idle = collections.deque(w for w in self.workers if w.name not in self.stats.lost)
        running: dict[Any, tuple[_Worker, int, Job]] = {}
        out: list[tuple[Any, float, str] | None] = [None] * len(jobs)
        while todo or running:
            while todo and idle:
                w = idle.popleft()
                i, job = todo.popleft()
                running[w.actor.run.remote(job)] = (w, i, job)
            if not running:
                done = sum(o is not None for o in out)
                raise ClusterError(f"every worker of the pool died ({', '.join(self.stats.lost)}): {done} of "
                                   f"{len(jobs)} jobs done, the rest cannot run")
            [ref], _ = ray.wait(list(running), num_returns=1)
            w, i, job = running.pop(ref)
            try:
                result, seconds = ray.get(ref)
            except ray.exceptions.RayActorError:
                self.stats.lost.append(w.name)
                self.stats.reruns.append({"job": i, "worker": w.name})
                todo.appendleft((i, job))
                continue
            except ray.exceptions.RayTaskError as e:  # the job itself failed: as it would have locally
                raise e.as_instanceof_cause() from None
            w.jobs += 1
            w.seconds += seconds
            out[i] = (result, seconds, w.name)
            idle.append(w)
        self.stats.per_worker = {w.name: {"jobs": w.jobs, "seconds": round(w.seconds, 2),
                                          "alive": w.name not in self.stats.lost} for w in self.workers}
        return out  # type: ignore[return-value]

    def close(self) -> None:
        import ray

        for w in self.workers:
            with contextlib.suppress(Exception):  # a dead actor is already gone
                ray.kill(w.actor)


@contextlib.contextmanager
def pool_if_asked(cfg: Config, base_dir, model, work: Callable[[Any, Any], Any]) -> Iterator[RayPool | None]:
    """A pool doing `work` on replicas of `model` when cluster.executor = "ray",
    closed after the block; None (the work is done here) otherwise."""
    if cfg.cluster.executor != "ray":
        yield None
        return
    pool = RayPool(cfg, base_dir, model, work)
    try:
        yield pool
    finally:
        pool.close()
