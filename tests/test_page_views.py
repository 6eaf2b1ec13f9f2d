"""What the page shows, read from a real state database (no browser), and the
guard's cross-site and login rules, decided on real headers."""

import itertools
import json

import pytest
from starlette.datastructures import Headers

from seal_agent.memory.state import State, now
from seal_agent.service.api.guard import Guard, cross_site, csrf_token, login_value
from seal_agent.service.api.page import views
from seal_agent.service.api.page.routes import _safe_next
from seal_agent.service.queue import JobQueue


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "seal.db"
    state = State(path)
    yield state, JobQueue(state), path
    state.close()


def _learned(state, queue, name: str, version: int, source="inbox"):
    doc = state.add_document(f"/inbox/{name}", name, name.upper(), "text")
    state.add_passage(doc, 0, f"h-{name}", name, "text", 2)
    state.finish_document(doc, "done", {})
    job = None
    if source is not None:
        job = queue.record("document", name, source, "done", sha256=name, result={"status": "learned"})
        state.write("UPDATE jobs SET document_id = ? WHERE id = ?", (doc, job), None)
    return doc, job


_QUESTIONS = itertools.count()


def _qa(state, doc, version, results):
    """A replay QA of `doc` learned at `version`, with (version, correct) results."""
    with state.transaction() as c:
        qa = c.execute("INSERT INTO qas(question, answer, passage_hash, title, document_id, source, version, "
                       "embedding, added_at) VALUES (?, 'a', 'h', 't', ?, 'gold', ?, x'00', ?)",
                       (f"question {next(_QUESTIONS)}", doc, version, now())).lastrowid
        for v, right in results:
            c.execute("INSERT INTO qa_results(qa_id, version, correct, prediction) VALUES (?, ?, ?, 'p')",
                      (qa, v, right))
    return qa


def test_every_document_with_its_state_reason_and_stage(db):
    state, queue, path = db
    a, _ = _learned(state, queue, "a.txt", 1)
    b, _ = _learned(state, queue, "cli.txt", 2, source=None)  # learned with `seal-agent learn`: no job
    rejected = queue.record("document", "blob.txt", "api", "rejected", error="binary content")
    waiting = queue.enqueue("document", "next.txt", "inbox", path="/inbox/next.txt")
    running = queue.enqueue("document", "now.txt", "inbox", path="/inbox/now.txt")
    queue.claim()  # the oldest queued job: next.txt is learning now
    partial = state.add_document("/inbox/next.txt", "n", "NEXT", "text")  # its learning under way
    state.add_passage(partial, 0, "h-next", "next", "text", 1)
    with state.transaction() as c:
        c.execute("INSERT INTO modules(id, document_id, passage_hashes, trained_on, created_at, stats) "
                  "VALUES (7, ?, '[]', 0, ?, '{}')", (a, now()))
        c.execute("INSERT INTO versions(version, parent, created_at, passage_hashes, fingerprint, stats) "
                  "VALUES (3, NULL, ?, '[]', '', ?)", (now(), json.dumps({"kind": "consolidation", "absorbed": [7]})))
    with views.connect(path) as conn:
        rows = {r["name"]: r for r in views.documents(conn, {"job": waiting, "stage": "train"})}
    with views.connect(path) as conn:
        names = [r["name"] for r in views.documents(conn)]
    assert sorted(names) == ["a.txt", "blob.txt", "cli.txt", "next.txt", "now.txt"]
    assert rows["a.txt"]["status"] == "learned" and rows["a.txt"]["modules"] == [7]
    assert rows["a.txt"]["absorbed"][7]["version"] == 3
    assert rows["cli.txt"]["status"] == "learned" and rows["cli.txt"]["source"] == "cli"
    assert rows["cli.txt"]["document"] == b and rows["cli.txt"]["passages"] == 1
    assert rows["blob.txt"]["status"] == "rejected" and rows["blob.txt"]["reason"] == "binary content"
    assert rows["blob.txt"]["job"] == rejected and rows["blob.txt"]["document"] is None
    assert rows["next.txt"]["status"] == "learning" and rows["next.txt"]["stage"] == "train"
    assert rows["next.txt"]["document"] == partial and rows["next.txt"]["passages"] == 1  # one row, not two
    assert rows["now.txt"]["status"] == "queued" and rows["now.txt"]["stage"] is None  # the stage is not its
    assert rows["now.txt"]["job"] == running
    with views.connect(path) as conn:
        assert [j["name"] for j in views.queued(conn)] == ["next.txt", "now.txt"]
        with pytest.raises(Exception, match="readonly"):  # the page can never write
            conn.execute("DELETE FROM jobs")


def test_memory_health_pools_checks_by_age_and_shows_the_latest(db):
    state, queue, path = db
    a, _ = _learned(state, queue, "a.txt", 1)
    b, _ = _learned(state, queue, "b.txt", 2)
    _qa(state, a, 1, [(0, 1), (1, 1), (3, 0)])  # v0: before it was learned (not an age)
    _qa(state, a, 1, [(1, 1), (3, 1)])
    _qa(state, b, 2, [(2, 1), (3, 0)])
    with views.connect(path) as conn:
        health = views.memory(conn)
        doc = views.document(conn, a)
    ages = {r["age"]: (r["correct"], r["n"]) for r in health["by_age"]}
    assert ages == {0: (3, 3), 1: (0, 1), 2: (1, 2)}  # a at v1 and b at v2: age 0; b at v3: 1; a at v3: 2
    latest = {r["name"]: r for r in health["documents"]}
    assert latest["a.txt"]["version"] == 3 and latest["a.txt"]["accuracy"] == 0.5
    assert latest["b.txt"]["accuracy"] == 0.0
    assert [r["name"] for r in health["documents"]] == ["b.txt", "a.txt"]  # worst first
    first = doc["qas"][0]
    assert first["before"]["version"] == 0 and first["after"]["version"] == 1 and first["latest"]["version"] == 3
    assert first["latest"]["correct"] is False


def test_login_goes_nowhere_but_this_server():
    assert _safe_next("/memory?x=1") == "/memory?x=1"
    for bad in ("//evil.example/", "https://evil.example/", "/\\evil.example", "", None, "memory"):
        assert _safe_next(bad) == "/"


def h(**headers) -> Headers:
    return Headers({k.replace("_", "-"): v for k, v in headers.items()})


def test_cross_site_requests_are_told_from_same_origin_ones():
    assert cross_site(h(host="127.0.0.1:8765")) is None  # curl, the openai client
    assert cross_site(h(host="127.0.0.1:8765", origin="http://127.0.0.1:8765", sec_fetch_site="same-origin")) is None
    assert cross_site(h(host="127.0.0.1:8765", sec_fetch_site="none")) is None  # typed into the address bar
    assert "Sec-Fetch-Site: same-site" in cross_site(h(host="127.0.0.1:8765", sec_fetch_site="same-site"))
    assert "is not this server" in cross_site(h(host="127.0.0.1:8765", origin="http://127.0.0.1:9999"))
    assert "is not this server" in cross_site(h(host="127.0.0.1:8765", origin="null"))


def test_the_guard_takes_the_cookie_only_with_the_pages_token_for_changes():
    g = Guard(lambda *a: None, token="s3cret", max_request_bytes=1000, csrf=csrf_token(b"s3cret"))
    cookie = f"seal_login={login_value('s3cret')}"
    assert g.refusal(h(host="x", cookie=cookie), "GET", "/v1/status") is None
    assert g.refusal(h(host="x", cookie=cookie, x_seal_csrf=csrf_token(b"s3cret")), "POST", "/v1/documents") is None
    assert g.refusal(h(host="x", cookie=cookie), "POST", "/v1/documents").status_code == 403
    assert g.refusal(h(host="x", cookie=cookie, x_seal_csrf="guess"), "POST", "/v1/documents").status_code == 403
    assert g.refusal(h(host="x", cookie="seal_login=s3cret"), "GET", "/v1/status").status_code == 401  # not the token
    assert g.refusal(h(host="x", authorization="Bearer s3cret"), "POST", "/v1/documents") is None
    page = g.refusal(h(host="x"), "GET", "/documents/3", b"a=1")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fdocuments%2F3%3Fa%3D1"
    assert g.refusal(h(host="x"), "GET", "/v1/status").status_code == 401
    assert g.refusal(h(host="x"), "GET", "/login") is None and g.refusal(h(host="x"), "GET", "/page/static/page.css") is None
    assert g.refusal(h(host="x", origin="http://evil"), "POST", "/login").status_code == 403  # no login from elsewhere


def test_bench_page_fetches_each_page_of_a_filled_state(tmp_path, tiny_model_dir):
    from conftest import DAEMON_SECTIONS, write_config

    from seal_agent.config import load_config
    from seal_agent.evaluation.page import page_speed, summary

    cfg = load_config(write_config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "state", extra=DAEMON_SECTIONS))
    r = page_speed(cfg, n_documents=40, requests=2, log=lambda m: None)
    assert r["rows_on_index"] == 40  # every document on the page, the rejected ones too
    for name in ("index", "document", "memory", "chart"):
        assert 0 < r[name]["median_ms"] <= r[name]["p95_ms"] and r[name]["bytes"] > 500
    assert "median" in summary(r)
    assert not (tmp_path / "state" / "state").exists()  # a scratch state, not the configured one
