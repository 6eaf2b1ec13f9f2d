"""The daemon's durable job queue (a table in the state database).

A job is a document to learn (from the inbox or the API) or a named task (a
scheduled replay check). States: queued -> learning -> done | rejected |
failed. `claim` moves one queued job to `learning` in a transaction. After a
crash (kill -9) a job left in `learning` is put back to `queued` at start-up:
its partial adapter was never committed (the adapter log quarantines it), and
passages it had already committed are skipped as duplicates on the retry, so
nothing is lost and nothing is learned twice. A job whose attempts run out is
`failed` with its last error.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .state import State, now

ACTIVE = ("queued", "learning")
FINAL = ("done", "rejected", "failed")


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    name: str
    path: str | None
    sha256: str | None
    source: str
    state: str
    attempts: int
    error: str | None
    document_id: int | None
    result: dict[str, Any] | None
    created_at: str
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _job(r: sqlite3.Row) -> Job:
    return Job(r["id"], r["kind"], r["name"], r["path"], r["sha256"], r["source"], r["state"], r["attempts"],
               r["error"], r["document_id"], json.loads(r["result"]) if r["result"] else None,
               r["created_at"], r["updated_at"])


class JobQueue:
    def __init__(self, state: State, max_attempts: int = 3):
        self.state = state
        self.max_attempts = max_attempts

    def enqueue(self, kind: str, name: str, source: str, path: str | None = None, sha256: str | None = None) -> int:
        t = now()
        return self.state.write(
            "INSERT INTO jobs(kind, name, path, sha256, source, state, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)", (kind, name, path, sha256, source, t, t), None)

    def get(self, job_id: int) -> Job | None:
        rows = self.state.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def by_sha(self, sha256: str) -> Job | None:
        """The latest document job for this file content."""
        rows = self.state.query("SELECT * FROM jobs WHERE sha256 = ? ORDER BY id DESC LIMIT 1", (sha256,))
        return _job(rows[0]) if rows else None

    def claim(self) -> Job | None:
        """The oldest queued job, now `learning` (attempts + 1)."""
        with self.state.transaction() as c:
            row = c.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET state = 'learning', attempts = attempts + 1, updated_at = ? WHERE id = ?",
                      (now(), row["id"]))
        return self.get(row["id"])

    def finish(self, job_id: int, state: str, *, result: dict[str, Any] | None = None, error: str | None = None,
               document_id: int | None = None) -> None:
        assert state in FINAL
        self.state.write(
            "UPDATE jobs SET state = ?, result = ?, error = ?, document_id = COALESCE(?, document_id),"
            " updated_at = ? WHERE id = ?",
            (state, json.dumps(result) if result is not None else None, error, document_id, now(), job_id), None)

    def retry_or_fail(self, job: Job, error: str) -> str:
        """A transient failure: queued again while attempts remain, else failed."""
        state = "queued" if job.attempts < self.max_attempts else "failed"
        self.state.write("UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                         (state, error, now(), job.id), None)
        return state

    def recover(self) -> list[int]:
        """At start-up: jobs interrupted mid-learning go back to the queue."""
        with self.state.transaction() as c:
            ids = [r["id"] for r in c.execute("SELECT id FROM jobs WHERE state = 'learning'").fetchall()]
            c.execute("UPDATE jobs SET state = 'queued', error = 'interrupted (daemon stopped); retried',"
                      " updated_at = ? WHERE state = 'learning'", (now(),))
        return ids

    def counts(self) -> dict[str, int]:
        rows = self.state.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        out = dict.fromkeys(ACTIVE + FINAL, 0)
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def waiting(self, kind: str = "document") -> int:
        """Jobs of `kind` queued and not yet started."""
        rows = self.state.query("SELECT COUNT(*) AS n FROM jobs WHERE state = 'queued' AND kind = ?", (kind,))
        return rows[0]["n"]

    def recent(self, limit: int = 20) -> list[Job]:
        return [_job(r) for r in self.state.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))]
