"""The state database (SQLite): documents, passages, self-edits, versions, events.

Everything a user may want to look back on lives here, so `sqlite3 state/seal.db`
answers questions the CLI does not. The live version is a row in `meta`; it is
changed in the same transaction that records a new version, so a crash leaves
either the old live version or the new one, never a half-state.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE documents (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        title TEXT,
        kind TEXT,
        status TEXT NOT NULL,          -- learning | done | rejected-forgetting | failed | interrupted
        added_at TEXT NOT NULL,
        finished_at TEXT,
        info TEXT                      -- JSON: the learn report
    );
    CREATE TABLE passages (
        document_id INTEGER NOT NULL REFERENCES documents(id),
        idx INTEGER NOT NULL,
        hash TEXT NOT NULL,
        title TEXT NOT NULL,
        text TEXT NOT NULL,
        n_questions INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL DEFAULT 'pending',  -- learned | duplicate | failed | rejected-forgetting | pending
        version INTEGER,
        PRIMARY KEY (document_id, idx)
    );
    CREATE INDEX passages_hash ON passages(hash);
    CREATE TABLE versions (
        version INTEGER PRIMARY KEY,
        parent INTEGER REFERENCES versions(version),
        created_at TEXT NOT NULL,
        document_id INTEGER REFERENCES documents(id),
        passage_hashes TEXT NOT NULL,  -- JSON list
        fingerprint TEXT NOT NULL,     -- sha256 of probe logits, for exact rollback checks
        stats TEXT NOT NULL            -- JSON: hyperparameters, losses, timing, QA
    );
    CREATE TABLE self_edits (
        id INTEGER PRIMARY KEY,
        passage_hash TEXT NOT NULL,
        document_id INTEGER REFERENCES documents(id),
        policy TEXT NOT NULL,
        prompt TEXT NOT NULL,
        text TEXT NOT NULL,
        n_items INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        version INTEGER,               -- the version it produced, if accepted
        outcome TEXT                   -- accepted | failed | ...
    );
    CREATE INDEX self_edits_passage ON self_edits(passage_hash);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        kind TEXT NOT NULL,
        version INTEGER,
        document_id INTEGER,
        message TEXT NOT NULL,
        data TEXT
    );
    """,
    # 2: the replay QA bank (issue 4). Embeddings live here too, so the FAISS
    # index can always be rebuilt from the database.
    """
    CREATE TABLE qas (
        id INTEGER PRIMARY KEY,
        question TEXT NOT NULL,
        answer TEXT NOT NULL,
        passage_hash TEXT NOT NULL,
        title TEXT NOT NULL,
        document_id INTEGER REFERENCES documents(id),
        source TEXT NOT NULL,          -- gold | generated
        version INTEGER NOT NULL,      -- the version that learned the passage
        embedding BLOB NOT NULL,       -- float32, L2-normalized
        added_at TEXT NOT NULL,
        UNIQUE (passage_hash, question, answer)
    );
    CREATE INDEX qas_passage ON qas(passage_hash);
    CREATE TABLE qa_results (
        qa_id INTEGER NOT NULL REFERENCES qas(id),
        version INTEGER NOT NULL,      -- correctness of this version's weights
        correct INTEGER NOT NULL,
        prediction TEXT,
        PRIMARY KEY (qa_id, version)
    );
    ALTER TABLE passages ADD COLUMN info TEXT;  -- JSON: QA generation and forgetting check
    """,
    # 3: the daemon's durable job queue (issue 5).
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,            -- document | task
        name TEXT NOT NULL,            -- file name, or the task's name
        path TEXT,                     -- the file being learned
        sha256 TEXT,
        source TEXT NOT NULL,          -- inbox | api | schedule | cli
        state TEXT NOT NULL,           -- queued | learning | done | rejected | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        document_id INTEGER,
        result TEXT,                   -- JSON
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE INDEX jobs_sha ON jobs(sha256);
    """,
    # 4: ReSTEM (issue 6): every refresh round, and how often each context was used.
    """
    CREATE TABLE restem_rounds (
        id INTEGER PRIMARY KEY,
        policy TEXT NOT NULL,          -- the policy file's name (e.g. implications)
        started_at TEXT NOT NULL,
        finished_at TEXT,
        decision TEXT,                 -- promoted | kept | interrupted | failed
        policy_version INTEGER,        -- the promoted version after the round
        record TEXT                    -- JSON: the round's full record
    );
    CREATE TABLE restem_contexts (
        policy TEXT NOT NULL,
        context_id TEXT NOT NULL,      -- passage hash
        uses INTEGER NOT NULL DEFAULT 0,
        last_round INTEGER,
        PRIMARY KEY (policy, context_id)
    );
    """,
    # 5: knowledge modules (issue 19). A version's routing table (the module ids
    # it answers with) and its kind (merge | module | consolidation) are in its stats.
    """
    CREATE TABLE modules (
        id INTEGER PRIMARY KEY,        -- adapters/modules/m<id>
        document_id INTEGER REFERENCES documents(id),
        passage_hashes TEXT NOT NULL,  -- JSON list
        trained_on INTEGER NOT NULL,   -- the version whose weights it was trained on
        created_at TEXT NOT NULL,
        stats TEXT NOT NULL            -- JSON: training, QA before/after, flagged
    );
    CREATE TABLE module_keys (
        id INTEGER PRIMARY KEY,
        module_id INTEGER NOT NULL REFERENCES modules(id),
        text TEXT NOT NULL,            -- a passage or one of its sentences
        embedding BLOB NOT NULL        -- float32, L2-normalized
    );
    CREATE INDEX module_keys_module ON module_keys(module_id);
    """,
    # 6: skill modules (issue 21): the ARC tasks the daemon was given (memory/skills.py).
    """
    CREATE TABLE skills (
        id INTEGER PRIMARY KEY,        -- adapters/skills/s<id> when adapter = 1
        document_id INTEGER REFERENCES documents(id),
        task_id TEXT NOT NULL,
        task TEXT NOT NULL,            -- JSON: demonstrations, test inputs, solutions if given
        adapter INTEGER NOT NULL,      -- 1: the trained adapter is kept, 0: nothing was trained
        created_at TEXT NOT NULL,
        record TEXT NOT NULL           -- JSON: self-edit, answers, verdicts, training, seconds
    );
    CREATE INDEX skills_document ON skills(document_id);
    """,
]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class VersionRow:
    version: int
    parent: int | None
    created_at: str
    document_id: int | None
    passage_hashes: list[str]
    fingerprint: str
    stats: dict[str, Any]


class State:
    """Thread-safe access to the state database (one connection, one lock)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def write(self, sql: str, args: tuple, conn: sqlite3.Connection | None) -> int:
        """Run one write inside the caller's transaction `conn`, or in its own."""
        if conn is not None:
            return int(conn.execute(sql, args).lastrowid or 0)
        with self.transaction() as c:
            return int(c.execute(sql, args).lastrowid or 0)

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self.transaction() as c:
            current = c.execute("PRAGMA user_version").fetchone()[0]
            for i, script in enumerate(SCHEMA[current:], start=current + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version = {i}")

    # -- meta / live version ---------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    def set_meta(self, key: str, value: str, conn: sqlite3.Connection | None = None) -> None:
        sql = "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        self.write(sql, (key, value), conn)

    def live_version(self) -> int | None:
        value = self.get_meta("live_version")
        return None if value is None else int(value)

    # -- versions --------------------------------------------------------
    def add_version(self, row: VersionRow, conn: sqlite3.Connection) -> None:
        """Record a version (inside the caller's transaction, with whatever else must land with it)."""
        self.write(
            "INSERT INTO versions(version, parent, created_at, document_id, passage_hashes, fingerprint, stats)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.version, row.parent, row.created_at, row.document_id,
             json.dumps(row.passage_hashes), row.fingerprint, json.dumps(row.stats)),
            conn,
        )

    @staticmethod
    def _version(r: sqlite3.Row) -> VersionRow:
        return VersionRow(
            version=r["version"], parent=r["parent"], created_at=r["created_at"],
            document_id=r["document_id"], passage_hashes=json.loads(r["passage_hashes"]),
            fingerprint=r["fingerprint"], stats=json.loads(r["stats"]),
        )

    def version(self, version: int) -> VersionRow | None:
        rows = self.query("SELECT * FROM versions WHERE version = ?", (version,))
        return self._version(rows[0]) if rows else None

    def versions(self) -> list[VersionRow]:
        return [self._version(r) for r in self.query("SELECT * FROM versions ORDER BY version")]

    def max_version(self) -> int:
        return self.query("SELECT COALESCE(MAX(version), -1) AS v FROM versions")[0]["v"]

    def lineage(self, version: int) -> list[int]:
        """Versions from the base (0) to `version`, in merge order."""
        parents = {r["version"]: r["parent"] for r in self.query("SELECT version, parent FROM versions")}
        if version not in parents:
            raise KeyError(version)
        chain = []
        v: int | None = version
        while v is not None:
            chain.append(v)
            v = parents[v]
        return chain[::-1]

    def weights_lineage(self, version: int) -> list[int]:
        """The versions of `version`'s lineage that changed the weights (merges,
        consolidations), in merge order: a module version only routes."""
        kinds = {r["version"]: json.loads(r["stats"]).get("kind", "merge")
                 for r in self.query("SELECT version, stats FROM versions")}
        return [v for v in self.lineage(version) if kinds[v] != "module"]

    def learned_passages(self, version: int) -> dict[str, int]:
        """passage hash -> the version that learned it, for passages in `version`'s lineage."""
        learned: dict[str, int] = {}
        for v in self.lineage(version):
            row = self.version(v)
            for h in row.passage_hashes if row else []:
                learned.setdefault(h, v)
        return learned

    # -- documents, passages, self-edits ---------------------------------
    def add_document(self, path: str, sha256: str, title: str, kind: str) -> int:
        return self.write(
            "INSERT INTO documents(path, sha256, title, kind, status, added_at) VALUES (?, ?, ?, ?, 'learning', ?)",
            (path, sha256, title, kind, now()), None,
        )

    def finish_document(self, doc_id: int, status: str, info: dict[str, Any]) -> None:
        self.write(
            "UPDATE documents SET status = ?, finished_at = ?, info = ? WHERE id = ?",
            (status, now(), json.dumps(info), doc_id), None,
        )

    def interrupt_documents(self) -> list[int]:
        """Documents left `learning` by a process that died mid-document (kill -9, power
        loss) become `interrupted`, as the learner marks one whose learning it stops
        itself. Only for the process that owns the state directory (the daemon, at start)."""
        with self.transaction() as c:
            ids = [r["id"] for r in c.execute("SELECT id FROM documents WHERE status = 'learning'").fetchall()]
            c.execute("UPDATE documents SET status = 'interrupted', finished_at = ? WHERE status = 'learning'",
                      (now(),))
        return ids

    def document(self, doc_id: int) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM documents WHERE id = ?", (doc_id,))
        return rows[0] if rows else None

    def add_passage(self, doc_id: int, idx: int, hash_: str, title: str, text: str, n_questions: int) -> None:
        self.write(
            "INSERT INTO passages(document_id, idx, hash, title, text, n_questions) VALUES (?, ?, ?, ?, ?, ?)",
            (doc_id, idx, hash_, title, text, n_questions), None,
        )

    def set_passage_status(self, doc_id: int, idx: int, status: str, version: int | None = None,
                           conn: sqlite3.Connection | None = None, info: dict[str, Any] | None = None) -> None:
        if info is None:
            sql = "UPDATE passages SET status = ?, version = ? WHERE document_id = ? AND idx = ?"
            self.write(sql, (status, version, doc_id, idx), conn)
        else:
            sql = "UPDATE passages SET status = ?, version = ?, info = ? WHERE document_id = ? AND idx = ?"
            self.write(sql, (status, version, json.dumps(info), doc_id, idx), conn)

    def passage(self, hash_: str) -> sqlite3.Row | None:
        """The latest stored passage with this content hash."""
        rows = self.query("SELECT * FROM passages WHERE hash = ? ORDER BY rowid DESC LIMIT 1", (hash_,))
        return rows[0] if rows else None

    def add_self_edit(self, passage_hash: str, doc_id: int | None, policy: str, prompt: str, text: str,
                      n_items: int) -> int:
        return self.write(
            "INSERT INTO self_edits(passage_hash, document_id, policy, prompt, text, n_items, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (passage_hash, doc_id, policy, prompt, text, n_items, now()), None,
        )

    def set_self_edit_outcome(self, edit_id: int, outcome: str, version: int | None = None,
                              conn: sqlite3.Connection | None = None) -> None:
        sql = "UPDATE self_edits SET outcome = ?, version = ? WHERE id = ?"
        self.write(sql, (outcome, version, edit_id), conn)

    def self_edits(self, passage_hash: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM self_edits WHERE passage_hash = ? ORDER BY id", (passage_hash,))

    # -- events ----------------------------------------------------------
    def event(self, kind: str, message: str, *, version: int | None = None, document_id: int | None = None,
              data: dict[str, Any] | None = None, conn: sqlite3.Connection | None = None) -> None:
        args = (now(), kind, version, document_id, message, json.dumps(data) if data is not None else None)
        sql = "INSERT INTO events(ts, kind, version, document_id, message, data) VALUES (?, ?, ?, ?, ?, ?)"
        self.write(sql, args, conn)

    def events(self, limit: int = 50) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
