"""What the page shows, read from the state database: pure reading, no HTTP.

Every function takes a read-only connection (`connect`): the page never waits
for the learner's writes (SQLite's WAL lets readers run beside a writer) and
can never change the state. Each returns plain dicts and lists for the
templates, so the same figures are testable without a browser.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any


@contextmanager
def connect(database: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the state database."""
    conn = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=5, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:  # a row written by a broken run: shown as missing, not a failed page
        return None


def _absorbed(conn: sqlite3.Connection) -> dict[int, dict[str, Any]]:
    """module id -> the consolidation that absorbed it into the weights (its version, when)."""
    out: dict[int, dict[str, Any]] = {}
    for r in conn.execute("SELECT version, created_at, stats FROM versions "
                          "WHERE json_extract(stats, '$.kind') = 'consolidation' ORDER BY version"):
        for m in (_json(r["stats"]) or {}).get("absorbed") or []:
            out[int(m)] = {"version": r["version"], "at": r["created_at"]}
    return out


def _modules_by_document(conn: sqlite3.Connection) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in conn.execute("SELECT id, document_id FROM modules WHERE document_id IS NOT NULL ORDER BY id"):
        out.setdefault(r["document_id"], []).append(r["id"])
    return out


def _status(job_state: str | None, doc_status: str | None, result: dict[str, Any] | None) -> str:
    """One word for a document's state: queued, learning, learned, duplicate, rejected, failed,
    or the learner's own verdict (rejected-forgetting, interrupted)."""
    if job_state in ("queued", "learning", "rejected", "failed"):
        return job_state
    if result and result.get("status") == "duplicate":
        return "duplicate"
    if doc_status in (None, "done"):
        return "learned"
    return doc_status


def documents(conn: sqlite3.Connection, current: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every document, newest first: those given to the daemon (its jobs: queued ones
    too, and refused ones with the reason) and those learned from the command line.
    `current`: the learner's progress (`stage`, `job`), shown on the job it names."""
    passages = {r["document_id"]: (r["n"], r["learned"]) for r in conn.execute(
        "SELECT document_id, COUNT(*) AS n, SUM(status = 'learned') AS learned FROM passages GROUP BY document_id")}
    skills = dict(conn.execute("SELECT document_id, COUNT(*) FROM skills GROUP BY document_id").fetchall())
    modules = _modules_by_document(conn)
    absorbed = _absorbed(conn)
    docs = {r["id"]: r for r in conn.execute("SELECT id, path, title, status, added_at, finished_at FROM documents")}

    def row(job, doc) -> dict[str, Any]:
        result = _json(job["result"]) if job is not None else None
        doc_id = doc["id"] if doc is not None else None
        mods = modules.get(doc_id, [])
        n, learned = passages.get(doc_id, (0, 0))
        status = _status(job["state"] if job is not None else None, doc["status"] if doc is not None else None,
                         result)
        stage = None
        if current and job is not None and current.get("job") == job["id"] and status == "learning":
            stage = current.get("stage")
        name = job["name"] if job is not None else PurePath(doc["path"]).name
        return {"job": job["id"] if job is not None else None, "document": doc_id, "name": name,
                "title": doc["title"] if doc is not None else None, "status": status, "stage": stage,
                "reason": job["error"] if job is not None else None, "source": job["source"] if job else "cli",
                "passages": n, "learned_passages": learned or 0, "skills": skills.get(doc_id, 0),
                "modules": mods, "absorbed": {m: absorbed[m] for m in mods if m in absorbed},
                "when": (job["updated_at"] if job is not None else doc["finished_at"] or doc["added_at"])}

    jobs = conn.execute("SELECT id, name, path, state, error, source, document_id, result, updated_at FROM jobs "
                        "WHERE kind = 'document'").fetchall()
    # a job being learned names its document only once it is done: until then, the one of its path
    learning = {d["path"]: i for i, d in sorted(docs.items()) if d["status"] == "learning"}
    owned = {job["id"]: job["document_id"] if job["document_id"] is not None else
             learning.get(job["path"]) if job["state"] == "learning" else None for job in jobs}
    rows = [row(job, docs.get(owned[job["id"]])) for job in jobs]
    referenced = set(owned.values())
    rows += [row(None, doc) for doc_id, doc in docs.items() if doc_id not in referenced]
    rows.sort(key=lambda r: r["when"] or "", reverse=True)
    return rows


def document(conn: sqlite3.Connection, doc_id: int) -> dict[str, Any] | None:
    """One document: its passages, modules (and whether a consolidation absorbed
    them), self-edits (why the model changed), and its QAs with the answers of
    each version that asked them (before it was learned, after, and every check since)."""
    doc = conn.execute("SELECT * FROM documents WHERE id = ?", (doc_id,)).fetchone()
    if doc is None:
        return None
    absorbed = _absorbed(conn)
    modules = [{"id": r["id"], "created_at": r["created_at"], "trained_on": r["trained_on"],
                "qa": (_json(r["stats"]) or {}).get("qa"), "flagged": (_json(r["stats"]) or {}).get("flagged"),
                "absorbed": absorbed.get(r["id"])}
               for r in conn.execute("SELECT * FROM modules WHERE document_id = ? ORDER BY id", (doc_id,))]
    passages = [dict(r) for r in conn.execute(
        "SELECT idx, hash, title, status, version, n_questions, text FROM passages WHERE document_id = ? "
        "ORDER BY idx", (doc_id,))]
    edits = [dict(r) for r in conn.execute(
        "SELECT passage_hash, policy, text, n_items, outcome, version, created_at FROM self_edits "
        "WHERE document_id = ? ORDER BY id", (doc_id,))]
    qas = [dict(r) for r in conn.execute(
        "SELECT id, question, answer, source, version FROM qas WHERE document_id = ? ORDER BY id", (doc_id,))]
    results: dict[int, list[dict[str, Any]]] = {}
    for r in conn.execute("SELECT r.qa_id, r.version, r.correct, r.prediction FROM qa_results r "
                          "JOIN qas q ON q.id = r.qa_id WHERE q.document_id = ? ORDER BY r.version", (doc_id,)):
        results.setdefault(r["qa_id"], []).append(
            {"version": r["version"], "correct": bool(r["correct"]), "prediction": r["prediction"]})
    for q in qas:
        asked = results.get(q["id"], [])
        q["before"] = next((a for a in reversed(asked) if a["version"] < q["version"]), None)
        q["after"] = next((a for a in asked if a["version"] >= q["version"]), None)
        q["latest"] = asked[-1] if asked and asked[-1]["version"] >= q["version"] else None
    jobs = [dict(r) for r in conn.execute(
        "SELECT id, name, state, error, source, created_at, updated_at FROM jobs WHERE document_id = ? "
        "AND kind = 'document' ORDER BY id", (doc_id,))]
    return {"id": doc["id"], "path": doc["path"], "name": PurePath(doc["path"]).name, "title": doc["title"],
            "status": _status(None, doc["status"], None), "added_at": doc["added_at"],
            "finished_at": doc["finished_at"], "passages": passages, "modules": modules, "self_edits": edits,
            "qas": qas, "jobs": jobs, "checks": checks(conn, doc_id)}


def checks(conn: sqlite3.Connection, doc_id: int | None = None) -> list[dict[str, Any]]:
    """Per document and version: how many of its replay QAs that version answered
    right, from the version that learned the document on (`age`: versions since)."""
    where, args = ("WHERE q.document_id = ?", (doc_id,)) if doc_id is not None else ("", ())
    rows = conn.execute(
        "SELECT q.document_id AS document, r.version, MIN(q.version) AS learned, COUNT(*) AS n, "
        f"SUM(r.correct) AS correct FROM qa_results r JOIN qas q ON q.id = r.qa_id {where} "
        "GROUP BY q.document_id, r.version ORDER BY q.document_id, r.version", args).fetchall()
    return [{"document": r["document"], "version": r["version"], "age": r["version"] - r["learned"], "n": r["n"],
             "correct": r["correct"], "accuracy": round(r["correct"] / r["n"], 4)}
            for r in rows if r["version"] >= r["learned"]]


def by_age(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks pooled by age: of what was learned `age` versions ago, the share answered right."""
    pooled: dict[int, list[int]] = {}
    for r in rows:
        n_c = pooled.setdefault(r["age"], [0, 0])
        n_c[0] += r["n"]
        n_c[1] += r["correct"]
    return [{"age": age, "n": n, "correct": c, "accuracy": round(c / n, 4)} for age, (n, c) in sorted(pooled.items())]


def memory(conn: sqlite3.Connection, rounds: int = 50) -> dict[str, Any]:
    """Memory health: each document's latest check, the consolidations and what they
    absorbed, and the latest ReSTEM rounds with their decisions."""
    all_checks = checks(conn)
    latest: dict[int, dict[str, Any]] = {}
    for r in all_checks:  # ordered by version within a document: the last one wins
        latest[r["document"]] = r
    names = {r["id"]: (PurePath(r["path"]).name, r["title"]) for r in conn.execute(
        "SELECT id, path, title FROM documents")}
    docs = sorted(({**r, "name": names.get(r["document"], ("?", None))[0]} for r in latest.values()),
                  key=lambda r: r["accuracy"])
    module_docs = dict(conn.execute("SELECT id, document_id FROM modules").fetchall())
    consolidations = []
    for r in conn.execute("SELECT version, created_at, stats FROM versions "
                          "WHERE json_extract(stats, '$.kind') = 'consolidation' ORDER BY version DESC"):
        stats = _json(r["stats"]) or {}
        absorbed = [{"module": m, "document": module_docs.get(m),
                     "name": names.get(module_docs.get(m), ("?", None))[0]} for m in stats.get("absorbed") or []]
        consolidations.append({"version": r["version"], "at": r["created_at"], "absorbed": absorbed,
                               "kept": stats.get("kept") or []})
    rounds_ = []
    for r in conn.execute("SELECT id, policy, started_at, finished_at, decision, policy_version, "
                          "json_extract(record, '$.reason') AS reason, json_extract(record, '$.domain') AS domain "
                          "FROM restem_rounds ORDER BY id DESC LIMIT ?", (rounds,)):
        rounds_.append(dict(r))
    return {"documents": docs, "by_age": by_age(all_checks), "consolidations": consolidations, "rounds": rounds_,
            "checks": len(all_checks)}


def queued(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The jobs waiting or running, oldest first (documents and tasks)."""
    return [dict(r) for r in conn.execute(
        "SELECT id, kind, name, state, source, attempts, created_at FROM jobs "
        "WHERE state IN ('queued', 'learning') ORDER BY id")]
