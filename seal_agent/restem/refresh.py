"""A ReSTEM refresh as seal-agent runs it: the I/O around the loop in loop.py.

Gathers contexts (the replay bank's learned passages, newest first, plus
SQuAD-style files from --data or restem.data), splits off the held-out slice,
copies the live weights into a scratch model (the live model is never
updated by a refresh), runs the round, stores a promoted adapter as the next
policy version, and records the round in the round log (rounds.py). What a
round uses is handed in (`RoundDeps`, built by the composition root).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, RestemConfig
from ..documents import read_qa_passages
from ..errors import SealError
from ..memory.policy_versions import PolicyVersions
from ..memory.replay import ReplayBank
from ..memory.state import State
from ..model.loader import train_dtype
from ..policy import Policy
from ..progress import Progress
from . import loop as restem
from .knowledge import KnowledgeContext, KnowledgeDomain, bank_contexts, file_contexts
from .rounds import RoundLog


@dataclass(frozen=True)
class RoundDeps:
    """What a round uses."""

    cfg: Config
    state: State  # the live version's lineage and the passages the bank refers to
    rounds: RoundLog
    policy: Policy  # the active policy file, whose line of versions the round extends
    versions: PolicyVersions
    model: Any  # the live weights: copied into a scratch model, never changed themselves
    tokenizer: Any
    knowledge_version: int  # the version `model` holds
    bank: ReplayBank | None  # None: replay is off, the contexts come from files only
    sampler: Any = None  # what writes the candidates: a vLLM view on the live weights, or None (`model`)


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


def run_round(deps: RoundDeps, rcfg: RestemConfig, *, data: list[Path], should_stop: Callable[[], bool],
              progress: Progress) -> dict[str, Any]:
    """One round with the settings `rcfg` (see `round_config`); returns its record."""
    cfg = deps.cfg
    data = data or [cfg.root / p for p in rcfg.data]
    t0 = time.perf_counter()
    versions = deps.versions
    policy = deps.policy.name
    lineage = deps.state.lineage(deps.knowledge_version)
    bank = deps.bank
    pool = (bank_contexts(deps.state, bank, lineage, rcfg.max_questions) if bank is not None else []) \
        + data_contexts(data, rcfg.max_questions)
    train_ctx, heldout_ctx = restem.select(pool, deps.rounds.uses(policy), rcfg.contexts, rcfg.heldout_contexts,
                                           rcfg.heldout_fraction)
    parent = versions.active()
    round_id, started = deps.rounds.start(policy)
    domain = KnowledgeDomain(cfg, deps.tokenizer, deps.policy, bank, lineage, deps.knowledge_version)
    settings = restem.Settings(restem=rcfg, lora=cfg.lora, train=cfg.train, train_dtype=train_dtype(cfg),
                               seed=cfg.model.seed + round_id)
    scratch = copy.deepcopy(deps.model)  # every candidate is put on and taken off this copy
    work = Path(tempfile.mkdtemp(prefix=f".restem-{round_id}-", dir=cfg.state_dir))
    try:
        rnd = restem.refresh(domain, scratch, deps.tokenizer, train_ctx, heldout_ctx, settings,
                             versions.adapter_dir(parent), work, should_stop=should_stop, progress=progress,
                             sampler=deps.sampler)
        record = {"round": round_id, "policy": policy, "started_at": started,
                  "knowledge_version": deps.knowledge_version, "parent_policy_version": parent,
                  "reward_kind": rcfg.reward, "samples_per_context": rcfg.samples, "seeds": rcfg.seeds,
                  "pool": len(pool), **rnd.as_dict()}
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
        shutil.rmtree(work, ignore_errors=True)
