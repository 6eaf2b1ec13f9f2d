"""Knowledge modules and the router that picks one for a question.

With `memory.mode = "modules"` a learned document is a LoRA module of its own,
trained on the consolidated weights and never merged into them: learning a
document cannot change what any other document's module, or the consolidated
model, answers. A module is stored like every other update, as a plain PEFT
adapter with its manifest (`adapters/modules/m0007/`), and as a row of the
`modules` table. Its *keys* (the passage it learned, and each of its sentences,
embedded) are rows of `module_keys`; a version of the knowledge is the
consolidated weights plus its routing table, the module ids listed in the
version's row (`routed`).

The router scores each routed module for a question by two signals: the
cosine similarity of the question's embedding to the module's nearest key
(FAISS over the keys of the routing table), plus `memory.lexical_weight` times
the share of the question's terms its passages contain (memory/lexical.py: the
embedding alone puts a question near every passage of its article; the rarer
words say which one). The best-scoring module is applied when its score reaches
`memory.route_threshold`; below it no module is applied and the consolidated
weights answer alone. The router never sees the questions a user will ask:
only the passages and their sentences.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from ..qa.writing import sentences
from .adapter_log import AdapterLog
from .embedding import Embedder
from .lexical import Overlap
from .state import State, now


@dataclass(frozen=True)
class Module:
    id: int
    document_id: int | None
    passage_hashes: list[str]
    trained_on: int  # the version whose weights it was trained on
    created_at: str
    stats: dict[str, Any]

    @property
    def flagged(self) -> str | None:
        """Why the module's learning is in doubt (None: its questions improved)."""
        return self.stats.get("flagged")


def _module(r: sqlite3.Row) -> Module:
    return Module(r["id"], r["document_id"], json.loads(r["passage_hashes"]), r["trained_on"], r["created_at"],
                  json.loads(r["stats"]))


def key_texts(title: str, text: str) -> list[str]:
    """What a passage is found by: the passage, and each of its sentences (a
    question is usually about one), each under its title."""
    return [f"{title}\n{text}"] + [f"{title}: {s}" for s in sentences(text)]


@dataclass(frozen=True)
class Route:
    """The module a question is answered with (None: the consolidated weights alone)."""

    module: int | None
    score: float  # the best module's score: similarity + lexical_weight * overlap (-1 when nothing is routed)
    nearest: int | None = None  # the best-scoring module, applied or not
    similarity: float | None = None  # its nearest key's cosine similarity to the question
    overlap: float | None = None  # the share of the question's terms its passages contain


class ModuleStore:
    """The modules' rows and keys (SQL) and their adapters on disk."""

    def __init__(self, state: State, log: AdapterLog):
        self.state, self.log = state, log

    def next_id(self) -> int:
        top = self.state.query("SELECT COALESCE(MAX(id), 0) AS m FROM modules")[0]["m"]
        return max(int(top), max(self.log.versions(), default=0)) + 1

    def add(self, module: Module, keys: list[str], vectors: np.ndarray, conn: sqlite3.Connection) -> None:
        """Record a module and its keys, inside the caller's transaction."""
        conn.execute(
            "INSERT INTO modules(id, document_id, passage_hashes, trained_on, created_at, stats)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (module.id, module.document_id, json.dumps(module.passage_hashes), module.trained_on,
             module.created_at, json.dumps(module.stats)))
        for text, v in zip(keys, vectors):
            conn.execute("INSERT INTO module_keys(module_id, text, embedding) VALUES (?, ?, ?)",
                         (module.id, text, np.asarray(v, dtype=np.float32).tobytes()))

    def copy_keys(self, src: int, dst: int, conn: sqlite3.Connection) -> None:
        """Module `dst` is found by the keys of `src` (a module retrained on new weights: same passages)."""
        conn.execute("INSERT INTO module_keys(module_id, text, embedding)"
                     " SELECT ?, text, embedding FROM module_keys WHERE module_id = ? ORDER BY id", (dst, src))

    def get(self, module_id: int) -> Module | None:
        rows = self.state.query("SELECT * FROM modules WHERE id = ?", (module_id,))
        return _module(rows[0]) if rows else None

    def all(self) -> list[Module]:
        return [_module(r) for r in self.state.query("SELECT * FROM modules ORDER BY id")]

    def of(self, ids: Iterable[int]) -> list[Module]:
        ids = list(ids)
        if not ids:
            return []
        rows = self.state.query(f"SELECT * FROM modules WHERE id IN ({','.join('?' * len(ids))})", tuple(ids))
        by_id = {r["id"]: _module(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def keys(self, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(module id per key, key vectors) of the modules `ids`."""
        ids = sorted(set(ids))
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        rows = self.state.query(
            f"SELECT module_id, embedding FROM module_keys WHERE module_id IN ({','.join('?' * len(ids))})"
            " ORDER BY id", tuple(ids))
        owners = np.array([r["module_id"] for r in rows], dtype=np.int64)
        vectors = np.stack([np.frombuffer(r["embedding"], dtype=np.float32) for r in rows]) if rows else \
            np.zeros((0, 0), dtype=np.float32)
        return owners, vectors

    def passages(self, module: Module) -> list[tuple[str, str]]:
        """(title, text) of each passage the module learned."""
        if not module.passage_hashes:
            return []
        rows = self.state.query(
            f"SELECT hash, title, text FROM passages WHERE hash IN ({','.join('?' * len(module.passage_hashes))})"
            " GROUP BY hash", tuple(module.passage_hashes))
        by_hash = {r["hash"]: (r["title"], r["text"]) for r in rows}
        return [by_hash[h] for h in module.passage_hashes if h in by_hash]

    def path(self, module_id: int):
        return self.log.path(module_id)

    def discard_uncommitted(self) -> list[int]:
        """A module directory the database never recorded was never routed: moved aside
        (for the state directory's owner only, as live.discard_uncommitted)."""
        known = {r["id"] for r in self.state.query("SELECT id FROM modules")}
        discarded = []
        for m in self.log.versions():
            if m not in known:
                where = self.log.quarantine(m, "written but never committed to the database (interrupted learning)")
                self.state.event("discard", f"uncommitted module m{m:04d} moved to {where}")
                discarded.append(m)
        return discarded


class Router:
    """Questions -> the module to answer each with, over one routing table."""

    # Modules scored per question: those owning its nearest keys by embedding.
    # A module further off could still win on overlap; the bound keeps scoring
    # cheap over thousands of modules (`eval routing` measures recall with it).
    CANDIDATE_KEYS = 64

    def __init__(self, embedder: Embedder, owners: np.ndarray, vectors: np.ndarray, threshold: float, *,
                 texts: dict[int, str] | None = None, titles: dict[int, str] | None = None,
                 lexical_weight: float = 0.0):
        self.embedder, self.owners, self.threshold = embedder, owners, threshold
        self.lexical_weight = lexical_weight if texts else 0.0
        self.overlap = Overlap(texts or {}, titles)
        self.index = faiss.IndexFlatIP(embedder.dim)
        if len(owners):
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    @classmethod
    def over(cls, store: ModuleStore, embedder: Embedder, routed: Iterable[int], threshold: float,
             lexical_weight: float = 0.0) -> Router:
        routed = list(routed)
        owners, vectors = store.keys(routed)
        passages = {m.id: store.passages(m) for m in store.of(routed)} if lexical_weight else {}
        texts = {m: "\n".join(f"{title}\n{text}" for title, text in ps) for m, ps in passages.items()}
        titles = {m: "\n".join(sorted({title for title, _ in ps})) for m, ps in passages.items()}
        return cls(embedder, owners, vectors, threshold, texts=texts or None, titles=titles,
                   lexical_weight=lexical_weight)

    @property
    def modules(self) -> int:
        return len(set(self.owners.tolist()))

    def rank_vectors(self, queries: np.ndarray, texts: list[str] | None = None) -> list[list[Route]]:
        """Each query's candidate modules as routes, best first (the first is its route).
        `texts`: the queries' words, for the lexical signal (None: embedding alone)."""
        if self.index.ntotal == 0 or len(queries) == 0:
            return [[Route(None, -1.0)] for _ in range(len(queries))]
        lexical = bool(self.lexical_weight) and texts is not None
        k = min(self.index.ntotal, self.CANDIDATE_KEYS)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        out = []
        for i, (s_row, r_row) in enumerate(zip(scores, rows)):
            similarity: dict[int, float] = {}
            for s, r in zip(s_row, r_row):
                if r >= 0:
                    similarity.setdefault(int(self.owners[r]), float(s))  # rows come best first
            terms = self.overlap.terms(texts[i]) if lexical else {}
            ranked = []
            for m, sim in similarity.items():
                overlap = self.overlap.score(terms, m) if lexical else None
                score = sim + self.lexical_weight * overlap if lexical else sim
                ranked.append(Route(m if score >= self.threshold else None, score, m, sim, overlap))
            out.append(sorted(ranked, key=lambda r: -r.score))
        return out

    def route_vectors(self, queries: np.ndarray, texts: list[str] | None = None) -> list[Route]:
        """Each query's route: its best-scoring module, if it scores high enough."""
        return [ranked[0] for ranked in self.rank_vectors(queries, texts)]

    def rank(self, texts: list[str]) -> list[list[Route]]:
        return self.rank_vectors(self.embedder.embed(texts), texts) if texts else []

    def route(self, texts: list[str]) -> list[Route]:
        return self.route_vectors(self.embedder.embed(texts), texts) if texts else []


def new_module(module_id: int, document_id: int | None, passage_hashes: list[str], trained_on: int,
               stats: dict[str, Any]) -> Module:
    return Module(module_id, document_id, passage_hashes, trained_on, now(), stats)
