"""Learning a document: passages -> self-edits -> inner loop -> merged version.

For each passage (one update per passage, as in the paper):
  1. skip it if its content hash is already learned on the live line;
  2. the live model writes a self-edit with the active policy (recorded);
  3. the self-edit's items + the passage become training examples;
  4. the passage's QAs: its own questions, or model-written grounded ones
     (steps 2 and 4 run for `policy.write_batch` passages of a document at
     once, by the version live when the batch starts: the draft);
  5. a fresh LoRA adapter is trained on the live weights (the inner loop);
  6. the forgetting check: the candidate answers the passage's QAs (the gain)
     and a replay sample of earlier QAs (the k nearest to the passage and m at
     random), compared with the live model on the same QAs (with
     `replay.rehearse_first` it trained with rehearsal of the passages behind
     the nearest QAs). If it forgot more than allowed, it is rejected and the
     live weights stay exactly as they were; with `replay.attempts = 2` it is
     first retrained once with rehearsal of the passages behind the forgotten
     and nearest QAs, unless that would train on exactly the examples the
     failed attempt had (only another seed: a reroll against the gate);
  7. an accepted adapter is stored in the adapter log and merged into the live
     weights; the database records the new version, makes it live and adds
     the passage's QAs to the replay bank in one transaction.
A diverged update (NaN/inf) is discarded and the live weights stay as they were.
Each training attempt comes to an `Outcome`: accepted, retry (step 6's
rehearsal), rejected-forgetting or diverged.
QA accuracy is measured with no passage in context and the lexical grader; the
gate needs only grades, so an answer stops once the grader has settled it
correct (`qa.evaluate(until_correct=True)`: the grades of whole answers).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, to_dict
from ..documents import Document, Passage, file_hash, read_document
from ..errors import TrainingDiverged
from ..memory import forgetting
from ..memory.live import LiveModel, fingerprints
from ..memory.policy_versions import PolicyVersions
from ..memory.replay import BankQA, NewQA, ReplayBank
from ..memory.state import State, VersionRow, now
from ..model.inner_loop import Example, Merged, TrainStats, compiles_next, train_adapter
from ..model.loader import compute_dtypes
from ..policy import Policy
from ..progress import Progress, no_progress
from ..qa import answering as qa_mod
from ..qa.writing import generate_qas
from .self_edit import SelfEdit, from_text, write_for


@dataclass
class Draft:
    """What the live model wrote for a passage before learning it."""

    edit: SelfEdit
    qas: list[NewQA]  # empty without a replay bank
    qa_source: str = "none"  # gold | generated | none
    qa_generated: dict[str, int] | None = None
    # This passage's share of the batched writing stages (self-edit, questions).
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PassageReport:
    index: int
    hash: str
    status: str  # learned | duplicate | failed | rejected-forgetting
    version: int | None = None
    duplicate_of: int | None = None
    self_edit_chars: int = 0
    self_edit_items: int = 0
    train: dict[str, Any] | None = None
    qa_before: float | None = None
    qa_after: float | None = None
    n_questions: int = 0
    # Where the passage's QAs came from (gold | generated | none) and, when
    # generated, how many were written, grounded in the passage, kept.
    qa_source: str = "none"
    qa_generated: dict[str, int] | None = None
    # False when the update could not be checked (no QAs, nothing to replay).
    checked: bool = False
    forgetting: dict[str, Any] | None = None
    error: str | None = None
    # memory.mode = "modules": the module that learned the passage, and why its
    # learning is in doubt (its questions did not improve, or it had none).
    module: int | None = None
    flagged: str | None = None
    seconds: float = 0.0
    # Seconds per stage (self-edit, questions, qa-before (the passage's QAs and
    # uncached replay QAs, one batch), train, replay or qa-after, commit), summed
    # over training attempts. Self-edit and questions are written for several
    # passages in one batch: each gets an equal share of the batch's time.
    stage_seconds: dict[str, float] = field(default_factory=dict)


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
        if "learned" not in statuses and "rejected-forgetting" in statuses:
            return "rejected-forgetting"
        if "failed" in statuses and "learned" not in statuses:
            return "failed"
        return "done"

    def forgetting(self) -> dict[str, Any] | None:
        """The document's forgetting checks, summed over its passages."""
        checks = [p.forgetting for p in self.passages if p.forgetting]
        if not checks:
            return None
        n = sum(c["replay_n"] for c in checks)

        def mean(key: str) -> float | None:
            rows = [c for c in checks if c[key] is not None]
            total = sum(c["replay_n"] for c in rows)
            return round(sum(c[key] * c["replay_n"] for c in rows) / total, 4) if total else None

        return {
            "replay_n": n,
            "before": mean("before"),
            "after": mean("after"),
            "flipped": [f for c in checks for f in c["flipped"]],
            "attempts": sum(c["attempts"] for c in checks),
            "decision": "rejected" if any(c["decision"] == "rejected" for c in checks) else "accepted",
        }

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
            "rejected": sum(p.status == "rejected-forgetting" for p in self.passages),
            "version": self.version,
            "modules": sorted({p.module for p in self.passages if p.module is not None}),
            "flagged": sum(p.flagged is not None for p in self.passages),
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
        f = self.forgetting()
        if f is not None:
            out["forgetting"] = f
        return out


class Outcome(enum.Enum):
    """What one training attempt comes to."""

    ACCEPTED = "accepted"  # the check passed (or there was nothing to check, or the gate is off)
    RETRY = "retry"  # it forgot too much; the next attempt rehearses what it forgot
    REJECTED = "rejected-forgetting"  # it forgot too much, and no retry is left that would differ
    DIVERGED = "diverged"  # the loss became NaN/inf: the adapter is dropped, the weights untouched


@dataclass
class Update:
    """A passage's update in the making: what it trains on, what it is checked on."""

    passage: Passage
    index: int
    doc_id: int
    seed: int
    edit: SelfEdit
    edit_id: int  # the self-edit's row
    new_qas: list[NewQA]  # the passage's QAs, for the replay bank
    questions: list[qa_mod.Question]  # the same, as asked: the gain
    replay: list[BankQA]  # the replay sample
    nearest_ids: list[int]  # the replay QAs nearest to the passage
    before: dict[int, bool]  # the live model's correctness on the replay sample


@dataclass
class Attempt:
    """One training attempt and its check. Its candidate (None when diverged) is
    merged into the live weights until it is kept or discarded."""

    outcome: Outcome
    number: int  # 1, 2, ...
    candidate: Merged | None = None
    stats: TrainStats | None = None
    check: forgetting.Check | None = None  # None: nothing to replay
    gain_after: list[qa_mod.Scored] = field(default_factory=list)
    replay_after: list[tuple[int, bool, str]] = field(default_factory=list)  # (qa id, correct, prediction)
    retry_rehearsal: list[Example] = field(default_factory=list)  # what the next attempt rehearses (RETRY)
    error: TrainingDiverged | None = None  # DIVERGED


def passage_seed(cfg: Config, passage_hash: str) -> int:
    """The training seed of an update on a passage: the same passage, the same seed."""
    return (cfg.model.seed * 1_000_003 + int(passage_hash[:8], 16)) % (2**31)


class Learner:
    def __init__(self, cfg: Config, state: State, live: LiveModel, policy: Policy, bank: ReplayBank | None = None,
                 qa_policy: Policy | None = None, external: str | None = None,
                 policy_versions: PolicyVersions | None = None, engine: Callable[[], Any] | None = None):
        self.cfg = cfg
        self.state = state
        self.live = live
        self.policy = policy
        self.bank = bank  # None: no replay bank, no forgetting check
        self.qa_policy = qa_policy  # None: passages without questions are not checked
        # Learn another model's self-edit carried by the data (eval), not our own.
        self.external = external
        # The promoted policy adapter writes the self-edits (None: the prompt alone).
        self.policy_versions = policy_versions
        self.dtypes = compute_dtypes(cfg)
        # The vLLM engine on the live weights, where it writes and answers (engine.generate); None: torch.
        self.engine = engine

    def _decoder(self):
        """What writes self-edits and questions and answers the checks: the live
        model, or a vLLM engine serving the very same weights."""
        return self.live.model if self.engine is None else self.engine().view()

    def read(self, path: Path) -> Document:
        tok = self.live.tokenizer
        return read_document(
            path, lambda text: len(tok(text, add_special_tokens=False)["input_ids"]),
            self.cfg.split.max_tokens, self.cfg.split.min_tokens,
        )

    def learn_file(self, path: Path, progress: Progress = no_progress, max_passages: int | None = None,
                   recorded_as: str | None = None) -> DocumentReport:
        """`recorded_as`: the path the document is known by when `path` is a copy of it
        (the daemon learns its queue's copy of an inbox file); default: `path` itself."""
        t0 = time.perf_counter()
        doc = self.read(path)
        if max_passages is not None:
            doc.passages = doc.passages[:max_passages]
        self.live.ensure_loaded()
        recorded = recorded_as or str(Path(path).resolve())
        doc_id = self.state.add_document(recorded, file_hash(Path(path)), doc.title, doc.kind)
        for i, p in enumerate(doc.passages):
            self.state.add_passage(doc_id, i, p.hash, p.title, p.text, len(p.questions))
        report = DocumentReport(recorded_as or str(path), doc.title, doc.kind, doc_id, self.live.version)
        progress("document", {"path": report.document, "title": doc.title, "passages": len(doc.passages)})
        status = "interrupted"  # unless the loop below completes
        try:
            self._learn_document(doc, doc_id, report, progress)
            status = report.status
        finally:
            report.version = self.live.version
            report.seconds = time.perf_counter() - t0
            self.state.finish_document(doc_id, status, report.as_dict())
        return report

    def _learn_document(self, doc: Document, doc_id: int, report: DocumentReport, progress: Progress) -> None:
        """Each passage one update, merged (appending to `report.passages` as it goes)."""
        drafts: dict[int, Draft] = {}
        for i, passage in enumerate(doc.passages):
            progress("passage", {"index": i, "total": len(doc.passages)})
            if i not in drafts:
                drafts.update(self._drafts(doc.passages, i, progress))
            report.passages.append(self.learn_passage(passage, i, doc_id, progress, drafts.pop(i, None)))

    # -- one passage -----------------------------------------------------
    def _seed(self, passage_hash: str) -> int:
        return passage_seed(self.cfg, passage_hash)

    def _score(self, model, questions: list[qa_mod.Question]) -> list[qa_mod.Scored]:
        return qa_mod.evaluate(
            model, self.live.tokenizer, questions, self.cfg.qa,
            use_chat=self.cfg.model.use_chat_template, compute_dtype=self.dtypes.answer,
            until_correct=True,  # the gate needs grades: a correct answer ends at its gold
        )

    def _drafts(self, passages: list[Passage], start: int, progress: Progress) -> dict[int, Draft]:
        """Drafts of the next `policy.write_batch` passages from `start` on that the
        live line has not learned (none if passage `start` itself is learned)."""
        learned = self.state.learned_passages(self.live.version)
        if passages[start].hash in learned:
            return {}
        batch, hashes = [], set(learned)
        for i in range(start, len(passages)):
            if len(batch) < self.cfg.policy.write_batch and passages[i].hash not in hashes:
                batch.append(i)
                hashes.add(passages[i].hash)  # a repeat later in the document waits for its turn
        return dict(zip(batch, self._write([passages[i] for i in batch], batch, progress)))

    def _write(self, passages: list[Passage], indices: list[int], progress: Progress) -> list[Draft]:
        """Self-edits and QAs of `passages`, each stage one batched call for all of them."""
        info = {"index": indices[0], "indices": indices}
        seed = self._seed(passages[0].hash)
        t0 = time.perf_counter()
        progress("self-edit", info)
        edits = self._self_edits(passages, seed)
        t1 = time.perf_counter()
        drafts = [Draft(edit, []) for edit in edits]
        if self.bank is not None:
            progress("questions", info)
            self._passage_qas(passages, seed, drafts)
        t2 = time.perf_counter()
        for d in drafts:
            d.stage_seconds = {"self-edit": (t1 - t0) / len(drafts)}
            if self.bank is not None:
                d.stage_seconds["questions"] = (t2 - t1) / len(drafts)
        return drafts

    def _self_edits(self, passages: list[Passage], seed: int) -> list[SelfEdit]:
        edits: dict[int, SelfEdit] = {}
        if self.external:  # another model's self-edit from the data, where it has one
            for i, p in enumerate(passages):
                texts = p.external_self_edits.get(self.external)
                if texts:
                    edits[i] = from_text(self.policy, p, texts[0])
        todo = [i for i in range(len(passages)) if i not in edits]
        if todo:
            adapter = self.policy_versions.adapter_dir() if self.policy_versions else None
            written = write_for(self._decoder(), self.live.tokenizer, self.policy, [passages[i] for i in todo],
                                use_chat=self.cfg.model.use_chat_template, dtype=self.dtypes.generate, seed=seed,
                                adapter=adapter, batch_size=self.cfg.policy.write_batch)
            edits.update(zip(todo, written))
        return [edits[i] for i in range(len(passages))]

    def _policy_label(self) -> str:
        """Which policy wrote the self-edit: 'implications', or 'implications@v2' with a ReSTEM adapter."""
        return self.policy_versions.label() if self.policy_versions else self.policy.name

    def _passage_qas(self, passages: list[Passage], seed: int, drafts: list[Draft]) -> None:
        """Each draft's QAs: the passage's own questions, or model-written ones
        (one batched call for all passages that need them)."""
        need = []
        for p, d in zip(passages, drafts):
            if p.questions:
                d.qa_source, d.qas = "gold", [NewQA(q.question, q.answer, "gold") for q in p.questions]
            elif self.qa_policy is not None and self.cfg.replay.generate_qas:
                need.append((p, d))
        if not need:
            return
        gens = generate_qas(self._decoder(), self.live.tokenizer, self.qa_policy, [p for p, _ in need], self.cfg.qa,
                            use_chat=self.cfg.model.use_chat_template, dtype=self.dtypes.generate, seed=seed,
                            max_qas=self.cfg.replay.max_qas)
        for (_, d), gen in zip(need, gens):
            d.qa_generated = {"generated": gen.generated, "grounded": gen.grounded, "kept": len(gen.kept)}
            if gen.kept:
                d.qa_source = "generated"
            d.qas = [NewQA(q, a, "generated") for q, a in gen.kept]

    def learn_passage(self, passage: Passage, index: int, doc_id: int, progress: Progress = no_progress,
                      draft: Draft | None = None) -> PassageReport:
        """Learn one passage (written now, unless its `draft` was written already);
        its report says how long each stage took (a stage runs from its progress
        event to the next one)."""
        stages: dict[str, float] = dict(draft.stage_seconds) if draft else {}
        current: list = [time.perf_counter(), None]

        def close(stage: str | None) -> None:
            t = time.perf_counter()
            if current[1] is not None:
                stages[current[1]] = stages.get(current[1], 0.0) + t - current[0]
            current[:] = [t, stage]

        def timed(stage: str, info: dict[str, Any]) -> None:
            if stage != "step":
                close(stage)
            progress(stage, info)

        try:
            report = self._learn_passage(passage, index, doc_id, timed, draft)
        finally:
            close(None)
        report.stage_seconds = {k: round(v, 2) for k, v in stages.items()
                                if k not in ("learned", "duplicate", "failed", "rejected")}
        if draft:
            report.seconds += sum(draft.stage_seconds.values())
        return report

    def _learn_passage(self, passage: Passage, index: int, doc_id: int, progress: Progress,
                       draft: Draft | None) -> PassageReport:
        """The algorithm: a passage already learned is a duplicate; otherwise its
        update is prepared, trained and checked (retried while an attempt calls
        for it), and then committed, rejected, or dropped as diverged."""
        t0 = time.perf_counter()
        report = PassageReport(index=index, hash=passage.hash, status="failed", n_questions=len(passage.questions))
        learned = self.state.learned_passages(self.live.version)
        if passage.hash in learned:
            return self._duplicate(report, learned[passage.hash], doc_id, progress)
        update = self._prepare(passage, index, doc_id, draft, report, progress)
        attempt = self._attempts(update, report, progress)
        if attempt.outcome is Outcome.DIVERGED:
            return self._diverged(attempt.error, update, report, progress, t0)
        report.checked = attempt.check is not None or bool(update.questions)
        report.forgetting = self._forgetting(update, attempt)
        if attempt.outcome is Outcome.REJECTED:
            attempt.candidate.discard()
            return self._rejected(update, report, progress, t0)
        progress("commit", {"index": index})
        report.version = self._commit(update, attempt, report)
        report.status = "learned"
        report.seconds = time.perf_counter() - t0
        progress("learned", {"index": index, "version": report.version})
        return report

    def _prepare(self, passage: Passage, index: int, doc_id: int, draft: Draft | None, report: PassageReport,
                 progress: Progress) -> Update:
        """The self-edit (written now unless drafted) recorded, the passage's
        questions, the replay sample and the live model's answers to both."""
        if draft is None:
            [draft] = self._write([passage], [index], progress)
        edit = draft.edit
        edit_id = self.state.add_self_edit(passage.hash, doc_id, self._policy_label(), edit.prompt, edit.text,
                                           edit.n_items)
        report.self_edit_chars, report.self_edit_items = len(edit.text), edit.n_items
        report.qa_source, report.qa_generated = draft.qa_source, draft.qa_generated
        if self.bank is not None:
            questions = [qa_mod.Question(q.question, q.answer, passage.title) for q in draft.qas]
        else:
            questions = qa_mod.questions_of(passage.title, passage.questions)
        report.n_questions = len(questions)
        replay, nearest_ids, before, gain_before = self._before(passage, questions, progress, index)
        report.qa_before = qa_mod.accuracy(gain_before)
        return Update(passage, index, doc_id, self._seed(passage.hash), edit, edit_id, draft.qas, questions,
                      replay, nearest_ids, before)

    # -- training and checking ---------------------------------------------
    def _attempts(self, update: Update, report: PassageReport, progress: Progress) -> Attempt:
        """Attempts until one is decided; a retry rehearses what the one before forgot."""
        rehearsal: list[Example] = []
        if self.cfg.replay.rehearse_first and update.nearest_ids:
            rehearsal = self._rehearsal([], update.nearest_ids, update.replay, len(update.edit.examples))
        attempt = self._attempt(update, 1, rehearsal, report, progress)
        while attempt.outcome is Outcome.RETRY:
            attempt.candidate.discard()
            attempt = self._attempt(update, attempt.number + 1, attempt.retry_rehearsal, report, progress)
        return attempt

    def _attempt(self, update: Update, number: int, rehearsal: list[Example], report: PassageReport,
                 progress: Progress) -> Attempt:
        """Train once on the self-edit (and `rehearsal`), check the candidate as it
        would be served, and decide. A check that raises leaves no adapter behind."""
        examples = update.edit.examples + rehearsal
        progress("train", {"index": update.index, "examples": len(examples), "attempt": number,
                           "compiles": compiles_next(self.cfg.train)})
        try:
            trained, stats = train_adapter(
                self.live.model, self.live.tokenizer, examples, self.cfg.lora, self.cfg.train,
                seed=update.seed + number - 1, compute_dtype=self.dtypes.train,
                on_step=lambda step, total, loss: progress("step", {"step": step, "total": total, "loss": loss}),
            )
        except TrainingDiverged as e:
            return Attempt(Outcome.DIVERGED, number, error=e)
        # Checked as it would be served: merged (undone exactly unless accepted).
        candidate = Merged(trained)
        report.train = {**stats.as_dict(), "rehearsal_examples": len(rehearsal)}
        try:
            progress("replay" if update.replay else "qa-after",
                     {"index": update.index, "n": len(update.replay), "attempt": number})
            passed, check, gain_after, replay_after = self._check(candidate.peft_model, update, report)
        except BaseException:
            candidate.discard()  # never leave an unchecked update on the live weights
            raise
        retry = None
        if not passed and self.cfg.replay.gate and number < self.cfg.replay.attempts:
            retry = self._rehearsal(check.flipped, check.nearest_ids, update.replay, len(update.edit.examples))
            if Counter(retry) == Counter(rehearsal):
                retry = None  # the same examples again: a retry would only draw another seed
        if check is not None:
            self._record_check(check, passed, number, retry is not None, update.passage.hash, update.doc_id)
        if passed or not self.cfg.replay.gate:
            outcome = Outcome.ACCEPTED
        else:
            outcome = Outcome.REJECTED if retry is None else Outcome.RETRY
        return Attempt(outcome, number, candidate, stats, check, gain_after, replay_after, retry or [])

    def _check(self, candidate, update: Update, report: PassageReport,
               ) -> tuple[bool, forgetting.Check | None, list[qa_mod.Scored], list[tuple[int, bool, str]]]:
        """Score the candidate on the passage's QAs and the replay sample.
        Returns (passes, check, gain answers, replay answers)."""
        questions, replay = update.questions, update.replay
        # One batched call for both: generation is cheaper per question in larger batches.
        scored = self._score(candidate, questions + [q.as_question() for q in replay])
        gain_after, after_scored = scored[: len(questions)], scored[len(questions):]
        report.qa_after = qa_mod.accuracy(gain_after)
        if not replay:
            return True, None, gain_after, []
        check = forgetting.Check(
            replay_ids=[q.id for q in replay], before=update.before,
            after={q.id: s.correct for q, s in zip(replay, after_scored)}, nearest_ids=update.nearest_ids,
            gain_n=len(questions), gain_before=report.qa_before, gain_after=report.qa_after,
        )
        ok = forgetting.passes(check, self.cfg.replay.max_forgetting)
        return ok, check, gain_after, [(q.id, s.correct, s.prediction) for q, s in zip(replay, after_scored)]

    def _forgetting(self, update: Update, attempt: Attempt) -> dict[str, Any] | None:
        """The decided attempt's check as the report tells it (None without a replay bank)."""
        if self.bank is None:
            return None
        decision = "rejected" if attempt.outcome is Outcome.REJECTED else "accepted"
        return forgetting.summary(attempt.check, attempt.number, decision, {q.id: q.question for q in update.replay})

    def _record_check(self, check: forgetting.Check, ok: bool, attempt: int, retry: bool, h: str,
                      doc_id: int) -> None:
        """The check as an event, with what follows from it."""
        if ok:
            label = "accepted"
        elif not self.cfg.replay.gate:
            label = "accepted (gate off)"
        elif retry:
            label = "retry with rehearsal"
        elif attempt >= self.cfg.replay.attempts:
            label = "rejected"
        else:
            label = "rejected (a retry would rehearse the same examples again)"
        self.state.event(
            "learn.check", f"passage {h[:12]} attempt {attempt}: replay {check.accuracy(check.before):.2f}"
            f" -> {check.accuracy(check.after):.2f}, {len(check.flipped)} forgotten: {label}",
            version=self.live.version, document_id=doc_id,
            data=forgetting.summary(check, attempt, label),
        )

    def _before(self, passage: Passage, questions: list[qa_mod.Question], progress: Progress, index: int,
                ) -> tuple[list[BankQA], list[int], dict[int, bool], list[qa_mod.Scored]]:
        """The live model before the update: the replay sample, its correctness on
        it (from the cache where known) and its answers to the passage's questions,
        scored in one batched call."""
        replay: list[BankQA] = []
        nearest_ids: list[int] = []
        if self.bank is not None:
            lineage = self.state.lineage(self.live.version)
            nearest, others = self.bank.replay_sample(
                passage.text, lineage, self.cfg.replay.nearest_k, self.cfg.replay.random_m, passage.hash,
                seed=self._seed(passage.hash))
            replay, nearest_ids = nearest + others, [q.id for q in nearest]
        gain: list[qa_mod.Scored] = []

        def score(missing: list[BankQA]) -> list[qa_mod.Scored]:
            progress("qa-before", {"index": index, "n": len(questions) + len(missing)})
            scored = self._score(self.live.model, questions + [q.as_question() for q in missing])
            gain[:] = scored[: len(questions)]
            return scored[len(questions):]

        before = self.bank.correctness(self.live.version, replay, score) if self.bank is not None else {}
        if questions and not gain:  # every replay answer was cached (or there is no bank)
            score([])
        return replay, nearest_ids, before, gain

    def _rehearsal(self, flipped: list[int], nearest_ids: list[int], replay: list[BankQA], n_new: int,
                   ) -> list[Example]:
        """Training sequences of the passages behind the forgotten QAs, then the
        nearest ones: each passage with its accepted self-edit, as it was learned."""
        by_id = {q.id: q for q in replay}
        hashes: list[str] = []
        for qa_id in flipped + nearest_ids:
            h = by_id[qa_id].passage_hash
            if h not in hashes:
                hashes.append(h)
        budget = max(1, round(self.cfg.replay.rehearsal_ratio * n_new))
        passages: list[Example] = []
        items: list[Example] = []
        for h in hashes[: self.cfg.replay.rehearsal_passages]:
            row = self.state.passage(h)
            if row is None:
                continue
            accepted = [e for e in self.state.self_edits(h) if e["outcome"] == "accepted"]
            edit_text = accepted[-1]["text"] if accepted else ""
            *edit_items, text = self.policy.examples(edit_text, row["title"], row["text"])
            passages.append(text)
            items.extend(edit_items)
        # every passage's own text first, then self-edit items, within the budget
        examples = passages + items
        return examples[:budget]

    # -- the outcomes ------------------------------------------------------
    def _duplicate(self, report: PassageReport, version: int, doc_id: int, progress: Progress) -> PassageReport:
        report.status, report.duplicate_of = "duplicate", version
        self.state.set_passage_status(doc_id, report.index, "duplicate", version)
        self.state.event("learn.duplicate", f"passage {report.hash[:12]} already learned in version {version}",
                         version=version, document_id=doc_id)
        progress("duplicate", {"index": report.index, "version": version})
        return report

    def _diverged(self, e: TrainingDiverged, update: Update, report: PassageReport, progress: Progress,
                  t0: float) -> PassageReport:
        report.error = str(e)
        self.state.set_self_edit_outcome(update.edit_id, "diverged")
        self.state.set_passage_status(update.doc_id, update.index, "failed")
        self.state.event("learn.diverged", str(e), version=self.live.version, document_id=update.doc_id,
                         data={"passage": report.hash})
        progress("failed", {"index": update.index, "error": str(e)})
        report.seconds = time.perf_counter() - t0
        return report

    def _rejected(self, update: Update, report: PassageReport, progress: Progress, t0: float) -> PassageReport:
        f = report.forgetting or {}
        report.status = "rejected-forgetting"
        attempts = f.get("attempts") or 0
        report.error = (f"update would forget {len(f.get('flipped', []))} of the replay QAs the model knew "
                        f"(replay accuracy {f.get('before')} -> {f.get('after')}) after {attempts} "
                        + ("attempt" if attempts == 1 else "attempts")
                        + (" (a retry would have rehearsed the same examples again)"
                           if attempts < self.cfg.replay.attempts else ""))
        with self.state.transaction() as c:
            self.state.set_self_edit_outcome(update.edit_id, "rejected-forgetting", conn=c)
            self.state.set_passage_status(update.doc_id, update.index, "rejected-forgetting", conn=c,
                                          info={"forgetting": f, "qa_generated": report.qa_generated})
            self.state.event("learn.rejected", f"passage {report.hash[:12]} rejected: {report.error}",
                             version=self.live.version, document_id=update.doc_id, conn=c,
                             data={"passage": report.hash, "forgetting": f})
        progress("rejected", {"index": update.index, "forgetting": f})
        report.seconds = time.perf_counter() - t0
        return report

    # -- commit ----------------------------------------------------------
    def _commit(self, update: Update, attempt: Attempt, report: PassageReport) -> int:
        """Make the accepted candidate the next version, in a crash-safe order: its
        adapter directory is complete and renamed into place before the database
        commits the version, and the version is live only once that commit is
        done (a directory the database never recorded is moved aside by the
        next owner: live.discard_uncommitted)."""
        candidate, parent = attempt.candidate, self.live.version
        version = self.live.next_version()
        manifest = self._manifest(update, attempt, report, version, parent)
        with_qas = self.bank is not None and update.new_qas
        vectors = self.bank.embed(update.passage.title, list(update.new_qas)) if with_qas else None
        try:
            with self.live.log.staging(version) as version_dir:
                candidate.peft_model.save_pretrained(str(version_dir))
                self.live.model = candidate.keep()  # the merge, for good: what is fingerprinted and served
                fp = fingerprints(self.live.model, self.live.tokenizer)
                self.live.log.write_manifest(version_dir, {**manifest, "fingerprint": fp})
            self._record_version(update, attempt, report, manifest, fp, vectors)
        except BaseException:
            if candidate.kept:  # merged for good in memory but not recorded: rebuild the parent exactly
                self.live.load(parent)
            else:
                self.live.model = candidate.discard()
            raise
        self.live.version = version
        if self.bank is not None:
            self.bank.sync()
        self.live.snapshot_if_due()
        return version

    def _manifest(self, update: Update, attempt: Attempt, report: PassageReport, version: int,
                  parent: int) -> dict[str, Any]:
        """What the version's directory says of it (its fingerprint is added once the merge is kept)."""
        passage = update.passage
        return {
            "version": version,
            "parent": parent,
            "created_at": now(),
            "document": {"id": update.doc_id, "path": self.state.document(update.doc_id)["path"]},
            "passages": [{"hash": passage.hash, "title": passage.title, "index": update.index}],
            "policy": self._policy_label(),
            "self_edit": update.edit.text,
            "lora": to_dict(self.cfg.lora),
            "train": {**to_dict(self.cfg.train), "dtype": str(self.dtypes.train).removeprefix("torch.")},
            "stats": attempt.stats.as_dict(),
            "qa": {"before": report.qa_before, "after": report.qa_after, "n": report.n_questions}
            if report.n_questions else None,
            "forgetting": report.forgetting,
        }

    def _record_version(self, update: Update, attempt: Attempt, report: PassageReport, manifest: dict[str, Any],
                        fp: dict[str, str], vectors) -> None:
        """The database's half of the commit, one transaction: the version made
        live, the passage and its self-edit marked, its QAs in the replay bank."""
        version, doc_id, passage = manifest["version"], update.doc_id, update.passage
        row = VersionRow(
            version=version, parent=manifest["parent"], created_at=manifest["created_at"], document_id=doc_id,
            passage_hashes=[passage.hash], fingerprint=fp["weights"],
            stats={k: manifest[k] for k in ("policy", "lora", "train", "stats", "qa", "forgetting")}
            | {"logits_fingerprint": fp["logits"], "self_edit_id": update.edit_id},
        )
        with self.state.transaction() as c:
            self.state.add_version(row, conn=c)
            self.state.set_meta("live_version", str(version), conn=c)
            self.state.set_passage_status(doc_id, update.index, "learned", version, conn=c,
                                          info={"forgetting": report.forgetting,
                                                "qa_generated": report.qa_generated,
                                                "checked": report.checked})
            self.state.set_self_edit_outcome(update.edit_id, "accepted", version, conn=c)
            if self.bank is not None:
                new_qas = list(update.new_qas)
                ids = self.bank.add(new_qas, vectors, passage_hash=passage.hash, title=passage.title,
                                    document_id=doc_id, version=version, conn=c) if new_qas else []
                # What the candidate answered is what this version knows
                # (it answered with these very merged weights).
                self.bank.record(version, [(i, s.correct, s.prediction) for i, s in zip(ids, attempt.gain_after)],
                                 conn=c)
                self.bank.record(version, attempt.replay_after, conn=c)
            self.state.event("learn.accepted", f"version {version}: learned passage {passage.hash[:12]}",
                             version=version, document_id=doc_id, conn=c,
                             data={"parent": manifest["parent"], "qa": manifest["qa"],
                                   "loss": attempt.stats.final_loss, "forgetting": report.forgetting})
