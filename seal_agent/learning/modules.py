"""Learning a document as a knowledge module (`memory.mode = "modules"`).

For a document (or each run of `memory.module_passages` of its passages):
  1. passages already learned on the live line are duplicates, skipped;
  2. the consolidated model writes each passage's self-edit and questions
     (batched, as the merge line does);
  3. the consolidated model answers the questions (the module's "before");
  4. one fresh LoRA module is trained on all the passages' self-edits and the
     passages themselves, on the consolidated weights (which it never changes:
     the adapter is trained, saved and taken off again);
  5. the module, merged in, answers the same questions (its "after": what the
     router will serve, since a routed answer is the module merged the same way);
  6. the module's adapter directory is complete and in place before the
     database records it in one transaction: the module and its keys (the
     passages and their sentences, embedded, for the router), the new version
     (same weights, routing table + this module) made live, the passages, the
     self-edits, and the questions in the replay bank.
Nothing is refused for what it might make the model forget: no other module
and not the consolidated weights are touched. A module whose questions did not
improve (or that had none) is learned anyway and flagged. Only a diverged
training (NaN/inf) leaves its passages unlearned, saying so.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import to_dict
from ..documents import Document, Passage
from ..errors import TrainingDiverged
from ..memory.embedding import Embedder
from ..memory.modules import ModuleStore, key_texts, new_module
from ..memory.replay import NewQA
from ..memory.state import VersionRow, now
from ..model.inner_loop import Merged, TrainStats, compiles_next, train_adapter
from ..progress import Progress
from ..qa import answering as qa_mod
from .learner import DocumentReport, Draft, Learner, PassageReport


def flag(n_questions: int, before: float | None, after: float | None) -> str | None:
    """Why a module's learning is in doubt, or None when its questions improved."""
    if not n_questions:
        return "unchecked: no questions to measure it by"
    if after is None or before is None or after <= before:
        return f"learned nothing measurable: its questions {before} -> {after}"
    return None


class ModuleLearner(Learner):
    """A `Learner` whose documents become modules instead of merges."""

    def __init__(self, *args: Any, modules: ModuleStore, embedder: Embedder, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.modules, self.embedder = modules, embedder

    def _learn_document(self, doc: Document, doc_id: int, report: DocumentReport, progress: Progress) -> None:
        learned = self.state.learned_passages(self.live.version)
        todo: list[int] = []
        seen: dict[str, int] = {}
        for i, p in enumerate(doc.passages):
            if p.hash in learned or p.hash in seen:
                pr = PassageReport(index=i, hash=p.hash, status="failed", n_questions=len(p.questions))
                report.passages.append(self._duplicate(pr, learned.get(p.hash, self.live.version), doc_id,
                                                       progress))
            else:
                seen[p.hash] = i
                todo.append(i)
        size = self.cfg.memory.module_passages or len(todo) or 1
        for start in range(0, len(todo), size):
            group = todo[start:start + size]
            progress("passage", {"index": group[0], "indices": group, "total": len(doc.passages)})
            report.passages.extend(self._learn_module([doc.passages[i] for i in group], group, doc_id, progress))
        report.passages.sort(key=lambda p: p.index)

    def _learn_module(self, passages: list[Passage], indices: list[int], doc_id: int,
                      progress: Progress) -> list[PassageReport]:
        drafts: list[Draft] = []
        batch = self.cfg.policy.write_batch
        for s in range(0, len(passages), batch):
            drafts += self._write(passages[s:s + batch], indices[s:s + batch], progress)
        t0 = time.perf_counter()  # the drafts timed their own stages (self-edit, questions)
        reports, questions, edit_ids = [], [], []
        for p, i, d in zip(passages, indices, drafts):
            edit_ids.append(self.state.add_self_edit(p.hash, doc_id, self._policy_label(), d.edit.prompt,
                                                     d.edit.text, d.edit.n_items))
            qs = ([qa_mod.Question(q.question, q.answer, p.title) for q in d.qas] if self.bank is not None
                  else qa_mod.questions_of(p.title, p.questions))
            questions.append(qs)
            reports.append(PassageReport(index=i, hash=p.hash, status="failed", n_questions=len(qs),
                                         self_edit_chars=len(d.edit.text), self_edit_items=d.edit.n_items,
                                         qa_source=d.qa_source, qa_generated=d.qa_generated,
                                         stage_seconds=dict(d.stage_seconds)))
        flat = [q for qs in questions for q in qs]
        progress("qa-before", {"index": indices[0], "n": len(flat)})
        before = self._score(self._decoder(), flat)
        examples = [e for d in drafts for e in d.edit.examples]
        seed = self._seed(passages[0].hash)
        progress("train", {"index": indices[0], "examples": len(examples), "attempt": 1,
                           "compiles": compiles_next(self.cfg.train)})
        t_train = time.perf_counter()
        try:
            trained, stats = train_adapter(
                self.live.model, self.live.tokenizer, examples, self.cfg.lora, self.cfg.train, seed=seed,
                compute_dtype=self.dtypes.train,
                on_step=lambda step, total, loss: progress("step", {"step": step, "total": total, "loss": loss}),
            )
        except TrainingDiverged as e:
            for r, edit_id, i in zip(reports, edit_ids, indices):
                r.error = str(e)
                self.state.set_self_edit_outcome(edit_id, "diverged")
                self.state.set_passage_status(doc_id, i, "failed")
            self.state.event("learn.diverged", str(e), version=self.live.version, document_id=doc_id,
                             data={"passages": [p.hash for p in passages]})
            progress("failed", {"index": indices[0], "error": str(e)})
            return reports
        t_check = time.perf_counter()
        module_id = self.modules.next_id()
        try:
            with self.modules.log.staging(module_id) as module_dir:
                trained.save_pretrained(str(module_dir))
                progress("qa-after", {"index": indices[0], "n": len(flat)})
                if self.engine is not None:
                    trained.unload()  # the consolidated weights, exactly as they were
                    trained = None
                    after = self._engine_after(module_dir, flat)
                else:
                    candidate = Merged(trained)  # answered as the router will serve it: merged
                    try:
                        after = self._score(candidate.peft_model, flat)
                    finally:
                        candidate.discard()  # the consolidated weights, exactly as they were
                        trained = None
                t_commit = time.perf_counter()
                progress("commit", {"index": indices[0]})
                record = self._record(module_id, passages, indices, doc_id, drafts, questions, before, after,
                                      stats, reports)
                self.modules.log.write_manifest(module_dir, record)
            version = self._commit_module(record, passages, indices, doc_id, drafts, edit_ids, questions, after,
                                          stats, reports)
        finally:
            if trained is not None:
                trained.unload()
        t_end = time.perf_counter()
        share = len(passages)
        for r in reports:
            r.status, r.version, r.module, r.checked = "learned", version, module_id, bool(r.n_questions)
            r.train = stats.as_dict()
            r.stage_seconds.update({"qa-before": round((t_train - t0) / share, 2),
                                    "train": round((t_check - t_train) / share, 2),
                                    "qa-after": round((t_commit - t_check) / share, 2),
                                    "commit": round((t_end - t_commit) / share, 2)})
            r.seconds = (t_end - t0) / share + sum(v for k, v in r.stage_seconds.items()
                                                   if k in ("self-edit", "questions"))
            progress("learned", {"index": r.index, "version": version, "module": module_id})
        return reports

    def _engine_after(self, module_dir, questions: list[qa_mod.Question]) -> list[qa_mod.Scored]:
        """The module's "after", answered as vLLM will serve it: the adapter given per
        request. Loading it first means a module vLLM cannot serve (its rank, its
        target modules) fails its document here, saying why, not at the first question."""
        engine = self.engine()
        engine.load(module_dir)
        try:
            return self._score(engine.view(module_dir), questions)
        finally:
            engine.unload(module_dir)  # the staged directory: the module is served from its final one

    def _record(self, module_id: int, passages: list[Passage], indices: list[int], doc_id: int,
                drafts: list[Draft], questions: list[list[qa_mod.Question]], before: list[qa_mod.Scored],
                after: list[qa_mod.Scored], stats: TrainStats, reports: list[PassageReport]) -> dict[str, Any]:
        """The module's manifest (its reports get their QA figures and flag)."""
        n = sum(len(qs) for qs in questions)
        qa_before, qa_after = qa_mod.accuracy(before), qa_mod.accuracy(after)
        flagged = flag(n, qa_before, qa_after)
        i = 0
        for r, qs in zip(reports, questions):
            r.qa_before, r.qa_after = qa_mod.accuracy(before[i:i + len(qs)]), qa_mod.accuracy(after[i:i + len(qs)])
            r.flagged = flagged
            i += len(qs)
        return {
            "module": module_id, "trained_on": self.live.version, "created_at": now(),
            "document": {"id": doc_id, "path": self.state.document(doc_id)["path"]},
            "passages": [{"hash": p.hash, "title": p.title, "index": i} for p, i in zip(passages, indices)],
            "policy": self._policy_label(),
            "self_edits": [d.edit.text for d in drafts],
            "lora": to_dict(self.cfg.lora),
            "train": {**to_dict(self.cfg.train), "dtype": str(self.dtypes.train).removeprefix("torch.")},
            "stats": stats.as_dict(),
            "qa": {"before": qa_before, "after": qa_after, "n": n} if n else None,
            "flagged": flagged,
        }

    def _commit_module(self, record: dict[str, Any], passages: list[Passage], indices: list[int], doc_id: int,
                       drafts: list[Draft], edit_ids: list[int], questions: list[list[qa_mod.Question]],
                       after: list[qa_mod.Scored], stats: TrainStats, reports: list[PassageReport]) -> int:
        """The database's half, one transaction, once the module's directory is in
        place (a directory the database never recorded is moved aside by the next
        owner: ModuleStore.discard_uncommitted); returns the new version."""
        module_id, parent, flagged = record["module"], self.live.version, record["flagged"]
        parent_row = self.state.version(parent)
        routed = list(parent_row.stats.get("routed", []))
        version = self.live.next_version()
        keys = [k for p in passages for k in key_texts(p.title, p.text)]
        vectors = self.embedder.embed(keys)
        qa_vectors = [self.bank.embed(p.title, list(d.qas)) if self.bank is not None and d.qas else None
                      for p, d in zip(passages, drafts)]
        module = new_module(module_id, doc_id, [p.hash for p in passages], parent,
                            {k: record[k] for k in ("policy", "lora", "stats", "qa", "flagged")}
                            | {"version": version})
        row = VersionRow(
            version=version, parent=parent, created_at=record["created_at"], document_id=doc_id,
            passage_hashes=[p.hash for p in passages], fingerprint=parent_row.fingerprint,
            stats={"kind": "module", "module": module_id, "routed": routed + [module_id],
                   "logits_fingerprint": parent_row.stats.get("logits_fingerprint"),
                   "policy": record["policy"], "qa": record["qa"], "stats": record["stats"], "flagged": flagged},
        )
        with self.state.transaction() as c:
            self.modules.add(module, keys, vectors, conn=c)
            self.state.add_version(row, conn=c)
            self.state.set_meta("live_version", str(version), conn=c)
            for p, i, edit_id, r in zip(passages, indices, edit_ids, reports):
                self.state.set_passage_status(doc_id, i, "learned", version, conn=c,
                                              info={"module": module_id, "flagged": flagged,
                                                    "qa_generated": r.qa_generated, "checked": bool(r.n_questions)})
                self.state.set_self_edit_outcome(edit_id, "accepted", version, conn=c)
            if self.bank is not None:
                j = 0
                for p, d, vecs, qs in zip(passages, drafts, qa_vectors, questions):
                    new_qas: list[NewQA] = list(d.qas)
                    ids = self.bank.add(new_qas, vecs, passage_hash=p.hash, title=p.title, document_id=doc_id,
                                        version=version, conn=c) if new_qas else []
                    # What the module answered is what this version answers, routed to it.
                    self.bank.record(version, [(qa_id, s.correct, s.prediction)
                                               for qa_id, s in zip(ids, after[j:j + len(qs)])], conn=c)
                    j += len(qs)
            self.state.event("learn.module", f"version {version}: module m{module_id:04d} learned "
                             f"{len(passages)} passage(s)" + (f" (flagged: {flagged})" if flagged else ""),
                             version=version, document_id=doc_id, conn=c,
                             data={"module": module_id, "qa": record["qa"], "flagged": flagged,
                                   "loss": stats.final_loss})
        self.live.version = version
        if self.bank is not None:
            self.bank.sync()
        return version
