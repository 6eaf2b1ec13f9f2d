"""The daemon's web page in a real browser: headless Chromium (Debian's package,
driven by Playwright) against the real daemon on the tiny model. Screenshots of
each page go to test-artifacts/page/ (SEAL_ARTIFACTS to move it; not committed)."""

import json
import os
import shutil
import socket
import sqlite3
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from conftest import DAEMON_SECTIONS, SQUAD_DEV, write_config
from test_daemon import ROOT, Daemon, free_port, jobs

ARTIFACTS = Path(os.environ.get("SEAL_ARTIFACTS", ROOT / "test-artifacts")) / "page"
# As root, without the sandbox; no connections of Chromium's own (this machine has no internet).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
LONG = 240_000  # ms: learning on two CPU cores, while the suite's other work may share them


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("Debian's chromium is not installed (make setup installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def busy_file(tmp_path: Path) -> dict:
    """Four real SQuAD passages: the learner works on them for a while, so what comes next waits, queued."""
    items = json.loads(SQUAD_DEV.read_text())[:4]
    return {"filename": "busy.json", "content": json.dumps([{k: it[k] for k in ("title", "context", "questions")}
                                                             for it in items])}


@pytest.fixture
def daemon(tmp_path, tiny_model_dir):
    sections = DAEMON_SECTIONS.replace('replay_check = ""', 'replay_check = "every 1h"')
    cfg = write_config(tmp_path / "config.toml", tiny_model_dir, tmp_path / "state", extra=sections,
                       mode="modules")
    d = Daemon(cfg, free_port(), "--inbox", str(tmp_path / "inbox"))
    d.state = tmp_path / "state"
    try:
        d.wait_up()
        yield d
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def test_upload_learn_ask_reject_and_pause_on_the_page(daemon, browser, tmp_path):
    from playwright.sync_api import expect

    d = daemon
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(d.url + "/")
    expect(page.locator("#documents")).to_contain_text("Nothing yet")
    assert httpx.post(f"{d.url}/v1/documents", json=busy_file(tmp_path)).status_code == 202

    # upload: queued behind the busy file, then learned (the page refreshes itself)
    text = b"The Normans were led by Rollo. They settled in Normandy in the tenth century."
    page.set_input_files("#file", files=[{"name": "normans.txt", "mimeType": "text/plain", "buffer": text}])
    row = page.locator('tr[data-name="normans.txt"]')
    expect(row.locator(".status")).to_have_text("queued", timeout=30_000)
    expect(page.locator("#upload-result")).to_contain_text("normans.txt: job")
    shot(page, "index-queued")
    expect(row.locator(".status")).to_have_text("learned", timeout=LONG)
    [job] = [j for j in jobs(d.state) if j["name"] == "normans.txt"]
    assert job["state"] == "done" and job["source"] == "api"
    expect(row.locator(".module")).to_have_count(1)  # knowledge modules: it lives in one

    # a file the daemon refuses: rejected, with the reason it was given
    page.set_input_files("#file", files=[{"name": "blob.txt", "mimeType": "text/plain",
                                          "buffer": b"\x00\x01\x02binary" * 10}])
    bad = page.locator('tr[data-name="blob.txt"]')
    expect(bad.locator(".status")).to_have_text("rejected", timeout=60_000)
    [rejected] = [j for j in jobs(d.state) if j["name"] == "blob.txt"]
    assert rejected["state"] == "rejected" and "binary" in rejected["error"]
    expect(bad.locator(".reason")).to_have_text(rejected["error"])
    shot(page, "index")

    # ask: the live model's answer, as the API gives it, with its version
    live = d.status()["live_version"]
    page.fill("#question", "Who led the Normans?")
    page.click("#ask-form button")
    expect(page.locator("#answer-meta")).to_contain_text(f"version {live}", timeout=60_000)
    api = openai.OpenAI(base_url=f"{d.url}/v1", api_key="x").chat.completions.create(
        model="seal-agent", messages=[{"role": "user", "content": "Who led the Normans?"}])
    assert page.locator("#answer-text").inner_text() == api.choices[0].message.content.strip()
    shot(page, "index-ask")

    # pause a schedule: paused after a reload, and in the scheduler itself; then resumed
    sched = page.locator('tr[data-schedule="replay_check"]')
    expect(sched.locator(".next-run")).not_to_have_text("paused")
    sched.locator("button.pause").click()
    expect(sched.locator(".next-run")).to_have_text("paused", timeout=15_000)
    page.reload()
    expect(page.locator('tr[data-schedule="replay_check"] .next-run')).to_have_text("paused")
    expect(page.locator('tr[data-schedule="replay_check"] button.pause')).to_have_text("Resume")
    [row_s] = httpx.get(f"{d.url}/v1/schedules").json()["data"]
    assert row_s["name"] == "replay_check" and row_s["paused"] is True
    page.locator('tr[data-schedule="replay_check"] button.pause').click()
    expect(page.locator('tr[data-schedule="replay_check"] .next-run')).not_to_have_text("paused", timeout=15_000)
    assert httpx.get(f"{d.url}/v1/schedules").json()["data"][0]["paused"] is False

    # a document's page (the SQuAD file: it has gold questions): where it lives, its
    # self-edits, its questions asked again
    page.locator('tr[data-name="busy.json"] a').click()
    expect(page.locator("h1")).to_have_text("busy.json")
    doc_id = int(page.locator("#document").get_attribute("data-document"))
    db = sqlite3.connect(d.state / "state" / "seal.db")
    modules = [m for (m,) in db.execute("SELECT id FROM modules WHERE document_id = ?", (doc_id,))]
    edits = db.execute("SELECT COUNT(*) FROM self_edits WHERE document_id = ?", (doc_id,)).fetchone()[0]
    qas = db.execute("SELECT COUNT(*) FROM qas WHERE document_id = ?", (doc_id,)).fetchone()[0]
    assert modules and edits >= 4 and qas > 0
    for m in modules:
        expect(page.locator("#document")).to_contain_text(f"m{m}version")
    expect(page.locator(".self-edit")).to_have_count(edits)
    expect(page.locator("table.qas tbody tr")).to_have_count(qas)
    shot(page, "document")
    page.click("#ask-again")
    expect(page.locator("#check-result")).to_contain_text(f"version {live}:", timeout=LONG)
    expect(page.locator("#check-result")).to_contain_text(f"of {qas} questions right")
    expect(page.locator("#check-answers p")).to_have_count(qas)
    [(n,)] = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'replay.check' AND document_id = ?",
                        (doc_id,)).fetchall()
    assert n == 1
    page.reload()  # the check's answers are in the table now, as the latest check
    expect(page.locator(f'table.qas td:nth-child(5):has-text("v{live}:")')).to_have_count(qas)
    shot(page, "document-checked")

    page.goto(d.url + "/memory")
    expect(page.locator("#memory table").first).to_contain_text("busy.json")
    assert page.evaluate("document.querySelector('img.chart').naturalWidth") > 0
    shot(page, "memory")
    page.close()


def test_another_site_cannot_change_anything(daemon, browser, tmp_path):
    """A page of another origin posts to the daemon from the user's browser (a form,
    no script): refused, nothing queued; so are forged Origin and Sec-Fetch-Site headers."""
    d = daemon
    site = tmp_path / "site"
    site.mkdir()
    (site / "attack.html").write_text(
        f'<form id="f" method="post" enctype="text/plain" action="{d.url}/v1/documents">'
        '<input name=\'{"filename": "evil.txt", "content": "x", "pad": "\' value=\'"}\'></form>'
        "<script>document.getElementById('f').submit()</script>")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        with page.expect_response(f"{d.url}/v1/documents") as answer:
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/attack.html")
        assert answer.value.status == 403 and "cross-site request refused" in answer.value.text()
        page.close()
    finally:
        server.shutdown()
    assert not any(j["name"] == "evil.txt" for j in jobs(d.state))
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        r = httpx.post(f"{d.url}/v1/schedules/replay_check", json={"paused": True}, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site", headers
    assert httpx.get(f"{d.url}/v1/schedules").json()["data"][0]["paused"] is False
    # the same origin, as the page's script sends it, and a client with no Origin at all, are served
    r = httpx.post(f"{d.url}/v1/schedules/replay_check", json={"paused": True},
                   headers={"Origin": d.url, "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200 and r.json()["paused"] is True
    # what does not exist, and what is not a pause, are refused, saying so
    r = httpx.post(f"{d.url}/v1/schedules/nope", json={"paused": True})
    assert r.status_code == 404 and "no schedule 'nope' (known: replay_check)" in r.json()["error"]["message"]
    r = httpx.post(f"{d.url}/v1/documents/99/check")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no document 99"
    r = httpx.post(f"{d.url}/v1/schedules/replay_check", json={"paused": "no"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "paused"
    assert httpx.get(f"{d.url}/v1/schedules").json()["data"][0]["paused"] is True


def own_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_off_loopback_the_page_asks_for_the_token(tmp_path, tiny_model_dir, browser):
    from playwright.sync_api import expect

    address = own_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    cfg = write_config(tmp_path / "config.toml", tiny_model_dir, tmp_path / "state",
                       extra=DAEMON_SECTIONS.replace('replay_check = ""', 'replay_check = "every 1h"'))
    d = Daemon(cfg, free_port(), "--inbox", str(tmp_path / "inbox"), "--set", "api.token='s3cret'",
               host="0.0.0.0", token="s3cret")
    d.state = tmp_path / "state"
    try:
        d.wait_up()
        url = f"http://{address}:{d.port}"
        context = browser.new_context()
        page = context.new_page()
        page.goto(url + "/memory")
        expect(page.locator("#login-form")).to_be_visible()  # no page without the token
        assert page.url.startswith(url + "/login") and "live-version" not in page.content()
        shot(page, "login")
        page.fill('input[name="token"]', "wrong")
        page.click("#login-form button")
        expect(page.locator("#login-error")).to_contain_text("not the token")
        page.fill('input[name="token"]', "s3cret")
        page.click("#login-form button")
        expect(page.locator("#memory h1")).to_have_text("Memory health")  # back where it was going
        [cookie] = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != "s3cret"
        assert page.evaluate("document.cookie") == ""  # out of the scripts' reach
        page.goto(url + "/")
        page.locator('tr[data-schedule="replay_check"] button.pause').click()
        expect(page.locator('tr[data-schedule="replay_check"] .next-run')).to_have_text("paused", timeout=15_000)
        # the cookie without the page's anti-forgery header changes nothing
        status = page.evaluate("""fetch('/v1/schedules/replay_check', {method: 'POST', credentials: 'same-origin',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({paused: false})}).then(r => r.status)""")
        assert status == 403
        assert httpx.get(f"{url}/v1/schedules", headers=d.headers()).json()["data"][0]["paused"] is True
        assert httpx.get(f"{url}/v1/schedules").status_code == 401  # the API without the token, as before
        page.click("header .logout button")
        expect(page.locator("#login-form")).to_be_visible()
        page.goto(url + "/")
        expect(page.locator("#login-form")).to_be_visible()
        context.close()
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
