"""The replay QA bank: question-answer pairs of everything learned, in SQLite and FAISS.

Every kept QA is a row of `qas` (question, answer, passage, document, gold or
generated, the version that learned it, its embedding); `qa_results` caches
whether a given version's weights answer it correctly, so the "before" side of
a forgetting check is not recomputed. The FAISS index (exact inner product over
normalized vectors, ids = `qas.id`) is a cache of the `embedding` column: it is
saved next to the database and rebuilt from it whenever it is missing, corrupt
or out of step (a crash between the database commit and the index write).

Only QAs learned by versions in the live version's lineage count as knowledge
the model should have: after a rollback, the QAs of the undone versions are
kept but left out of replay until a version on the live line learns them again.
"""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..qa.answering import Question, Scored
from .embedding import Embedder
from .state import State, now


@dataclass(frozen=True)
class BankQA:
    id: int
    question: str
    answer: str
    passage_hash: str
    title: str
    document_id: int | None
    source: str
    version: int

    def as_question(self) -> Question:
        """To be asked with no passage in context."""
        return Question(self.question, self.answer, self.title)


@dataclass(frozen=True)
class NewQA:
    question: str
    answer: str
    source: str  # gold | generated


def _row(r: sqlite3.Row) -> BankQA:
    return BankQA(r["id"], r["question"], r["answer"], r["passage_hash"], r["title"], r["document_id"],
                  r["source"], r["version"])


def qa_text(title: str, question: str, answer: str) -> str:
    """What is embedded for a QA: its topic, question and answer."""
    return f"{title}: {question} {answer}".strip(": ")


def counts(state: State) -> dict[str, Any]:
    """The bank's size from the database alone (no embedder, no index)."""
    total = state.query("SELECT COUNT(*) AS n, COUNT(DISTINCT document_id) AS d, COUNT(DISTINCT passage_hash) AS p"
                        " FROM qas")[0]
    rows = state.query("SELECT source, COUNT(*) AS n FROM qas GROUP BY source")
    return {"qas": total["n"], "documents": total["d"], "passages": total["p"],
            "by_source": {r["source"]: r["n"] for r in rows}}


class ReplayBank:
    def __init__(self, state: State, embedder: Embedder, index_path: Path):
        self.state = state
        self.embedder = embedder
        self.index_path = index_path
        self.index = self._open_index()

    # -- the FAISS index (a cache of qas.embedding) -------------------------
    def _empty(self) -> faiss.IndexIDMap2:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.embedder.dim))

    def _ids(self) -> np.ndarray:
        return np.array([r["id"] for r in self.state.query("SELECT id FROM qas ORDER BY id")], dtype=np.int64)

    def _open_index(self) -> faiss.IndexIDMap2:
        ids = self._ids()
        if self.index_path.exists():
            try:
                index = faiss.read_index(str(self.index_path))
                if (index.d == self.embedder.dim
                        and np.array_equal(np.sort(faiss.vector_to_array(index.id_map)), ids)):
                    return index
            except RuntimeError:
                pass  # unreadable: rebuilt below
        return self.rebuild()

    def rebuild(self) -> faiss.IndexIDMap2:
        """Rebuild the index from the embeddings stored in SQLite, and save it."""
        index = self._empty()
        rows = self.state.query("SELECT id, embedding FROM qas ORDER BY id")
        if rows:
            vectors = np.stack([np.frombuffer(r["embedding"], dtype=np.float32) for r in rows])
            if vectors.shape[1] != self.embedder.dim:  # embedder changed: re-embed everything
                vectors = self._reembed()
            index.add_with_ids(vectors, np.array([r["id"] for r in rows], dtype=np.int64))
        self.index = index
        self._save()
        return index

    def _reembed(self) -> np.ndarray:
        rows = self.state.query("SELECT id, title, question, answer FROM qas ORDER BY id")
        vectors = self.embedder.embed([qa_text(r["title"], r["question"], r["answer"]) for r in rows])
        with self.state.transaction() as c:
            for r, v in zip(rows, vectors):
                c.execute("UPDATE qas SET embedding = ? WHERE id = ?", (v.tobytes(), r["id"]))
        return vectors

    def _save(self) -> None:
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_suffix(".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, self.index_path)

    # -- writing ---------------------------------------------------------
    def embed(self, title: str, qas: list[NewQA]) -> np.ndarray:
        return self.embedder.embed([qa_text(title, q.question, q.answer) for q in qas])

    def add(self, qas: list[NewQA], vectors: np.ndarray, *, passage_hash: str, title: str,
            document_id: int | None, version: int, conn: sqlite3.Connection | None = None) -> list[int]:
        """Store QAs with their `embed()` vectors (a QA already in the bank for
        this passage is re-dated to `version`); returns their ids. Call `sync()`
        after the transaction commits."""
        ids = []
        for q, v in zip(qas, vectors):
            self.state.write(
                "INSERT INTO qas(question, answer, passage_hash, title, document_id, source, version, embedding,"
                " added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(passage_hash, question, answer) DO UPDATE SET version = excluded.version",
                (q.question, q.answer, passage_hash, title, document_id, q.source, version, v.tobytes(), now()),
                conn,
            )
            row = (conn or self.state.conn).execute(
                "SELECT id FROM qas WHERE passage_hash = ? AND question = ? AND answer = ?",
                (passage_hash, q.question, q.answer)).fetchone()
            ids.append(int(row[0]))
        return ids

    def sync(self) -> None:
        """Bring the index up to the database (after QAs were committed)."""
        known = set(faiss.vector_to_array(self.index.id_map).tolist())
        missing = [int(i) for i in self._ids() if int(i) not in known]
        if not missing:
            return
        rows = self.state.query(
            f"SELECT id, embedding FROM qas WHERE id IN ({','.join('?' * len(missing))}) ORDER BY id",
            tuple(missing))
        vectors = np.stack([np.frombuffer(r["embedding"], dtype=np.float32) for r in rows])
        self.index.add_with_ids(vectors, np.array([r["id"] for r in rows], dtype=np.int64))
        self._save()

    def record(self, version: int, results: Iterable[tuple[int, bool, str]],
               conn: sqlite3.Connection | None = None) -> None:
        """Cache correctness of `version` on QAs: (qa id, correct, prediction)."""
        for qa_id, correct, prediction in results:
            self.state.write(
                "INSERT INTO qa_results(qa_id, version, correct, prediction) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(qa_id, version) DO UPDATE SET correct = excluded.correct,"
                " prediction = excluded.prediction",
                (qa_id, version, int(correct), prediction), conn,
            )

    # -- reading ---------------------------------------------------------
    def get(self, ids: Iterable[int]) -> list[BankQA]:
        ids = list(ids)
        if not ids:
            return []
        rows = self.state.query(f"SELECT * FROM qas WHERE id IN ({','.join('?' * len(ids))})", tuple(ids))
        by_id = {r["id"]: _row(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def active(self, lineage: Iterable[int]) -> list[BankQA]:
        """QAs learned by versions in `lineage` (the live line)."""
        versions = list(lineage)
        if not versions:
            return []
        rows = self.state.query(
            f"SELECT * FROM qas WHERE version IN ({','.join('?' * len(versions))}) ORDER BY id", tuple(versions))
        return [_row(r) for r in rows]

    def cached(self, version: int, ids: Iterable[int]) -> dict[int, bool]:
        ids = list(ids)
        if not ids:
            return {}
        rows = self.state.query(
            f"SELECT qa_id, correct FROM qa_results WHERE version = ? AND qa_id IN ({','.join('?' * len(ids))})",
            (version, *ids))
        return {r["qa_id"]: bool(r["correct"]) for r in rows}

    def correctness(self, version: int, qas: list[BankQA],
                    score: Callable[[list[BankQA]], list[Scored]]) -> dict[int, bool]:
        """Whether `version` answers each QA right: from the cache where known; the
        rest scored with `score` (a model holding `version`'s weights) and cached."""
        known = self.cached(version, [q.id for q in qas])
        missing = [q for q in qas if q.id not in known]
        if missing:
            scored = score(missing)
            self.record(version, [(q.id, s.correct, s.prediction) for q, s in zip(missing, scored)])
            known.update({q.id: s.correct for q, s in zip(missing, scored)})
        return known

    def search(self, text: str, k: int, allowed: Iterable[int] | None = None) -> list[tuple[BankQA, float]]:
        """The k QAs nearest to `text` (cosine), optionally only among `allowed` ids."""
        if self.index.ntotal == 0 or k <= 0:
            return []
        query = self.embedder.embed([text])
        params = None
        if allowed is not None:
            allowed = np.array(sorted(set(allowed)), dtype=np.int64)
            if allowed.size == 0:
                return []
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        k = min(k, self.index.ntotal)
        scores, ids = self.index.search(query, k, params=params)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        qas = {q.id: q for q in self.get(i for i, _ in hits)}
        return [(qas[i], s) for i, s in hits if i in qas]

    def replay_sample(self, text: str, lineage: list[int], k: int, m: int, exclude_passage: str,
                      seed: int = 0) -> tuple[list[BankQA], list[BankQA]]:
        """The k active QAs nearest to `text` (most at risk of interference) and
        m others drawn at random, all from passages other than `exclude_passage`."""
        pool = [q for q in self.active(lineage) if q.passage_hash != exclude_passage]
        nearest = [q for q, _ in self.search(text, k, allowed=[q.id for q in pool])]
        taken = {q.id for q in nearest}
        rest = [q for q in pool if q.id not in taken]
        others = random.Random(seed).sample(rest, min(m, len(rest)))
        return nearest, others

    def stats(self, lineage: list[int]) -> dict[str, Any]:
        active = self.active(lineage)
        return {
            **counts(self.state),
            "active_qas": len(active),
            "index_vectors": int(self.index.ntotal),
            "embedder": self.embedder.name,
            "dim": self.embedder.dim,
            "index_path": str(self.index_path),
        }
