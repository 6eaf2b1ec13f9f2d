"""A ReSTEM refresh as seal-agent runs it: the I/O around the loop in loop.py.

Gathers a domain's contexts (knowledge: the replay bank's learned passages,
newest first, plus SQuAD-style files from --data or restem.data; ARC: the
tasks the daemon has solved, plus task files from --data or arc.data), splits
off the held-out slice,
copies the live weights into a scratch model (the live model is never
updated by a refresh), runs the round, stores a promoted adapter as the next
policy version, and records the round in the round log (rounds.py). What a
round uses is handed in (`RoundDeps`, built by the composition root).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arc.grids import GridError, Task, load_tasks
from ..arc.writing import RecipePolicy
from ..config import Config, RestemConfig
from ..documents import read_qa_passages
from ..errors import SealError
from ..memory.policy_versions import PolicyVersions
from ..memory.replay import ReplayBank
from ..memory.state import State
from ..model.loader import context_length, train_dtype
from ..policy import Policy
from ..progress import Progress
from . import loop as restem
from .arc import ArcDomain
from .arc import contexts as arc_contexts
from .knowledge import KnowledgeContext, KnowledgeDomain, bank_contexts, file_contexts
from .rounds import RoundLog


@dataclass(frozen=True)
class RoundDeps:
    """What a round uses."""

    cfg: Config
    state: State  # the live version's lineage and the passages the bank refers to
    rounds: RoundLog
    versions: PolicyVersions  # the line of policy versions the round extends (its policy's name)
    model: Any  # the live weights: copied into a scratch model, never changed themselves
    tokenizer: Any
    knowledge_version: int  # the version `model` holds
    sampler: Any = None  # what writes the candidates: a vLLM view on the live weights, or None (`model`)
    # Where the candidates are trained and scored: (domain, scratch model) -> a pool
    # of workers (cluster/pool.py), closed after the round; None: on the scratch model.
    executor: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class ContextPool:
    """A domain and the contexts a round chooses from."""

    domain: restem.Domain
    contexts: list[Any]
    facts: dict[str, Any] = field(default_factory=dict)  # for the record (contexts refused, say)


def round_config(base: RestemConfig, *, contexts: int | None, samples: int | None,
                 seeds: int | None) -> RestemConfig:
    """`base` with the caller's overrides, each checked."""
    rcfg = copy.copy(base)
    rcfg.contexts = contexts if contexts is not None else rcfg.contexts
    rcfg.samples = samples if samples is not None else rcfg.samples
    rcfg.seeds = seeds if seeds is not None else rcfg.seeds
    for name, value in (("contexts", rcfg.contexts), ("samples", rcfg.samples), ("seeds", rcfg.seeds)):
        if value < 1:
            raise SealError(f"restem {name} must be at least 1, got {value}")
    return rcfg


def data_contexts(paths: list[Path], max_questions: int) -> list[KnowledgeContext]:
    return [c for path in paths
            for c in file_contexts(read_qa_passages(path, "ReSTEM"), Path(path).name, max_questions)]


def knowledge_pool(deps: RoundDeps, rcfg: RestemConfig, policy: Policy, bank: ReplayBank | None,
                   data: list[Path]) -> ContextPool:
    """The replay bank's learned passages (newest first), then the passages of `data`
    (default: restem.data)."""
    cfg = deps.cfg
    data = data or [cfg.root / p for p in rcfg.data]
    lineage = deps.state.lineage(deps.knowledge_version)
    contexts = (bank_contexts(deps.state, bank, lineage, rcfg.max_questions) if bank is not None else []) \
        + data_contexts(data, rcfg.max_questions)
    return ContextPool(KnowledgeDomain(cfg, deps.tokenizer, policy, bank, lineage, deps.knowledge_version), contexts)


def arc_pool(deps: RoundDeps, policy: RecipePolicy, solved: list[tuple[Task, int]], data: list[Path]) -> ContextPool:
    """The tasks the daemon has solved (`solved`: each with its recency, newest
    first), then the tasks of `data` (default: arc.data). A task that cannot be a
    context (one demonstration, over the model's context) is left out, with why."""
    cfg = deps.cfg
    data = data or [cfg.root / p for p in cfg.arc.data]
    context = context_length(deps.model, deps.tokenizer)
    use_chat = cfg.model.use_chat_template
    pool, refused = [], []
    for task, recency in solved:
        ok, left = arc_contexts([task], "inbox", deps.tokenizer, context, use_chat)
        pool += [dataclasses.replace(c, recency=recency) for c in ok]
        refused += left
    for path in data:
        try:
            tasks = load_tasks(path)
        except GridError as e:
            raise SealError(f"ReSTEM's ARC data {path}: {e}") from None
        ok, left = arc_contexts(tasks, Path(path).name, deps.tokenizer, context, use_chat)
        pool += ok
        refused += left
    unique: dict[str, Any] = {}
    for c in pool:  # a task given twice is one context: its first (newest) appearance
        unique.setdefault(c.id, c)
    return ContextPool(ArcDomain(cfg, deps.tokenizer, policy), list(unique.values()), {"refused_contexts": refused})


def run_round(deps: RoundDeps, rcfg: RestemConfig, pool: ContextPool, *, should_stop: Callable[[], bool],
              progress: Progress) -> dict[str, Any]:
    """One round of `pool`'s domain with the settings `rcfg` (see `round_config`); returns its record."""
    cfg = deps.cfg
    t0 = time.perf_counter()
    versions = deps.versions
    policy = versions.policy
    train_ctx, heldout_ctx = restem.select(pool.contexts, deps.rounds.uses(policy), rcfg.contexts,
                                           rcfg.heldout_contexts, rcfg.heldout_fraction)
    parent = versions.active()
    round_id, started = deps.rounds.start(policy)
    settings = restem.Settings(restem=rcfg, lora=cfg.lora, train=cfg.train, train_dtype=train_dtype(cfg),
                               seed=cfg.model.seed + round_id)
    scratch = copy.deepcopy(deps.model)  # every candidate is put on and taken off this copy
    work = Path(tempfile.mkdtemp(prefix=f".restem-{round_id}-", dir=cfg.state_dir))
    executor = None
    try:
        try:
            executor = deps.executor(pool.domain, scratch) if deps.executor is not None else None
            rnd = restem.refresh(pool.domain, scratch, deps.tokenizer, train_ctx, heldout_ctx, settings,
                                 versions.adapter_dir(parent), work, should_stop=should_stop, progress=progress,
                                 sampler=deps.sampler, executor=executor)
        except SealError as e:  # a cluster lost, unreachable: the round ends without a decision
            reason = f"{e}; round {round_id} stopped without a decision, the policy unchanged"
            facts = executor_facts(executor) if executor is not None else {"executor": cfg.cluster.executor}
            deps.rounds.fail(round_id, reason, facts)
            raise SealError(reason) from None
        record = {"round": round_id, "policy": policy, "domain": pool.domain.name, "started_at": started,
                  "knowledge_version": deps.knowledge_version, "parent_policy_version": parent,
                  "reward_kind": rcfg.reward, "samples_per_context": rcfg.samples, "seeds": rcfg.seeds,
                  "pool": len(pool.contexts), **pool.facts, **executor_facts(executor), **rnd.as_dict()}
        version = parent
        if rnd.decision == "promoted":
            manifest = {k: record[k] for k in ("knowledge_version", "reward_kind", "heldout", "sft", "reason")}
            manifest["winners"] = len(rnd.winners)
            manifest["contexts"] = [c["id"] for c in rnd.contexts]
            version = versions.promote(rnd.candidate, manifest, round_id)
        elif rnd.candidate is not None:
            record["candidate_dir"] = str(versions.keep_rejected(rnd.candidate, round_id, rnd.reason))
        record["policy_version"] = version
        record["seconds"] = round(time.perf_counter() - t0, 2)
        deps.rounds.finish(record)
        return record
    finally:
        if executor is not None:
            executor.close()
        shutil.rmtree(work, ignore_errors=True)


def executor_facts(executor) -> dict[str, Any]:
    """Where the round's candidates ran, for its record: here, or which worker ran
    what, for how long, and which jobs were run again after a worker died."""
    stats = getattr(executor, "stats", None)
    if stats is None:
        return {"executor": "local", "workers": 1}
    return {"executor": stats.executor, "workers": stats.workers, "cluster_address": stats.address,
            "per_worker": stats.per_worker, "reruns": stats.reruns, "workers_lost": stats.lost,
            "pool_start_seconds": stats.start_seconds}
