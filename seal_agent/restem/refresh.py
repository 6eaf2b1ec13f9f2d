"""A ReSTEM refresh as seal-agent runs it: the I/O around the loop in restem.py.

Gathers contexts (the replay bank's learned passages, newest first, plus
SQuAD-style files from --data or restem.data), splits off the held-out slice,
copies the live weights into a scratch model (the live model is never
updated by a refresh), runs the round, stores a promoted adapter as the next
policy version, and records the round (table restem_rounds, event
restem.round) and how often each context has been used.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..documents import read_qa_passages
from ..errors import SealError
from ..memory.state import now
from ..model.loader import train_dtype
from . import loop as restem
from .knowledge import KnowledgeContext, KnowledgeDomain, bank_contexts, file_contexts

if TYPE_CHECKING:
    from ..agent import SealAgent


def data_contexts(paths: list[Path], max_questions: int) -> list[KnowledgeContext]:
    return [c for path in paths
            for c in file_contexts(read_qa_passages(path, "ReSTEM"), Path(path).name, max_questions)]


def _uses(agent: SealAgent, policy: str) -> dict[str, int]:
    rows = agent.state.query("SELECT context_id, uses FROM restem_contexts WHERE policy = ?", (policy,))
    return {r["context_id"]: r["uses"] for r in rows}


def run_round(agent: SealAgent, *, contexts: int | None, samples: int | None, seeds: int | None,
              data: list[Path], should_stop: Callable[[], bool], progress: restem.Progress) -> dict[str, Any]:
    cfg = agent.cfg
    rcfg = copy.copy(cfg.restem)
    rcfg.contexts = contexts if contexts is not None else rcfg.contexts
    rcfg.samples = samples if samples is not None else rcfg.samples
    rcfg.seeds = seeds if seeds is not None else rcfg.seeds
    for name, value in (("contexts", rcfg.contexts), ("samples", rcfg.samples), ("seeds", rcfg.seeds)):
        if value < 1:
            raise SealError(f"restem {name} must be at least 1, got {value}")
    data = data or [cfg.root / p for p in rcfg.data]
    t0 = time.perf_counter()
    versions = agent.policy_versions
    policy = agent.policy.name
    live = agent.live
    lineage = agent.state.lineage(live.version)
    bank = agent.bank if cfg.replay.enabled else None
    pool = (bank_contexts(agent.state, bank, lineage, rcfg.max_questions) if bank is not None else []) \
        + data_contexts(data, rcfg.max_questions)
    train_ctx, heldout_ctx = restem.select(pool, _uses(agent, policy), rcfg.contexts, rcfg.heldout_contexts,
                                           rcfg.heldout_fraction)
    parent = versions.active()
    started = now()
    round_id = agent.state.write(
        "INSERT INTO restem_rounds(policy, started_at, decision) VALUES (?, ?, 'interrupted')",
        (policy, started), None)
    domain = KnowledgeDomain(cfg, live.tokenizer, agent.policy, bank, lineage, live.version)
    settings = restem.Settings(restem=rcfg, lora=cfg.lora, train=cfg.train, train_dtype=train_dtype(cfg),
                               seed=cfg.model.seed + round_id)
    scratch = copy.deepcopy(live.model)  # every candidate is put on and taken off this copy
    work = Path(tempfile.mkdtemp(prefix=f".restem-{round_id}-", dir=cfg.state_dir))
    try:
        rnd = restem.refresh(domain, scratch, live.tokenizer, train_ctx, heldout_ctx, settings,
                             versions.adapter_dir(parent), work, should_stop=should_stop, progress=progress)
        record = {"round": round_id, "policy": policy, "started_at": started, "knowledge_version": live.version,
                  "parent_policy_version": parent, "reward_kind": rcfg.reward, "samples_per_context": rcfg.samples,
                  "seeds": rcfg.seeds, "pool": len(pool), **rnd.as_dict()}
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
        used = [c["id"] for c in rnd.contexts]
        with agent.state.transaction() as c:
            c.execute("UPDATE restem_rounds SET finished_at = ?, decision = ?, policy_version = ?, record = ?"
                      " WHERE id = ?", (now(), rnd.decision, version, json.dumps(record), round_id))
            for cid in used:
                c.execute("INSERT INTO restem_contexts(policy, context_id, uses, last_round) VALUES (?, ?, 1, ?)"
                          " ON CONFLICT(policy, context_id) DO UPDATE SET uses = uses + 1,"
                          " last_round = excluded.last_round", (policy, cid, round_id))
            agent.state.event(
                "restem.round", f"ReSTEM round {round_id} ({policy}): {rnd.decision}, policy version {version}"
                f" ({len(rnd.winners)} winners of {len(used)} contexts); {rnd.reason}", conn=c,
                data={"round": round_id, "decision": rnd.decision, "policy_version": version,
                      "heldout": rnd.heldout, "winners": len(rnd.winners)})
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rounds(agent: SealAgent, limit: int = 20) -> list[dict[str, Any]]:
    rows = agent.state.query("SELECT * FROM restem_rounds ORDER BY id DESC LIMIT ?", (limit,))
    return [{"round": r["id"], "policy": r["policy"], "started_at": r["started_at"],
             "finished_at": r["finished_at"], "decision": r["decision"], "policy_version": r["policy_version"]}
            for r in rows]
