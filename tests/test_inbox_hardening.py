"""The inbox and the queue against hostile or unlucky files: swapped symlinks,
forged log lines, name clashes, loops, bad content, duplicates, edits while
queued, folders, crashes, API names; then a seeded batch of malformed entries
through a real daemon.

Most tests drive the real Daemon's intake and worker in-process on a real
SQLite state and real files, with a stand-in for the model (`FakeAgent`: it
reads documents with the real reader and records what it read); the last one
runs the daemon as a user does (subprocess, tiny model)."""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from conftest import DAEMON_SECTIONS, write_config
from test_daemon import Daemon as DaemonProcess
from test_daemon import free_port, jobs

from seal_agent.config import load_config
from seal_agent.documents import read_document, shown
from seal_agent.errors import DocumentError, SealError
from seal_agent.learning.learner import DocumentReport, PassageReport
from seal_agent.memory.state import State
from seal_agent.service import inbox as inbox_mod
from seal_agent.service.daemon import Daemon
from seal_agent.service.inbox import (
    DONE,
    REASON,
    REJECTED,
    Inbox,
    Refused,
    free_names,
    read_entry,
    rename_noreplace,
    upload_problem,
)
from seal_agent.service.queue import JobQueue

# -- a daemon without a model ------------------------------------------------

class FakeLive:
    version = 0


class FakeAgent:
    """Learns nothing: reads the document with the real reader (so bad content raises
    DocumentError as it would) and records the bytes and the path it was given."""

    def __init__(self):
        self.live = FakeLive()
        self.learned: list[tuple[bytes, str | None]] = []
        self.fail_with: Exception | None = None

    def learn(self, path, progress=None, max_passages=None, recorded_as=None):
        if self.fail_with is not None:
            raise self.fail_with
        doc = read_document(Path(path), lambda t: len(t.split()), 400)
        self.learned.append((Path(path).read_bytes(), recorded_as))
        report = DocumentReport(recorded_as or str(path), doc.title, doc.kind, len(self.learned), 0)
        report.passages = [PassageReport(0, p.hash, "learned") for p in doc.passages]
        return report


class FakeServed:
    def current(self):
        return None, 0


@pytest.fixture
def daemon(tmp_path):
    cfg = load_config(write_config(tmp_path / "config.toml", "unused", tmp_path / "state"))
    (tmp_path / "inbox").mkdir()
    d = Daemon(cfg, tmp_path / "inbox")
    d.queue = JobQueue(State(cfg.state_path("database")), max_attempts=2)
    d.agent, d.served = FakeAgent(), FakeServed()
    yield d
    d.queue.state.close()


def work(d: Daemon) -> None:
    while d.work_one():
        pass


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def all_jobs(d: Daemon) -> list:
    """Every job the queue knows, oldest first (ids count up from 1, none is deleted)."""
    out = []
    while (job := d.queue.get(len(out) + 1)) is not None:
        out.append(job)
    return out


# -- 1. what is checked is what is learned -------------------------------------

def test_a_symlink_swapped_after_it_was_taken_does_not_get_an_outside_file_learned(daemon, tmp_path):
    inbox = daemon.inbox_dir
    secret = tmp_path / "secret.txt"
    secret.write_text("The outside secret.")
    (inbox / "inside.txt").write_text("The inside text.")
    (inbox / ".hop").symlink_to(inbox / "inside.txt")  # hidden: the inbox leaves it alone
    (inbox / "link.txt").symlink_to(inbox / ".hop")
    job = daemon.take(inbox / "link.txt")
    assert job.state == "queued" and job.path == str(inbox / "link.txt")
    (inbox / ".hop").unlink()
    (inbox / ".hop").symlink_to(secret)  # swapped after the check, before the learning
    work(daemon)
    [(data, recorded)] = daemon.agent.learned
    assert data == b"The inside text." and recorded == str(inbox / "link.txt")
    assert daemon.queue.get(job.id).state == "done"
    assert (inbox / "link.txt").is_symlink()  # its target changed: not moved as if learned
    assert secret.read_text() == "The outside secret."


def test_a_symlink_swapped_while_it_is_being_followed_is_refused(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "sub" / "inside.txt").write_text("inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "inside.txt").write_text("outside secret")
    (inbox / "link.txt").symlink_to(inbox / "sub" / "inside.txt")
    real = os.path.realpath

    def resolve_then_swap(path, strict=False):
        target = real(path, strict=strict)
        if str(path).endswith("link.txt"):  # the race: a folder on the way becomes a link outside
            (inbox / "sub").rename(inbox / ".old-sub")
            (inbox / "sub").symlink_to(outside)
        return target

    monkeypatch.setattr(inbox_mod.os.path, "realpath", resolve_then_swap)
    with pytest.raises(Refused, match="changed while it was being followed"):
        read_entry(inbox / "link.txt", inbox, 1000)


def test_an_entry_is_read_once_and_checked_on_what_was_opened(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text("hello")
    assert read_entry(inbox / "a.txt", inbox, 100) == b"hello"
    os.mkfifo(inbox / "pipe.txt")
    with pytest.raises(Refused, match="FIFO"):  # and does not hang waiting for a writer
        read_entry(inbox / "pipe.txt", inbox, 100)
    (inbox / "big.txt").write_bytes(b"x" * 101)
    with pytest.raises(Refused, match="over the limit"):
        read_entry(inbox / "big.txt", inbox, 100)
    (inbox / "dir.txt").mkdir()
    with pytest.raises(Refused, match="folders are not taken"):
        read_entry(inbox / "dir.txt", inbox, 100)
    (inbox / "dangling.txt").symlink_to(inbox / "nowhere.txt")
    with pytest.raises(Refused, match="to nothing"):
        read_entry(inbox / "dangling.txt", inbox, 100)
    (inbox / "self.txt").symlink_to(inbox)
    with pytest.raises(Refused, match="folders"):
        read_entry(inbox / "self.txt", inbox, 100)


# -- 2. names cannot forge log lines -----------------------------------------

def test_names_with_line_breaks_and_escapes_are_shown_escaped_in_logs_and_reasons(daemon, caplog):
    inbox = daemon.inbox_dir
    forged = "x.txt\n2030-01-01 INFO seal_agent.daemon: job 9: learned \x1b[32mall.docx"
    (inbox / forged).write_text("unsupported")
    queued = "notes\r\nFORGED.txt"
    (inbox / queued).write_text("Some notes.")
    with caplog.at_level(logging.INFO, logger="seal_agent"):
        daemon.take(inbox / forged)
        daemon.take(inbox / queued)
        work(daemon)
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all("\n" not in m and "\r" not in m and "\x1b" not in m for m in messages)
    assert any("x.txt\\n2030-01-01" in m for m in messages)
    reason = (inbox / REJECTED / f"{forged}{REASON}").read_text()
    assert reason.count("\n") == 1 and "\x1b" not in reason
    assert all("\n" not in (j.error or "") for j in all_jobs(daemon))
    assert (inbox / DONE / queued).exists()


def test_shown_escapes_what_is_not_printable_and_nothing_else():
    assert shown("plain-ünïcödé 日本.txt") == "plain-ünïcödé 日本.txt"
    assert shown("a\nb\tc\x1b[0m\udce9\u2028") == "a\\nb\\tc\\x1b[0m\\udce9\\u2028"
    assert shown(shown("a\nb")) == shown("a\nb")


def test_the_daemon_log_format_keeps_every_message_on_one_line():
    from seal_agent.service.daemon import _OneLine

    record = logging.LogRecord("seal_agent.x", logging.INFO, __file__, 1, "took %s", ("a\nFORGED",), None)
    assert _OneLine("%(message)s").format(record) == "took a\\nFORGED"


# -- 3. nothing the daemon writes overwrites anything --------------------------

def test_a_reason_file_never_overwrites_a_users_file_of_that_name(daemon):
    inbox = daemon.inbox_dir
    (inbox / REJECTED).mkdir()
    (inbox / REJECTED / "victim.txt.reason.txt").write_text("my own notes")  # rejected earlier, kept
    (inbox / "victim.txt").write_text("")
    job = daemon.take(inbox / "victim.txt")
    assert job.state == "rejected"
    assert (inbox / REJECTED / "victim.txt.reason.txt").read_text() == "my own notes"
    moved = Path(job.result["moved_to"])
    assert moved.name == "victim.1.txt" and (inbox / REJECTED / f"{moved.name}{REASON}").read_text() == "empty file\n"


def test_moves_and_uploads_never_replace_a_file_or_a_symlink(daemon, monkeypatch):
    inbox = daemon.inbox_dir
    a, b = inbox / "a.txt", inbox / "b.txt"
    a.write_text("a")
    b.write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    assert b.read_text() == "b" and a.read_text() == "a"
    (inbox / "notes.md").symlink_to(inbox / "missing.md")  # dangling: exists() says no
    job = daemon.submit("notes.md", b"# Notes\n\nUploaded text.")
    assert (inbox / "notes.md").is_symlink() and job.path == str(inbox / "notes.1.md")
    # without renameat2 (another OS or file system): the fallbacks refuse too
    monkeypatch.setattr(inbox_mod, "_RENAMEAT2", None)
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    (inbox / "d1").mkdir()
    (inbox / "d2").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(inbox / "d1", inbox / "d2")
    link = inbox / "l.txt"
    link.symlink_to(a)
    rename_noreplace(link, inbox / "l2.txt")
    assert (inbox / "l2.txt").is_symlink() and not link.exists() and a.read_text() == "a"


def test_a_name_too_long_for_its_reason_file_is_shortened_not_stuck(daemon):
    inbox = daemon.inbox_dir
    name = "n" * 246 + ".txt"  # 250 bytes: with ".reason.txt" over the 255 a file name may have
    (inbox / name).write_text("")
    job = daemon.take(inbox / name)
    moved = Path(job.result["moved_to"])
    assert job.state == "rejected" and not (inbox / name).exists()
    assert moved.suffix == ".txt" and len((moved.name + REASON).encode()) <= 255
    assert (moved.parent / f"{moved.name}{REASON}").read_text() == "empty file\n"
    assert all(len(n.encode()) + len(REASON) <= 255 for n, _ in zip(free_names(name), range(12)))


# -- 4. one bad entry never holds back another ----------------------------------

def test_a_symlink_loop_that_sorts_first_does_not_stall_the_others(daemon):
    inbox = daemon.inbox_dir
    (inbox / "a-loop.txt").symlink_to(inbox / "a-loop2.txt")
    (inbox / "a-loop2.txt").symlink_to(inbox / "a-loop.txt")
    (inbox / "b.txt").write_text("Bees make honey.")
    (inbox / "c.txt").write_text("Cats chase mice.")
    watcher = Inbox(inbox, daemon.cfg.inbox, daemon.take)
    watcher.cfg.stable_s = 0
    watcher.scan()  # as at a restart with this backlog
    watcher.poll()
    watcher.poll()
    assert "loop" in (inbox / REJECTED / f"a-loop.txt{REASON}").read_text()
    assert {j.name: j.state for j in all_jobs(daemon)} == {
        "a-loop.txt": "rejected", "a-loop2.txt": "rejected", "b.txt": "queued", "c.txt": "queued"}


def test_any_failure_taking_one_entry_rejects_it_and_the_poll_goes_on(daemon, monkeypatch):
    inbox = daemon.inbox_dir
    for n in "abc":
        (inbox / f"{n}.txt").write_text(f"Text {n}.")
    real = inbox_mod.read_entry

    def broken_for_a(path, *args):
        if path.name == "a.txt":
            raise RuntimeError("boom")
        return real(path, *args)

    monkeypatch.setattr("seal_agent.service.daemon.read_entry", broken_for_a)
    watcher = Inbox(inbox, daemon.cfg.inbox, daemon.take)
    watcher.cfg.stable_s = 0
    watcher.scan()
    watcher.poll()
    watcher.poll()
    states = {j.name: j.state for j in all_jobs(daemon)}
    assert states == {"a.txt": "rejected", "b.txt": "queued", "c.txt": "queued"}
    assert "RuntimeError: boom" in (inbox / REJECTED / f"a.txt{REASON}").read_text()
    # a take that raises (its own rejection failed) costs only that entry
    taken = []

    def take(path):
        if path.name == "e.txt":
            raise OSError("disk gone")
        taken.append(path.name)

    for n in "def":
        (inbox / f"{n}.txt").write_text(n)
    other = Inbox(inbox, daemon.cfg.inbox, take)
    other.cfg.stable_s = 0
    for n in "def":
        other._note(inbox / f"{n}.txt", moved_in=True)
    other.poll()
    assert taken == ["d.txt", "f.txt"]


# -- 5. bad content is rejected once; transient failures end visible ------------

@pytest.mark.parametrize("name, content, why", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("deep.jsonl", '{"context": ' + "[" * 50_000 + "]" * 50_000 + "}\n", "nested too deeply"),
    ("huge.json", '{"context": "x", "n": ' + "7" * 5000 + "}", "5,000 digits"),
    ("types.json", '{"title": 5, "context": "x"}', "'title' must be a string"),
    ("ctx.json", '{"context": ["a"]}', "'context' string"),
    ("qs.json", '{"context": "x", "questions": [{"question": "q", "answers": [7]}]}', "'answer' string"),
    ("surrogate.json", '{"context": "bad \\ud800 text"}', "lone surrogate"),
    ("bom.txt", "\ufeff", "no text"),
    ("broken.pdf", "%PDF-1.4\n1 0 obj << /Type /Catalog >>\ntrailer << /Root 9 0 R >>\n%%EOF", "PDF"),
])
def test_content_that_cannot_be_parsed_is_a_document_error(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DocumentError, match=why):
        read_document(path, lambda t: len(t.split()), 400)


def test_bad_content_is_rejected_at_the_first_attempt(daemon):
    inbox = daemon.inbox_dir
    (inbox / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    job = daemon.take(inbox / "deep.json")
    work(daemon)
    job = daemon.queue.get(job.id)
    assert job.state == "rejected" and job.attempts == 1 and "nested too deeply" in job.error
    assert "nested too deeply" in (inbox / REJECTED / f"deep.json{REASON}").read_text()


def test_a_job_that_keeps_failing_ends_in_rejected_and_is_not_run_again_at_restart(daemon):
    inbox = daemon.inbox_dir
    (inbox / "a.txt").write_text("Some text.")
    job = daemon.take(inbox / "a.txt")
    daemon.agent.fail_with = OSError("disk full")
    work(daemon)
    job = daemon.queue.get(job.id)
    assert job.state == "failed" and job.attempts == 2 and "disk full" in job.error
    reason = (inbox / REJECTED / f"a.txt{REASON}").read_text()
    assert "failed 2 times" in reason and "disk full" in reason and "drop it into the inbox again" in reason
    assert entries(inbox) == {REJECTED} and job.result["moved_to"] == str(inbox / REJECTED / "a.txt")
    assert not any(daemon.copies.root.iterdir())
    # a restart finds nothing to run again
    watcher = Inbox(inbox, daemon.cfg.inbox, daemon.take)
    watcher.scan()
    assert watcher.poll() == [] and daemon.queue.claim() is None


def test_a_document_that_crashes_the_daemon_every_time_is_given_up(tmp_path):
    q = JobQueue(State(tmp_path / "seal.db"), max_attempts=2)
    a = q.enqueue("document", "a.txt", "inbox", "/x/a.txt", "0" * 64)
    b = q.enqueue("document", "b.txt", "inbox", "/x/b.txt", "1" * 64)
    assert q.claim().id == a
    q.recover()  # crash 1
    assert q.claim().id == a and q.get(a).attempts == 2
    [gone] = q.give_up_interrupted()  # crash 2: its attempts are used up
    assert gone.id == a and gone.state == "failed" and "2 times" in gone.error
    assert q.recover() == [] and q.claim().id == b
    q.release(b)  # a clean stop abandoned it: not counted
    assert q.get(b).state == "queued" and q.get(b).attempts == 0


# -- 6. bookkeeping ------------------------------------------------------------------

def test_two_files_with_the_same_content_both_end_in_done(daemon):
    inbox = daemon.inbox_dir
    (inbox / "a.txt").write_text("The same text.")
    (inbox / "b.txt").write_text("The same text.")
    first, second = daemon.take(inbox / "a.txt"), daemon.take(inbox / "b.txt")
    assert first.id != second.id and second.state == "queued"
    work(daemon)
    assert len(daemon.agent.learned) == 1
    second = daemon.queue.get(second.id)
    assert second.state == "done" and second.result["duplicate_of"] == first.id
    assert entries(inbox / DONE) == {"a.txt", "b.txt"} and entries(inbox) == {DONE}
    # the watcher seeing an uploaded file again does not make it a second job
    job = daemon.submit("c.txt", b"Another text.")
    assert daemon.take(inbox / "c.txt").id == job.id


def test_with_after_keep_learned_files_stay_and_a_restart_queues_nothing(daemon):
    inbox = daemon.inbox_dir
    daemon.cfg.inbox.after = "keep"
    (inbox / "a.txt").write_text("Kept text.")
    (inbox / "b.txt").write_text("Kept text.")
    daemon.take(inbox / "a.txt")
    daemon.take(inbox / "b.txt")
    work(daemon)
    assert entries(inbox) == {"a.txt", "b.txt"} and len(daemon.agent.learned) == 1
    n = len(all_jobs(daemon))
    watcher = Inbox(inbox, daemon.cfg.inbox, daemon.take)
    watcher.cfg.stable_s = 0
    watcher.scan()  # a restart
    watcher.poll()
    watcher.poll()
    assert len(all_jobs(daemon)) == n and daemon.queue.claim() is None


def test_a_file_edited_while_queued_is_learned_as_each_content_and_moved_once(daemon):
    inbox = daemon.inbox_dir
    path = inbox / "a.txt"
    path.write_text("First version.")
    old = daemon.take(path)
    path.write_text("Second version, longer.")
    new = daemon.take(path)
    assert new.id != old.id
    assert daemon.work_one()  # the first job learns the bytes it hashed...
    assert daemon.agent.learned[0][0] == b"First version."
    assert path.read_text() == "Second version, longer."  # ...and leaves the new content in place
    work(daemon)
    assert [d for d, _ in daemon.agent.learned] == [b"First version.", b"Second version, longer."]
    assert entries(inbox / DONE) == {"a.txt"} and (inbox / DONE / "a.txt").read_text() == "Second version, longer."
    assert daemon.queue.get(old.id).state == "done" and daemon.queue.get(old.id).result["moved_to"] is None


def test_a_folder_is_rejected_with_a_reason_moved_as_a_whole(daemon):
    inbox = daemon.inbox_dir
    (inbox / "papers").mkdir()
    (inbox / "papers" / "one.txt").write_text("One.")
    watcher = Inbox(inbox, daemon.cfg.inbox, daemon.take)
    watcher.cfg.stable_s = 0
    watcher.scan()
    watcher.poll()
    watcher.poll()
    assert (inbox / REJECTED / "papers" / "one.txt").read_text() == "One."
    assert "drop the files themselves" in (inbox / REJECTED / f"papers{REASON}").read_text()


def test_documents_a_crash_left_learning_are_marked_interrupted(tmp_path):
    state = State(tmp_path / "seal.db")
    doc = state.add_document("/x/a.txt", "0" * 64, "a", "txt")
    done = state.add_document("/x/b.txt", "1" * 64, "b", "txt")
    state.finish_document(done, "done", {})
    assert state.interrupt_documents() == [doc]
    assert state.document(doc)["status"] == "interrupted" and state.document(done)["status"] == "done"


@pytest.mark.parametrize("name, why", [
    (".bashrc", "hidden and temporary"), ("x.part", "hidden and temporary"), ("done", "hidden and temporary"),
    ("a" * 300 + ".txt", "over the file system's 255"), ("é" * 126 + ".txt", "over the file system's 255"),
    ("bad\nname.txt", "control characters"), ("esc\x1b.txt", "control characters"),
    ("notes.docx", "unsupported file type"), ("../up.txt", "no folders"), ("", "bad file name"),
])
def test_an_upload_with_a_name_the_inbox_would_not_take_leaves_nothing_behind(daemon, name, why):
    assert why in upload_problem(name)
    with pytest.raises(SealError, match=why.replace(".", r"\.")):
        daemon.submit(name, b"text")
    assert entries(daemon.inbox_dir) == set()


def test_an_upload_is_recorded_as_from_the_api_and_cleans_up_after_a_failure(daemon, monkeypatch):
    job = daemon.submit("notes.md", b"# Notes\n\nText.")
    assert job.source == "api" and job.state == "queued"
    with pytest.raises(SealError, match="over the limit"):
        daemon.submit("big.txt", b"x" * (daemon.cfg.inbox.max_bytes + 1))

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("seal_agent.service.daemon.rename_noreplace", fail)
    with pytest.raises(OSError):
        daemon.submit("other.md", b"text")
    assert entries(daemon.inbox_dir) == {"notes.md"}  # no .upload-*.part left


# -- 7. the same faults elsewhere ----------------------------------------------------

def test_a_rejected_job_is_recorded_final_at_once_never_claimable(tmp_path):
    q = JobQueue(State(tmp_path / "seal.db"))
    job_id = q.record("document", "x.docx", "inbox", "rejected", path="/i/x.docx", error="unsupported")
    assert q.get(job_id).state == "rejected" and q.claim() is None


def test_a_name_that_is_not_utf8_is_rejected_and_recorded(daemon):
    inbox = daemon.inbox_dir
    raw = os.fsencode(inbox) + b"/caf\xe9.txt"
    with open(raw, "wb") as f:
        f.write(b"text")
    path = Path(os.fsdecode(raw))
    job = daemon.take(path)
    assert job.state == "rejected" and "not valid UTF-8" in job.error and "\\udce9" in job.name
    assert os.path.exists(os.fsencode(inbox) + b"/rejected/caf\xe9.txt.reason.txt")


def test_an_entry_that_cannot_even_be_looked_at_does_not_stop_the_poll(daemon):
    inbox = daemon.inbox_dir
    (inbox / "b.txt").write_text("Bees.")
    watcher = Inbox(inbox, daemon.cfg.inbox, daemon.take)
    watcher._note(inbox / ("x" * 300 + ".txt"), moved_in=True)  # lstat: ENAMETOOLONG
    watcher._note(inbox / "b.txt", moved_in=True)
    watcher.poll()
    assert [j.name for j in all_jobs(daemon)] == ["b.txt"]


def test_the_worker_outlives_a_failure_of_the_queue_itself(daemon, monkeypatch):
    import threading

    (daemon.inbox_dir / "a.txt").write_text("Some text.")
    job = daemon.take(daemon.inbox_dir / "a.txt")
    real, calls = daemon.queue.claim, []

    def claim():
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real()

    monkeypatch.setattr(daemon.queue, "claim", claim)
    daemon.retry_s = 0.01
    worker = threading.Thread(target=daemon._work)
    worker.start()
    deadline = time.monotonic() + 10
    while daemon.queue.get(job.id).state != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon._stop.set()
    worker.join(5)
    assert daemon.queue.get(job.id).state == "done" and len(calls) > 1


def test_queue_copies_no_job_needs_are_pruned(daemon):
    inbox = daemon.inbox_dir
    (inbox / "a.txt").write_text("Text a.")
    job = daemon.take(inbox / "a.txt")
    stray = daemon.copies.put("f" * 64, "stray.txt", b"left by a crash")
    keep = {(j.sha256, j.name) for j in daemon.queue.active_documents()}
    assert daemon.copies.prune(keep) == 1 and not stray.exists()
    assert daemon.copies.path(job.sha256, "a.txt").read_bytes() == b"Text a."


def test_the_inbox_may_not_hold_the_daemons_own_state(tmp_path):
    from seal_agent.errors import ConfigError

    cfg = load_config(write_config(tmp_path / "config.toml", "unused", tmp_path / "state"))
    with pytest.raises(ConfigError, match="a folder of its own"):
        Daemon(cfg, tmp_path / "state")


# -- 8. a seeded batch of malformed entries through a real daemon ---------------------

def _malformed(rng: random.Random, i: int, inbox: Path, outside: Path) -> str:
    """Write the i-th malformed entry into the inbox; its name."""
    kinds = ["binary", "truncated", "deep", "hugeint", "types", "empty", "bom", "fifo", "dangling", "loop",
             "folder", "outside", "control", "unicode", "jsonl", "pdf", "surrogate", "unsupported", "notutf8",
             "longname"]
    kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
    name = f"{i:02d}-{kind}"
    if kind == "binary":
        name += ".txt"
        (inbox / name).write_bytes(b"\x00" + rng.randbytes(rng.randint(1, 3000)))
    elif kind == "truncated":
        name += ".json"
        text = json.dumps({"title": "t", "context": "Some context.", "questions": [{"question": "q", "answer": "a"}]})
        (inbox / name).write_text(text[: rng.randint(1, len(text) - 1)])
    elif kind == "deep":
        name += ".json"
        depth = rng.randint(20_000, 200_000)
        (inbox / name).write_text("[" * depth + "]" * depth)
    elif kind == "hugeint":
        name += ".json"
        (inbox / name).write_text('{"context": "x", "n": ' + "9" * rng.randint(4400, 20000) + "}")
    elif kind == "types":
        name += ".json"
        bad = rng.choice([{"title": 5, "context": "x"}, {"context": ["x"]}, {"context": "x", "questions": "q"},
                          {"context": "x", "questions": [{"question": 1, "answer": "a"}]}, [1, 2, 3], "text"])
        (inbox / name).write_text(json.dumps(bad))
    elif kind == "empty":
        name += rng.choice([".md", ".txt", ".json"])
        (inbox / name).write_text("")
    elif kind == "bom":
        name += ".txt"
        (inbox / name).write_bytes(b"\xef\xbb\xbf")
    elif kind == "fifo":
        name += ".txt"
        os.mkfifo(inbox / name)
    elif kind == "dangling":
        name += ".txt"
        (inbox / name).symlink_to(inbox / f"{name}-missing")
    elif kind == "loop":
        name += ".txt"
        (inbox / name).symlink_to(inbox / name)
    elif kind == "folder":
        name += rng.choice(["", ".txt"])
        (inbox / name).mkdir()
        (inbox / name / "inner.txt").write_text("Inner text.")
    elif kind == "outside":
        name += ".txt"
        (inbox / name).symlink_to(outside)
    elif kind == "control":
        name += rng.choice(["\nFORGED INFO seal_agent.daemon: job 1: learned.json", "\x1b[31m.json", "\t\r.json"])
        (inbox / name).write_text("{")
    elif kind == "unicode":
        name += rng.choice(["-données.json", "-日本語.txt", "-\u202eevil.md"])
        (inbox / name).write_bytes(b"\x00\xff" * 10)
    elif kind == "jsonl":
        name += ".jsonl"
        (inbox / name).write_text('{"context": "fine"}\n{"context": \n')
    elif kind == "pdf":
        name += ".pdf"
        (inbox / name).write_bytes(b"%PDF-1.4\n" + rng.randbytes(200))
    elif kind == "surrogate":
        name += ".json"
        (inbox / name).write_text('{"context": "\\udc80 broken"}')
    elif kind == "unsupported":
        name += ".docx"
        (inbox / name).write_bytes(rng.randbytes(50))
    elif kind == "notutf8":
        raw = os.fsencode(inbox / name) + b"-\xff.txt"
        with open(raw, "wb") as f:
            f.write(b"text")
        name = os.fsdecode(raw).rsplit("/", 1)[1]
    elif kind == "longname":
        name = name + "-" + "L" * 230 + ".txt"  # 246 bytes: its reason file's name would not fit
        (inbox / name).write_text("")
    return name


def test_a_seeded_batch_of_malformed_entries_never_holds_back_the_good_ones(tmp_path, tiny_model_dir):
    inbox, state_dir = tmp_path / "inbox", tmp_path / "state"
    cfg = write_config(tmp_path / "config.toml", tiny_model_dir, state_dir, extra=DAEMON_SECTIONS)
    # a document a crash left `learning` before this start
    stale = State(state_dir / "state" / "seal.db")
    stale_doc = stale.add_document("/old/a.txt", "0" * 64, "a", "txt")
    stale.close()
    inbox.mkdir()
    (inbox / REJECTED).mkdir()
    (inbox / REJECTED / "victim.txt.reason.txt").write_text("mine")  # must survive
    outside = tmp_path / "secret.txt"
    outside.write_text("outside secret")

    d = DaemonProcess(cfg, free_port(), "--inbox", str(inbox))
    try:
        d.wait_up()
        assert sqlite3.connect(state_dir / "state" / "seal.db").execute(
            "SELECT status FROM documents WHERE id = ?", (stale_doc,)).fetchone()[0] == "interrupted"
        rng = random.Random(20240611)
        good = {"good-normans.txt": "The Normans were led by Rollo. They settled in Normandy.",
                "good-hastings.txt": "William won the battle of Hastings in 1066."}
        names = []
        for i in range(40):
            if i in (13, 29):  # the good ones arrive among the bad
                name = "good-normans.txt" if i == 13 else "good-hastings.txt"
                (inbox / name).write_text(good[name])
                names.append(name)
            names.append(_malformed(rng, i, inbox, outside))
        names.append("good-normans-again.txt")  # the same content: a duplicate, moved to done/
        (inbox / "good-normans-again.txt").write_text(good["good-normans.txt"])
        names.append("victim.txt")
        (inbox / "victim.txt").write_text("")
        # uploads with names the inbox would not take leave nothing behind
        for bad in (".bashrc", "x.part", "n" * 300 + ".txt", "a\nb.txt"):
            r = httpx.post(f"{d.url}/v1/documents", json={"filename": bad, "content": "x"}, timeout=10)
            assert r.status_code == 400, (bad, r.text)

        def settled():
            left = [p for p in os.listdir(os.fsencode(inbox)) if p not in (b"done", b"rejected")]
            counts = d.status()["queue"]
            return not left and counts["queued"] == 0 and counts["learning"] == 0

        d.wait_for(settled, timeout=90, what="every entry settled")
        assert httpx.get(f"{d.url}/healthz", timeout=5).status_code == 200
        done, rejected = os.fsencode(inbox / DONE), os.fsencode(inbox / REJECTED)
        for name in names:
            if name.startswith("good"):
                assert os.path.lexists(os.path.join(done, os.fsencode(name))), name
                continue
            stem = os.fsencode(Path(name).stem)[:100]
            candidates = [n for n in os.listdir(rejected) if n.startswith(stem) and not n.endswith(REASON.encode())]
            assert candidates, f"{name!r} not in rejected/"
            assert any(os.path.exists(os.path.join(rejected, c + REASON.encode())) for c in candidates), name
        assert (inbox / REJECTED / "victim.txt.reason.txt").read_text() == "mine"
        assert outside.read_text() == "outside secret"
        rows = jobs(state_dir)
        assert not [j for j in rows if j["state"] in ("queued", "learning", "failed")], rows
        assert all(j["attempts"] <= 1 for j in rows)  # bad content is never retried
        learned = {j["name"]: j for j in rows if j["state"] == "done"}
        results = {n: json.loads(learned[n]["result"]) for n in good | {"good-normans-again.txt": ""}}
        [first] = [n for n, r in results.items() if n.startswith("good-normans") and r["status"] != "duplicate"]
        assert [r["status"] for r in results.values()].count("duplicate") == 1
        assert results[first]["learned"] == 1 and results["good-hastings.txt"]["learned"] == 1
        db = sqlite3.connect(state_dir / "state" / "seal.db")
        paths = {r[0] for r in db.execute("SELECT path FROM documents WHERE id != ?", (stale_doc,))}
        assert paths == {str(inbox / first), str(inbox / "good-hastings.txt")}  # the inbox paths, not copies
        assert not list((state_dir / "state" / "queue").iterdir())
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    log = d.log.read_text(errors="replace")
    assert not any(line.startswith("FORGED") for line in log.splitlines())
