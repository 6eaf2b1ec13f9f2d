"""The daemon's durable queue and inbox rules, on a real SQLite file and real files."""

from pathlib import Path

from seal_agent.memory.state import State
from seal_agent.service.inbox import DONE, REJECTED, ignored, move_to, problem
from seal_agent.service.queue import JobQueue


def test_queue_claims_in_order_recovers_interrupted_jobs_and_retries_with_a_limit(tmp_path):
    db = tmp_path / "seal.db"
    q = JobQueue(State(db), max_attempts=2)
    a = q.enqueue("document", "a.txt", "inbox", "/x/a.txt", "sha-a")
    b = q.enqueue("task", "replay_check", "schedule")
    job = q.claim()
    assert job.id == a and job.state == "learning" and job.attempts == 1
    # a crash: a new process finds the job still "learning" and queues it again
    q = JobQueue(State(db), max_attempts=2)
    assert q.recover() == [a] and q.get(a).state == "queued" and "interrupted" in q.get(a).error
    assert q.claim().id == a and q.get(a).attempts == 2
    assert q.retry_or_fail(q.get(a), "OSError: disk full") == "failed"  # attempts used up
    assert q.get(a).error == "OSError: disk full"
    job = q.claim()
    assert job.id == b and q.retry_or_fail(job, "boom") == "queued"  # one attempt left
    q.finish(q.claim().id, "done", result={"accuracy": 0.5})
    assert q.get(b).result == {"accuracy": 0.5} and q.claim() is None
    assert q.counts() == {"queued": 0, "learning": 0, "done": 1, "rejected": 0, "failed": 1}
    assert q.by_sha("sha-a").id == a and q.by_sha("nope") is None


def test_inbox_rules(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert ignored(inbox / ".hidden.txt", inbox) and ignored(inbox / "x.txt.part", inbox)
    assert ignored(inbox / "notes.txt~", inbox) and ignored(inbox / DONE / "a.txt", inbox)
    assert not ignored(inbox / "paper.pdf", inbox)
    big = inbox / "big.txt"
    big.write_text("x" * 100)
    assert "over the limit" in problem(big, inbox, max_bytes=10)
    assert problem(big, inbox, max_bytes=1000) is None
    inner = inbox / "link.txt"
    inner.symlink_to(big)  # a symlink inside the inbox is fine
    assert problem(inner, inbox, 1000) is None
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (inbox / "leak.txt").symlink_to(outside)
    assert "outside the inbox" in problem(inbox / "leak.txt", inbox, 1000)
    # moving never overwrites: a second file of the same name gets a number
    first = move_to(big, inbox, REJECTED, "too big")
    big.write_text("again")
    second = move_to(big, inbox, REJECTED, "still too big")
    assert first.name == "big.txt" and second.name == "big.1.txt"
    assert (inbox / REJECTED / "big.1.txt.reason.txt").read_text() == "still too big\n"
    assert Path(outside).read_text() == "secret"
