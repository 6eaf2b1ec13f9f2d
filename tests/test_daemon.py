"""The daemon as a user runs it: a real subprocess on a temporary inbox and port,
the real `openai` client, kill -9 and restart (tiny model)."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import DAEMON_SECTIONS, SHARED_DATA, write_config

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, config: Path, port: int, *extra: str, host: str = "127.0.0.1", token: str = ""):
        self.port, self.host, self.token = port, host, token
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log = config.parent / f"daemon-{port}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "seal_agent", "--config", str(config), "run", "--port", str(port),
             "--host", host, *extra],
            cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", headers=self.headers(), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"daemon did not come up:\n{self.log.read_text()}")

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/status", headers=self.headers(), timeout=10).json()

    def wait_for(self, predicate, timeout: float = 180, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    inbox = tmp_path / "inbox"
    cfg = write_config(tmp_path / "config.toml", tiny_model_dir, tmp_path / "state", extra=DAEMON_SECTIONS)
    return cfg, inbox, tmp_path / "state"


def jobs(state_dir: Path) -> list[dict]:
    db = sqlite3.connect(state_dir / "state" / "seal.db")
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]


def test_drop_learn_and_ask_with_the_openai_client_bad_files_rejected(setup):
    cfg, inbox, state = setup
    d = Daemon(cfg, free_port(), "--inbox", str(inbox))
    try:
        d.wait_up()
        assert inbox.is_dir()
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="x")
        assert [m.id for m in client.models.list().data] == ["seal-agent"]
        before = client.chat.completions.create(model="seal-agent", max_tokens=4,
                                                messages=[{"role": "user", "content": "Who led the Normans?"}])
        assert before.system_fingerprint == "seal-v0"

        (inbox / "normans.txt").write_text("The Normans were led by Rollo. They settled in Normandy.")
        (inbox / "blob.txt").write_bytes(b"\x00\x01\x02binary" * 10)
        (inbox / "empty.md").write_text("")
        (inbox / "passwd.txt").symlink_to("/etc/passwd")
        (inbox / "notes.docx").write_text("unsupported")
        (inbox / "broken.json").write_text('{"title": "x", "context": ')
        (inbox / ".hidden.txt").write_text("ignored")
        (inbox / "partial.txt.part").write_text("ignored while downloading")

        d.wait_for(lambda: (inbox / "done" / "normans.txt").exists(), what="normans.txt in done/")
        d.wait_for(lambda: d.status()["live_version"] == 1, what="version 1")
        after = client.chat.completions.create(model="seal-agent", max_tokens=4,
                                               messages=[{"role": "user", "content": "Who led the Normans?"}])
        assert after.system_fingerprint == "seal-v1" and isinstance(after.choices[0].message.content, str)
        assert after.usage.completion_tokens <= 4

        rejected = inbox / "rejected"
        for name, why in (("blob.txt", "binary"), ("empty.md", "empty"), ("passwd.txt", "outside the inbox"),
                          ("notes.docx", "unsupported"), ("broken.json", "JSON")):
            d.wait_for(lambda n=name: (rejected / f"{n}.reason.txt").exists(), what=f"{name} rejected")
            assert why in (rejected / f"{name}.reason.txt").read_text()
        assert (rejected / "passwd.txt").is_symlink()  # moved, not followed, not deleted
        assert Path("/etc/passwd").exists()
        assert (inbox / ".hidden.txt").exists() and (inbox / "partial.txt.part").exists()

        # streaming, completions, documents through the API, jobs, errors in OpenAI's shape
        stream = client.chat.completions.create(model="seal-agent", max_tokens=5, stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "Hello"}])
        *chunks, usage = list(stream)
        assert chunks[-1].choices[0].finish_reason == ("length" if usage.usage.completion_tokens == 5 else "stop")
        done = client.completions.create(model="seal-agent", prompt="The Normans", max_tokens=3)
        assert isinstance(done.choices[0].text, str)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="seal-agent", max_tokens=100000,
                                           messages=[{"role": "user", "content": "x"}])
        assert "max_tokens" in str(e.value)
        r = httpx.post(f"{d.url}/v1/documents", json={"filename": "hastings.md",
                                                      "content": "William won at Hastings in 1066."})
        assert r.status_code == 202
        job_id = r.json()["id"]
        job = d.wait_for(lambda: (j := httpx.get(f"{d.url}/v1/jobs/{job_id}").json())["state"] == "done" and j,
                         what="API document learned")
        assert job["result"]["learned"] == 1 and (inbox / "done" / "hastings.md").exists()
        r = httpx.post(f"{d.url}/v1/documents", json={"filename": "../escape.txt", "content": "x"})
        assert r.status_code == 400 and "bad file name" in r.json()["error"]["message"]
        assert not (inbox.parent / "escape.txt").exists()
        r = httpx.get(f"{d.url}/v1/jobs/999")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = httpx.post(f"{d.url}/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        s = d.status()
        assert s["queue"]["done"] == 2 and s["queue"]["rejected"] == 5 and s["live_version"] == 2
        assert [x["kind"] for x in s["decisions"]][-2:] == ["learn.accepted", "learn.accepted"]
    finally:
        assert d.stop() == 0, d.log.read_text()
    assert "daemon stopped" in d.log.read_text()


def test_kill_9_while_learning_then_restart_learns_it_exactly_once(setup):
    cfg, inbox, state = setup
    port = free_port()
    # slow training (many epochs) so the kill lands mid-update
    d = Daemon(cfg, port, "--inbox", str(inbox), "--set", "train.epochs=3000")
    try:
        d.wait_up()
        (inbox / "normans.txt").write_text("The Normans were led by Rollo. They settled in Normandy.")
        d.wait_for(lambda: d.status()["current_job"] is not None, what="learning to start")
        time.sleep(1.0)
        d.proc.kill()  # SIGKILL
        d.proc.wait()
    finally:
        d.stop()
    assert [j["state"] for j in jobs(state)] == ["learning"]
    assert (inbox / "normans.txt").exists()

    d = Daemon(cfg, port, "--inbox", str(inbox))
    try:
        d.wait_up()
        d.wait_for(lambda: (inbox / "done" / "normans.txt").exists(), what="done after restart")
        d.wait_for(lambda: d.status()["queue"]["done"] == 1, what="job done")
    finally:
        assert d.stop() == 0
    rows = jobs(state)
    assert len(rows) == 1 and rows[0]["state"] == "done" and rows[0]["attempts"] == 2
    db = sqlite3.connect(state / "state" / "seal.db")
    assert db.execute("SELECT COUNT(*) FROM versions WHERE version > 0").fetchone()[0] == 1
    assert json.loads(rows[0]["result"])["learned"] == 1


def test_one_daemon_per_state_dir_and_token_required_off_loopback(setup):
    cfg, inbox, state = setup
    d = Daemon(cfg, free_port(), "--inbox", str(inbox))
    try:
        d.wait_up()
        second = subprocess.run(
            [sys.executable, "-m", "seal_agent", "--config", str(cfg), "run", "--port", str(free_port())],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode == 1
        assert f"pid {d.proc.pid}" in second.stderr and "already" not in second.stdout
        r = subprocess.run([sys.executable, "-m", "seal_agent", "--config", str(cfg), "status", "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
        s = json.loads(r.stdout.strip().splitlines()[-1])
        assert s["running"] and s["pid"] == d.proc.pid and s["live_version"] == 0
        # the command line does not change the live model under the daemon's feet
        note = inbox.parent / "note.txt"
        note.write_text("A note.")
        r = subprocess.run([sys.executable, "-m", "seal_agent", "--config", str(cfg), "learn", str(note)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 1 and f"daemon (pid {d.proc.pid})" in r.stderr
    finally:
        d.stop()

    # a non-loopback bind without a token refuses to start
    r = subprocess.run([sys.executable, "-m", "seal_agent", "--config", str(cfg), "run", "--host", "0.0.0.0",
                        "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 1 and "api.token" in r.stderr
    # with a token, requests without it get 401
    d = Daemon(cfg, free_port(), "--inbox", str(inbox), "--set", "api.token='s3cret'", host="0.0.0.0",
               token="s3cret")
    try:
        d.wait_up()
        r = httpx.get(f"{d.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="s3cret")
        assert client.models.list().data[0].id == "seal-agent"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{d.url}/v1", api_key="wrong").models.list()
    finally:
        d.stop()


def test_schedules_persist_run_through_the_queue_and_pause(setup, tmp_path):
    cfg, inbox, state = setup
    text = cfg.read_text().replace('replay_check = ""', 'replay_check = "every 2s"')
    cfg.write_text(text)
    d = Daemon(cfg, free_port(), "--inbox", str(inbox))
    try:
        d.wait_up()
        d.wait_for(lambda: any(j["kind"] == "task" and j["state"] == "done" for j in jobs(state)),
                   what="a scheduled replay check")
        run = lambda *a: subprocess.run([sys.executable, "-m", "seal_agent", "--config", str(cfg), *a],
                                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        r = run("schedule", "list", "--json")
        [row] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        assert row["name"] == "replay_check" and not row["paused"] and "interval" in row["trigger"]
        assert "paused" in run("schedule", "pause", "replay_check").stdout
        time.sleep(3)
        n = sum(j["kind"] == "task" for j in jobs(state))
        time.sleep(4)
        assert sum(j["kind"] == "task" for j in jobs(state)) == n  # paused: no new runs
        r = run("schedule", "run", "replay_check", "--json")
        assert json.loads(r.stdout.strip().splitlines()[-1])["queued"] is True
        d.wait_for(lambda: sum(j["kind"] == "task" for j in jobs(state)) == n + 1, what="manual run")
        assert "next run" in run("schedule", "resume", "replay_check").stdout
        r = run("schedule", "pause", "nope")
        assert r.returncode == 1 and "no schedule 'nope'" in r.stderr
    finally:
        d.stop()
    # the schedule (paused or not) survives a restart
    rows = [json.loads(x) for x in subprocess.run(
        [sys.executable, "-m", "seal_agent", "--config", str(cfg), "schedule", "list", "--json"], cwd=ROOT,
        capture_output=True, text=True, timeout=120, check=True).stdout.splitlines() if x.startswith("{")]
    assert [r["name"] for r in rows] == ["replay_check"]


def test_a_restem_refresh_yields_to_a_waiting_document(setup, tmp_path):
    cfg, inbox, state = setup
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(json.loads((SHARED_DATA / "squad" / "train_pool.json").read_text())[:12]))
    cfg.write_text(cfg.read_text() + f"""
[restem]
data = ["{pool}"]
contexts = 6
samples = 2
max_questions = 2
heldout_contexts = 1
heldout_fraction = 0.25
""")
    d = Daemon(cfg, free_port(), "--inbox", str(inbox))
    try:
        d.wait_up()
        r = subprocess.run([sys.executable, "-m", "seal_agent", "--config", str(cfg), "schedule", "run", "restem",
                            "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert json.loads(r.stdout)["queued"] is True, r.stderr
        d.wait_for(lambda: any(j["name"] == "restem" and j["state"] == "learning" for j in jobs(state)),
                   what="the refresh to start")
        (inbox / "normans.txt").write_text("The Normans were led by Rollo. They settled in Normandy.")
        d.wait_for(lambda: (inbox / "done" / "normans.txt").exists(), what="normans.txt learned")
        [job] = [j for j in jobs(state) if j["name"] == "restem"]
        result = json.loads(job["result"])
        assert job["state"] == "done" and "documents are waiting" in result["stopped_early"]
        assert not result["stopped_early"].startswith("stopped after 6")
        order = [j["name"] for j in sorted(jobs(state), key=lambda j: j["updated_at"])]
        assert order.index("restem") < order.index("normans.txt")
        last = d.status()["policy"]["last_round"]
        assert last["round"] == result["round"] and last["decision"] == result["decision"]
    finally:
        d.stop()
