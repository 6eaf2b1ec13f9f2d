"""Learning a document: passages -> self-edits -> inner loop -> merged version.

For each passage (one update per passage, as in the paper):
  1. skip it if its content hash is already learned on the live line;
  2. the live model writes a self-edit with the active policy (recorded);
  3. the self-edit's items + the passage become training examples;
  4. a fresh LoRA adapter is trained on the live weights (the inner loop);
  5. the adapter is stored in the adapter log and merged into the live
     weights; the database records the new version and makes it live in one
     transaction.
A diverged update (NaN/inf) is discarded and the live weights stay as they were.
When the document carries questions, accuracy on them is measured before and
after (no passage in context, lexical grader).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import qa as qa_mod
from .config import Config, to_dict
from .documents import Document, Passage, file_hash, read_document
from .errors import TrainingDiverged
from .inner_loop import TrainStats, train_adapter
from .model.live import LiveModel, fingerprints
from .model.loader import generate_dtype, train_dtype
from .policy import Policy
from .self_edit import write_self_edits
from .state import State, VersionRow, now

Progress = Callable[[str, dict[str, Any]], None]


def _noop(_stage: str, _info: dict[str, Any]) -> None:
    pass


@dataclass
class PassageReport:
    index: int
    hash: str
    status: str  # learned | duplicate | failed
    version: int | None = None
    duplicate_of: int | None = None
    self_edit_chars: int = 0
    self_edit_items: int = 0
    train: dict[str, Any] | None = None
    qa_before: float | None = None
    qa_after: float | None = None
    n_questions: int = 0
    error: str | None = None
    seconds: float = 0.0


@dataclass
class DocumentReport:
    document: str
    title: str
    kind: str
    document_id: int
    version: int  # live version after learning
    passages: list[PassageReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        statuses = {p.status for p in self.passages}
        if "failed" in statuses and "learned" not in statuses:
            return "failed"
        return "done"

    def qa(self) -> dict[str, Any] | None:
        scored = [p for p in self.passages if p.n_questions and p.qa_before is not None]
        if not scored:
            return None
        n = sum(p.n_questions for p in scored)
        before = sum(p.qa_before * p.n_questions for p in scored) / n
        after_rows = [p for p in scored if p.qa_after is not None]
        after = (
            sum(p.qa_after * p.n_questions for p in after_rows) / sum(p.n_questions for p in after_rows)
            if after_rows else None
        )
        return {"before": round(before, 4), "after": None if after is None else round(after, 4), "n": n}

    def as_dict(self) -> dict[str, Any]:
        learned = [p for p in self.passages if p.status == "learned"]
        out = {
            "document": self.document,
            "title": self.title,
            "kind": self.kind,
            "document_id": self.document_id,
            "status": self.status,
            "passages": len(self.passages),
            "learned": len(learned),
            "duplicates": sum(p.status == "duplicate" for p in self.passages),
            "failed": sum(p.status == "failed" for p in self.passages),
            "version": self.version,
            "self_edit": {
                "chars": sum(p.self_edit_chars for p in self.passages),
                "items": sum(p.self_edit_items for p in self.passages),
            },
            "train_seconds": round(sum((p.train or {}).get("seconds", 0.0) for p in self.passages), 2),
            "seconds": round(self.seconds, 2),
            "passage_reports": [dataclasses.asdict(p) for p in self.passages],
        }
        qa = self.qa()
        if qa is not None:
            out["qa"] = qa
        return out


class Learner:
    def __init__(self, cfg: Config, state: State, live: LiveModel, policy: Policy):
        self.cfg = cfg
        self.state = state
        self.live = live
        self.policy = policy
        self.train_dtype = train_dtype(cfg)
        self.generate_dtype = generate_dtype(cfg)

    def read(self, path: Path) -> Document:
        tok = self.live.tokenizer
        return read_document(
            path, lambda text: len(tok(text, add_special_tokens=False)["input_ids"]),
            self.cfg.split.max_tokens, self.cfg.split.min_tokens,
        )

    def learn_file(self, path: Path, progress: Progress = _noop, max_passages: int | None = None) -> DocumentReport:
        t0 = time.perf_counter()
        doc = self.read(path)
        if max_passages is not None:
            doc.passages = doc.passages[:max_passages]
        self.live.ensure_loaded()
        doc_id = self.state.add_document(str(Path(path).resolve()), file_hash(Path(path)), doc.title, doc.kind)
        for i, p in enumerate(doc.passages):
            self.state.add_passage(doc_id, i, p.hash, p.title, p.text, len(p.questions))
        report = DocumentReport(str(path), doc.title, doc.kind, doc_id, self.live.version)
        progress("document", {"path": str(path), "title": doc.title, "passages": len(doc.passages)})
        status = "interrupted"  # unless the loop below completes
        try:
            for i, passage in enumerate(doc.passages):
                progress("passage", {"index": i, "total": len(doc.passages)})
                report.passages.append(self.learn_passage(passage, i, doc_id, progress))
            status = report.status
        finally:
            report.version = self.live.version
            report.seconds = time.perf_counter() - t0
            self.state.finish_document(doc_id, status, report.as_dict())
        return report

    # -- one passage -----------------------------------------------------
    def _seed(self, passage_hash: str) -> int:
        return (self.cfg.model.seed * 1_000_003 + int(passage_hash[:8], 16)) % (2**31)

    def _evaluate(self, model, questions: list[qa_mod.Question]) -> float | None:
        scored = qa_mod.evaluate(
            model, self.live.tokenizer, questions, self.cfg.qa,
            use_chat=self.cfg.model.use_chat_template, compute_dtype=self.generate_dtype,
        )
        return qa_mod.accuracy(scored)

    def learn_passage(self, passage: Passage, index: int, doc_id: int, progress: Progress = _noop) -> PassageReport:
        t0 = time.perf_counter()
        h = passage.hash
        report = PassageReport(index=index, hash=h, status="failed", n_questions=len(passage.questions))
        learned = self.state.learned_passages(self.live.version)
        if h in learned:
            report.status, report.duplicate_of = "duplicate", learned[h]
            self.state.set_passage_status(doc_id, index, "duplicate", learned[h])
            self.state.event("learn.duplicate", f"passage {h[:12]} already learned in version {learned[h]}",
                             version=learned[h], document_id=doc_id)
            progress("duplicate", {"index": index, "version": learned[h]})
            return report

        seed = self._seed(h)
        progress("self-edit", {"index": index})
        [edit] = write_self_edits(self.live.model, self.live.tokenizer, self.policy, passage,
                                  use_chat=self.cfg.model.use_chat_template, dtype=self.generate_dtype, seed=seed)
        text = edit.text
        edit_id = self.state.add_self_edit(h, doc_id, self.policy.name, edit.prompt, text, edit.n_items)
        report.self_edit_chars, report.self_edit_items = len(text), edit.n_items

        questions = qa_mod.questions_of(passage.title, passage.questions)
        if questions:
            progress("qa-before", {"index": index, "n": len(questions)})
            report.qa_before = self._evaluate(self.live.model, questions)

        progress("train", {"index": index, "examples": len(edit.examples)})
        try:
            candidate, stats = train_adapter(
                self.live.model, self.live.tokenizer, edit.examples, self.cfg.lora, self.cfg.train, seed=seed,
                compute_dtype=self.train_dtype,
                on_step=lambda step, total, loss: progress("step", {"step": step, "total": total, "loss": loss}),
            )
        except TrainingDiverged as e:
            report.error = str(e)
            self.state.set_self_edit_outcome(edit_id, "diverged")
            self.state.set_passage_status(doc_id, index, "failed")
            self.state.event("learn.diverged", str(e), version=self.live.version, document_id=doc_id,
                             data={"passage": h})
            progress("failed", {"index": index, "error": str(e)})
            report.seconds = time.perf_counter() - t0
            return report
        report.train = stats.as_dict()

        if questions:
            progress("qa-after", {"index": index, "n": len(questions)})
            report.qa_after = self._evaluate(candidate, questions)

        report.version = self._commit(candidate, passage, doc_id, index, edit_id, text, stats, report)
        report.status = "learned"
        report.seconds = time.perf_counter() - t0
        progress("learned", {"index": index, "version": report.version})
        return report

    def _commit(self, candidate, passage: Passage, doc_id: int, index: int, edit_id: int, text: str,
                stats: TrainStats, report: PassageReport) -> int:
        parent = self.live.version
        version = max(self.state.max_version(), max(self.live.log.versions(), default=0)) + 1
        manifest_base = {
            "version": version,
            "parent": parent,
            "created_at": now(),
            "document": {"id": doc_id, "path": self.state.document(doc_id)["path"]},
            "passages": [{"hash": passage.hash, "title": passage.title, "index": index}],
            "policy": self.policy.name,
            "self_edit": text,
            "lora": to_dict(self.cfg.lora),
            "train": {**to_dict(self.cfg.train), "dtype": str(self.train_dtype).removeprefix("torch.")},
            "stats": stats.as_dict(),
            "qa": {"before": report.qa_before, "after": report.qa_after, "n": report.n_questions}
            if report.n_questions else None,
        }
        fp: dict[str, str] = {}

        def make_manifest() -> dict[str, Any]:
            # Runs once the adapter files are saved: merge, then fingerprint the merged weights.
            with torch.no_grad():
                self.live.model = candidate.merge_and_unload()
            fp.update(fingerprints(self.live.model, self.live.tokenizer))
            return {**manifest_base, "fingerprint": fp}

        try:
            self.live.log.write_version(version, lambda d: candidate.save_pretrained(str(d)), make_manifest)
            row = VersionRow(
                version=version, parent=parent, created_at=manifest_base["created_at"], document_id=doc_id,
                passage_hashes=[passage.hash], fingerprint=fp["weights"],
                stats={k: manifest_base[k] for k in ("policy", "lora", "train", "stats", "qa")}
                | {"logits_fingerprint": fp["logits"], "self_edit_id": edit_id},
            )
            with self.state.transaction() as c:
                self.state.add_version(row, conn=c)
                self.state.set_meta("live_version", str(version), conn=c)
                self.state.set_passage_status(doc_id, index, "learned", version, conn=c)
                self.state.set_self_edit_outcome(edit_id, "accepted", version, conn=c)
                self.state.event("learn.accepted", f"version {version}: learned passage {passage.hash[:12]}",
                                 version=version, document_id=doc_id, conn=c,
                                 data={"parent": parent, "qa": manifest_base["qa"], "loss": stats.final_loss})
        except BaseException:
            if fp:  # merged in memory but not recorded: rebuild the parent exactly
                self.live.load(parent)
            else:
                self.live.model = candidate.unload()
            raise
        self.live.version = version
        self.live.snapshot_if_due()
        return version
