"""`seal-agent bench --part page`: the daemon's page with many documents.

A scratch state directory gets `n` documents as the daemon leaves them (a job
each, three passages, a knowledge module, replay QAs checked at two versions;
one in ten rejected with a reason), written through the state's own methods
and tables; then the real daemon starts on it (the configured model), the
real API serves on 127.0.0.1, and each page is fetched over HTTP, one request
at a time. Only the database rows are made up: no model trained them.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config
from .scratch import scratch_config


def _fill(database: Path, n: int) -> None:
    from ..memory.state import State, now
    from ..service.queue import JobQueue

    state = State(database)
    queue = JobQueue(state)
    try:
        for i in range(1, n + 1):
            name = f"doc-{i:04d}.md"
            sha = hashlib.sha256(name.encode()).hexdigest()
            if i % 10 == 0:
                queue.record("document", name, "inbox", "rejected", path=f"/inbox/{name}", sha256=sha,
                             error="the file is empty: nothing to learn")
                continue
            doc = state.add_document(f"/inbox/{name}", sha, f"Document {i}", "markdown")
            with state.transaction() as c:
                for p in range(3):
                    h = hashlib.sha256(f"{name}:{p}".encode()).hexdigest()
                    c.execute("INSERT INTO passages(document_id, idx, hash, title, text, n_questions, status, "
                              "version) VALUES (?, ?, ?, ?, ?, 2, 'learned', ?)",
                              (doc, p, h, f"Document {i}", f"Passage {p} of document {i}. " * 20, i))
                c.execute("INSERT INTO modules(id, document_id, passage_hashes, trained_on, created_at, stats) "
                          "VALUES (?, ?, '[]', 0, ?, ?)",
                          (i, doc, now(), json.dumps({"qa": {"before": 0.0, "after": 1.0, "n": 6}})))
                for q in range(6):
                    qa = c.execute("INSERT INTO qas(question, answer, passage_hash, title, document_id, source, "
                                   "version, embedding, added_at) VALUES (?, ?, ?, ?, ?, 'generated', ?, ?, ?)",
                                   (f"Question {q} of {i}?", f"answer {q}", sha, f"Document {i}", doc, i,
                                    b"\0" * 16, now())).lastrowid
                    for v, right in ((i, 1), (n, int(q % 3 != 0))):
                        c.execute("INSERT OR IGNORE INTO qa_results(qa_id, version, correct, prediction) "
                                  "VALUES (?, ?, ?, ?)", (qa, v, right, f"answer {q}"))
            state.finish_document(doc, "done", {"status": "learned"})
            job = queue.record("document", name, "inbox", "done", path=f"/inbox/{name}", sha256=sha,
                               result={"status": "learned"})
            state.write("UPDATE jobs SET document_id = ? WHERE id = ?", (doc, job), None)
    finally:
        state.close()


def page_speed(cfg: Config, n_documents: int = 1000, requests: int = 50,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    import httpx

    from ..service.daemon import Daemon
    from .bench import served_api

    out: dict[str, Any] = {"documents": n_documents, "requests": requests}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = scratch_config(cfg, Path(tmp) / "state", schedule={"replay_check": "every 1h", "consolidate": "",
                                                                     "restem": ""})
        log(f"page: {n_documents} documents into a scratch state ...")
        t0 = time.perf_counter()
        _fill(scratch.state_path("database"), n_documents)
        out["fill_seconds"] = round(time.perf_counter() - t0, 1)
        daemon = Daemon(scratch, inbox=Path(tmp) / "inbox")
        daemon.start()
        try:
            with served_api(daemon) as base, httpx.Client(base_url=base, timeout=60) as client:
                for name, path in (("index", "/"), ("document", "/documents/1"), ("memory", "/memory"),
                                   ("chart", "/page/charts/memory.svg")):
                    log(f"page: GET {path} x {requests} ...")
                    first = client.get(path)
                    first.raise_for_status()
                    times = []
                    for _ in range(requests):
                        t = time.perf_counter()
                        r = client.get(path)
                        times.append(time.perf_counter() - t)
                        r.raise_for_status()
                    times.sort()
                    out[name] = {"path": path, "median_ms": round(1000 * statistics.median(times), 1),
                                 "p95_ms": round(1000 * times[math.ceil(0.95 * len(times)) - 1], 1),  # nearest rank
                                 "max_ms": round(1000 * times[-1], 1), "bytes": len(first.content)}
                out["rows_on_index"] = client.get("/").text.count('class="doc ')
        finally:
            daemon.stop()
    return out


def summary(result: dict[str, Any]) -> str:
    head = (f"The page with {result['documents']} documents ({result['rows_on_index']} rows on /), "
            f"{result['requests']} requests each:")
    lines = [head]
    for name in ("index", "document", "memory", "chart"):
        r = result[name]
        lines.append(f"  GET {r['path']:24s} median {r['median_ms']:7.1f} ms, p95 {r['p95_ms']:7.1f} ms, "
                     f"max {r['max_ms']:7.1f} ms, {r['bytes'] / 1024:.0f} KiB")
    return "\n".join(lines)
