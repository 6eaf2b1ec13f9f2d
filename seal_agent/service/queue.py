"""The daemon's durable job queue (a table in the state database).

A job is a document to learn (from the inbox or the API) or a named task (a
scheduled replay check). States: queued -> learning -> done | rejected |
failed. `claim` moves one queued job to `learning` in a transaction. After a
crash (kill -9) a job left in `learning` is put back to `queued` at start-up:
its partial adapter was never committed (the adapter log quarantines it), and
passages it had already committed are skipped as duplicates on the retry, so
nothing is lost and nothing is learned twice. A job whose attempts run out is
`failed` with its last error; so is one that was interrupted by crashes as
many times (a document that kills the process must not do so at every start).
A clean stop that abandons a job does not count as one of its attempts.

A document job learns the queue's own copy of the bytes that were checked and
hashed when the file was taken (`Copies`), not the inbox file, which the user
may edit, replace or remove meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..memory.state import State, now

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

    def record(self, kind: str, name: str, source: str, state: str, *, path: str | None = None,
               sha256: str | None = None, error: str | None = None, result: dict[str, Any] | None = None) -> int:
        """A job that is over as soon as it is known (a file rejected when taken), inserted
        in its final state: never `queued`, not even for the worker to claim in between."""
        assert state in FINAL
        t = now()
        return self.state.write(
            "INSERT INTO jobs(kind, name, path, sha256, source, state, error, result, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, name, path, sha256, source, state, error, json.dumps(result) if result is not None else None,
             t, t), None)

    def get(self, job_id: int) -> Job | None:
        rows = self.state.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def by_sha(self, sha256: str, path: str | None = None) -> Job | None:
        """The latest document job for this file content (taken from `path`, if given)."""
        if path is None:
            rows = self.state.query("SELECT * FROM jobs WHERE sha256 = ? ORDER BY id DESC LIMIT 1", (sha256,))
        else:
            rows = self.state.query("SELECT * FROM jobs WHERE sha256 = ? AND path = ? ORDER BY id DESC LIMIT 1",
                                    (sha256, path))
        return _job(rows[0]) if rows else None

    def learned(self, sha256: str) -> Job | None:
        """The first job that learned this file content, if one did."""
        rows = self.state.query("SELECT * FROM jobs WHERE sha256 = ? AND state = 'done' ORDER BY id LIMIT 1",
                                (sha256,))
        return _job(rows[0]) if rows else None

    def active_documents(self) -> list[Job]:
        rows = self.state.query("SELECT * FROM jobs WHERE kind = 'document' AND state IN ('queued', 'learning')"
                                " ORDER BY id")
        return [_job(r) for r in rows]

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

    def release(self, job_id: int) -> None:
        """A job abandoned by a clean stop: queued again, and this attempt not counted."""
        self.state.write("UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0),"
                         " error = 'interrupted by a stop; retried', updated_at = ? WHERE id = ? AND state = 'learning'",
                         (now(), job_id), None)

    def give_up_interrupted(self) -> list[Job]:
        """At start-up, before `recover`: jobs left `learning` by a crash that have used
        all their attempts are `failed` (each crash counted as one)."""
        with self.state.transaction() as c:
            ids = [r["id"] for r in c.execute("SELECT id FROM jobs WHERE state = 'learning' AND attempts >= ?",
                                              (self.max_attempts,)).fetchall()]
            c.execute("UPDATE jobs SET state = 'failed', error = 'the daemon stopped or crashed while learning it, '"
                      " || attempts || ' times; not retried', updated_at = ? WHERE state = 'learning'"
                      " AND attempts >= ?", (now(), self.max_attempts))
        return [job for job in map(self.get, ids) if job is not None]

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


_SHA256 = re.compile(r"[0-9a-f]{64}")


class Copies:
    """The queue's own copy of each queued document: the bytes read and hashed when
    the file was taken, at ROOT/<sha256>/<file name> (the name keeps the document's
    type and title for the reader). Written atomically; dropped once the job is over."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, sha256: str, name: str) -> Path:
        if not _SHA256.fullmatch(sha256 or "") or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a queued document: {sha256!r} {name!r}")
        return self.root / sha256 / name

    def put(self, sha256: str, name: str, data: bytes) -> Path:
        target = self.path(sha256, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # Replacing is safe here: this folder is the queue's own, and the same name
            # under the same hash can only hold the same bytes.
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def drop(self, sha256: str | None, name: str) -> None:
        try:
            target = self.path(sha256 or "", name)
            target.unlink(missing_ok=True)
            target.parent.rmdir()  # fails while another job's copy of the same content is there
        except (OSError, ValueError):
            pass

    def prune(self, keep: set[tuple[str, str]]) -> int:
        """Remove copies no active job needs (left by a crash between a job's end
        and the removal of its copy, or between a copy and its job); how many."""
        n = 0
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                if (folder.name, f.name) not in keep:
                    try:
                        f.unlink()
                        n += 1
                    except OSError:  # a leftover that cannot go costs disk space, not a start
                        pass
            try:
                folder.rmdir()
            except OSError:
                pass
        return n
