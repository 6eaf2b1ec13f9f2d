"""Consolidation: the modules folded into new consolidated weights, in bulk.

The slow memory (`seal-agent consolidate`, or `schedule.consolidate` in the
daemon, with `memory.mode = "modules"`):
  1. one LoRA is trained on the stored training data of every module of the
     live line (each passage with its accepted self-edit, as it was learned:
     the routed modules, and those absorbed before, whose rehearsal keeps what
     the weights already hold) on a copy of the live consolidated weights, and
     merged into that copy (the live weights are not touched until it goes live);
  2. per routed module, the new weights alone answer its documents' replay QAs:
     a document now answered at least as well as by its module (the module's
     recorded answers) is *absorbed*: its module leaves the routing table (and
     stays on disk). The others keep their modules, re-checked on the new
     weights; with `memory.retrain_kept` each kept module is trained again on
     the new weights instead, from its stored data with its seed, under a new
     id (a module's delta does not carry over to other weights; retraining
     it there did not help either: BENCHMARKS.md);
  3. it goes live only if the documents absorbed before (held by the weights,
     with no module) lose at most `memory.max_forgetting` of the replay answers
     the old weights knew, and no kept module (retrained) loses more than that
     of its answers; otherwise the copy and the retrained modules are dropped;
  4. a live consolidation is a version of its own: the merged adapter in the
     adapter log (knowledge/vNNNN) and the retrained modules' directories are
     in place before the database makes it live with the new routing table and
     the new modules' rows, in one transaction.
It yields to waiting documents (`should_stop`, between training steps, its own
and the retrained modules'): the weights stay as they were and nothing is
recorded but the event.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import Config, to_dict
from ..errors import TrainingDiverged
from ..memory.knowledge import routed_modules
from ..memory.live import LiveModel, fingerprints
from ..memory.modules import Module, ModuleStore, new_module
from ..memory.replay import BankQA, ReplayBank
from ..memory.state import State, VersionRow, now
from ..model.inner_loop import Example, Merged, applied, train_adapter
from ..model.loader import compute_dtypes
from ..policy import Policy
from ..progress import Progress, no_progress
from ..qa import answering as qa_mod
from .learner import passage_seed


class _Yielded(Exception):
    """A document is waiting: the consolidation stops where it is."""


class _Refused(Exception):
    """The checks refuse the new weights: their staged directory is dropped."""


def lost_share(before: dict[int, bool], after: dict[int, bool]) -> float:
    """Share of the answers known before that are wrong after (0 when none was known)."""
    known = [i for i, ok in before.items() if ok]
    return sum(not after.get(i, False) for i in known) / len(known) if known else 0.0


def accuracy(marks: dict[int, bool]) -> float | None:
    return sum(marks.values()) / len(marks) if marks else None


def absorbs(module: dict[int, bool], alone: dict[int, bool]) -> bool:
    """A document is absorbed when the new weights alone answer its QAs at least
    as well as its module did (a document without QAs cannot show it: kept)."""
    return bool(module) and accuracy(alone) >= accuracy(module)


@dataclass
class Verdict:
    absorbed: list[int]
    kept: list[int]
    held_lost: float  # share of the held documents' known answers the new weights lose
    worst_kept: float  # the largest share a kept module loses on the new weights
    refused: bool
    checks: list[dict[str, Any]]


def decide(module_before: dict[int, dict[int, bool]], alone: dict[int, dict[int, bool]],
           rechecked: dict[int, dict[int, bool]], held_before: dict[int, bool], held_after: dict[int, bool],
           limit: float) -> Verdict:
    """Consolidation's decision, from correctness per QA id: each routed module's
    recorded answers (`module_before`), the new weights' alone (`alone`), the
    kept modules' on the new weights (`rechecked`), and the held documents'
    answers from the old and new weights."""
    absorbed, kept, checks = [], [], []
    for m, before in module_before.items():
        check = {"module": m, "n": len(before), "module_accuracy": accuracy(before),
                 "weights_accuracy": accuracy(alone[m])}
        if absorbs(before, alone[m]):
            absorbed.append(m)
            checks.append({**check, "decision": "absorbed"})
        else:
            kept.append(m)
            again = rechecked.get(m, {})
            checks.append({**check, "rechecked_accuracy": accuracy(again),
                           "lost": round(lost_share(before, again), 4), "decision": "kept"})
    held_lost = lost_share(held_before, held_after)
    worst_kept = max((c["lost"] for c in checks if c["decision"] == "kept"), default=0.0)
    return Verdict(absorbed, kept, held_lost, worst_kept, held_lost > limit or worst_kept > limit, checks)


class Consolidation:
    def __init__(self, cfg: Config, state: State, live: LiveModel, store: ModuleStore, bank: ReplayBank,
                 policy: Policy):
        self.cfg, self.state, self.live, self.store = cfg, state, live, store
        self.bank, self.policy = bank, policy
        self.dtypes = compute_dtypes(cfg)

    # -- what it trains on, what it checks ---------------------------------
    def line_modules(self, version: int) -> list[Module]:
        """Every module learned on `version`'s line, routed or absorbed, oldest first."""
        rows = [self.state.version(v) for v in self.state.lineage(version)]
        ids = [row.stats["module"] for row in rows if row.stats.get("kind") == "module"]
        return self.store.of(ids)

    def examples(self, modules: list[Module]) -> list[Example]:
        out: list[Example] = []
        for m in modules:
            for h in m.passage_hashes:
                row = self.state.passage(h)
                if row is None:
                    continue
                accepted = [e for e in self.state.self_edits(h) if e["outcome"] == "accepted"]
                out += self.policy.examples(accepted[-1]["text"] if accepted else "", row["title"], row["text"])
        return out

    @staticmethod
    def qas(module: Module, active: list[BankQA]) -> list[BankQA]:
        """The module's passages' QAs among the line's `active` ones."""
        hashes = set(module.passage_hashes)
        return [q for q in active if q.passage_hash in hashes]

    def _marks(self, model, qas: list[BankQA]) -> dict[int, bool]:
        scored = qa_mod.evaluate(model, self.live.tokenizer, [q.as_question() for q in qas], self.cfg.qa,
                                 use_chat=self.cfg.model.use_chat_template, compute_dtype=self.dtypes.answer,
                                 until_correct=True)
        return {q.id: s.correct for q, s in zip(qas, scored)}

    def _with_module(self, model, module: Module, qas: list[BankQA]) -> dict[int, bool]:
        with applied(model, self.store.path(module.id)) as m:
            return self._marks(m, qas)

    # -- the run -----------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] = lambda: False, progress: Progress = no_progress,
            ) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.live.ensure_loaded()
        parent = self.live.version
        routed = routed_modules(self.state, parent)
        if not routed:
            return {"decision": "nothing", "reason": "no module is routed: nothing to consolidate",
                    "version": parent}
        lineage = self.state.lineage(parent)
        line = self.line_modules(parent)
        # Held: absorbed by an earlier consolidation (a module retrained there is
        # routed under a new id, for the same passages).
        routed_passages = {h for m in self.store.of(routed) for h in m.passage_hashes}
        held = [m for m in line if not routed_passages & set(m.passage_hashes)]
        examples = self.examples(line)
        model, tokenizer = self.live.model, self.live.tokenizer

        # Before: the old weights on what they hold; each routed module as recorded when learned.
        progress("consolidate-before", {"modules": len(routed), "held": len(held)})
        active = self.bank.active(lineage)  # read once: every module's QAs are among them
        held_qas = [q for m in held for q in self.qas(m, active)]
        held_before = self._marks(model, held_qas)
        module_qas = {m.id: self.qas(m, active) for m in self.store.of(routed)}
        module_before = {}
        for m in self.store.of(routed):
            qas = module_qas[m.id]
            recorded = self.bank.cached(m.stats.get("version", -1), [q.id for q in qas])
            module_before[m.id] = recorded if len(recorded) == len(qas) else self._with_module(model, m, qas)

        progress("consolidate-train", {"examples": len(examples)})
        train_cfg = _epochs(self.cfg, self.cfg.memory.consolidate_epochs)

        def on_step(step: int, total: int, loss: float) -> None:
            if should_stop():
                raise _Yielded
            progress("step", {"step": step, "total": total, "loss": loss})

        new_model = copy.deepcopy(model)  # trained and checked apart: the live weights are never touched
        try:
            trained, stats = train_adapter(new_model, tokenizer, examples, self.cfg.lora, train_cfg,
                                           seed=self.cfg.train.seed, compute_dtype=self.dtypes.train,
                                           on_step=on_step)
        except _Yielded:
            self.state.event("consolidate.yielded", "consolidation stopped for a waiting document", version=parent)
            return {"decision": "yielded", "reason": "a document was waiting", "version": parent}
        except TrainingDiverged as e:
            self.state.event("consolidate.diverged", str(e), version=parent)
            return {"decision": "diverged", "reason": str(e), "version": parent}

        version = self.live.next_version()
        limit = self.cfg.memory.max_forgetting
        try:
            with self.live.log.staging(version) as version_dir, contextlib.ExitStack() as staged_modules:
                trained.save_pretrained(str(version_dir))
                new_model = trained.merge_and_unload()
                progress("consolidate-check", {"modules": len(routed)})
                held_after = self._marks(new_model, held_qas)
                modules = self.store.of(routed)
                alone = {m.id: self._marks(new_model, module_qas[m.id]) for m in modules}
                # Only the modules it would keep are re-checked on the new weights: as
                # they are, or retrained there (memory.retrain_kept), each in a staged
                # directory that is dropped with the rest if the checks refuse.
                keep = [m for m in modules if not absorbs(module_before[m.id], alone[m.id])]
                retrained: dict[int, int] = {}
                retrained_stats: dict[int, dict[str, Any]] = {}  # old id -> its retraining's stats and accuracy
                rechecked: dict[int, dict[int, bool]] = {}
                first = self.store.next_id()
                for i, m in enumerate(keep):
                    if not self.cfg.memory.retrain_kept:
                        if module_qas[m.id]:
                            rechecked[m.id] = self._with_module(new_model, m, module_qas[m.id])
                        continue
                    progress("consolidate-retrain", {"module": m.id, "index": i, "total": len(keep)})
                    module_dir = staged_modules.enter_context(self.store.log.staging(first + i))
                    rechecked[m.id], retrained_stats[m.id] = self._retrain(
                        new_model, m, module_qas[m.id], first + i, module_dir, version, on_step)
                    retrained[m.id] = first + i
                verdict = decide(module_before, alone, rechecked, held_before, held_after, limit)
                result: dict[str, Any] = {
                    "parent": parent, "modules": len(routed), "absorbed": verdict.absorbed, "kept": verdict.kept,
                    "retrained": retrained, "routed": [retrained.get(m, m) for m in verdict.kept],
                    "held_documents": len(held), "held_qas": len(held_qas),
                    "held_accuracy_before": accuracy(held_before), "held_accuracy_after": accuracy(held_after),
                    "held_lost": round(verdict.held_lost, 4), "kept_worst_lost": verdict.worst_kept,
                    "checks": verdict.checks, "train": stats.as_dict(), "examples": len(examples),
                }
                if verdict.refused:
                    raise _Refused
                fp = fingerprints(new_model, tokenizer)
                self.live.log.write_manifest(version_dir, {
                    "version": version, "parent": parent, "created_at": now(), "kind": "consolidation",
                    "lora": to_dict(self.cfg.lora), "epochs": self.cfg.memory.consolidate_epochs,
                    "examples": len(examples), "fingerprint": fp,
                    **{k: result[k] for k in ("absorbed", "kept", "retrained", "checks", "train")}})
        except _Yielded:  # while retraining a kept module: the staged directories are gone
            self.state.event("consolidate.yielded", "consolidation stopped for a waiting document", version=parent)
            return {"decision": "yielded", "reason": "a document was waiting", "version": parent}
        except _Refused:  # the staged directories are gone; the live weights never changed
            result["decision"] = "refused"
            result["reason"] = (f"it would lose {verdict.held_lost:.0%} of the answers the weights held and up to "
                                f"{verdict.worst_kept:.0%} of a kept module's (memory.max_forgetting = {limit:g})")
            result["version"] = parent
            self.state.event("consolidate.refused", f"consolidation not made live: {result['reason']}",
                             version=parent, data=result)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            return result
        self._record(version, result, fp, retrained_stats)
        self.live.model, self.live.version = new_model, version
        result["decision"], result["version"] = "consolidated", version
        result["seconds"] = round(time.perf_counter() - t0, 1)
        return result

    def _retrain(self, model, module: Module, qas: list[BankQA], new_id: int, module_dir, version: int,
                 on_step: Callable[[int, int, float], None]) -> tuple[dict[int, bool], dict[str, Any]]:
        """`module` trained again, on the new weights `model` (which it leaves as they
        were), from its stored data and its seed, into `module_dir`; its answers, and
        its training's stats with its accuracy."""
        seed = passage_seed(self.cfg, module.passage_hashes[0]) if module.passage_hashes else self.cfg.train.seed
        trained, stats = train_adapter(model, self.live.tokenizer, self.examples([module]), self.cfg.lora,
                                       self.cfg.train, seed=seed, compute_dtype=self.dtypes.train, on_step=on_step)
        trained.save_pretrained(str(module_dir))
        candidate = Merged(trained)  # answered as the router will serve it: merged
        try:
            marks = self._marks(candidate.peft_model, qas)
        finally:
            candidate.discard()
        self.store.log.write_manifest(module_dir, {
            "module": new_id, "retrained_from": module.id, "trained_on": version, "created_at": now(),
            "document": {"id": module.document_id}, "passages": [{"hash": h} for h in module.passage_hashes],
            "lora": to_dict(self.cfg.lora), "train": to_dict(self.cfg.train), "stats": stats.as_dict(),
            "qa": {"after": accuracy(marks), "n": len(marks)} if marks else None})
        return marks, {"stats": stats.as_dict(), "accuracy": accuracy(marks)}

    def _record(self, version: int, result: dict[str, Any], fp: dict[str, str],
                retrained_stats: dict[int, dict[str, Any]]) -> None:
        """The database's half: the version, live, with the retrained modules and their
        keys, in one transaction (every directory is in place)."""
        row = VersionRow(version=version, parent=result["parent"], created_at=now(), document_id=None,
                         passage_hashes=[], fingerprint=fp["weights"],
                         stats={"kind": "consolidation", "routed": result["routed"], "absorbed": result["absorbed"],
                                "retrained": result["retrained"], "logits_fingerprint": fp["logits"],
                                "stats": result["train"], "lora": to_dict(self.cfg.lora)})
        with self.state.transaction() as c:
            for old_id, new_id in result["retrained"].items():
                old = self.store.get(old_id)
                done = retrained_stats[old_id]
                self.store.add(new_module(new_id, old.document_id, old.passage_hashes, version,
                                          {"retrained_from": old_id, "version": version,
                                           "lora": to_dict(self.cfg.lora), **done}), [], np.zeros((0, 0)), conn=c)
                self.store.copy_keys(old_id, new_id, conn=c)
            self.state.add_version(row, conn=c)
            self.state.set_meta("live_version", str(version), conn=c)
            self.state.event("consolidate", f"version {version}: consolidated {len(result['absorbed'])} "
                             f"module(s) into the weights, {len(result['kept'])} kept", version=version, conn=c,
                             data={k: v for k, v in result.items() if k != "checks"})


def _epochs(cfg: Config, epochs: int):
    import dataclasses

    return dataclasses.replace(cfg.train, epochs=epochs)
