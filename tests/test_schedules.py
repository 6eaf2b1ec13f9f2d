"""The daemon's schedules, without a daemon: a schedule queues its task as a row of the
job queue, and start-up takes over schedules persisted by other code or another
state directory (tests/test_daemon.py runs them in a real daemon)."""

import sys
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler

from seal_agent.memory.state import State
from seal_agent.service.queue import JobQueue
from seal_agent.service.schedules import job_store, schedule_rows, scheduled, start_scheduler, trigger


def test_a_schedule_queues_its_task_in_the_state_database_it_names(tmp_path):
    db = tmp_path / "state" / "seal.db"
    State(db).close()
    scheduled(str(db), "replay_check")
    q = JobQueue(State(db))
    job = q.get(1)
    assert (job.kind, job.name, job.source, job.state) == ("task", "replay_check", "schedule", "queued")
    assert q.get(2) is None
    scheduled(str(tmp_path / "moved" / "seal.db"), "replay_check")  # a database that is gone: none is made
    assert not (tmp_path / "moved").exists()


def test_start_up_takes_over_schedules_persisted_by_other_code_keeping_a_pause(tmp_path, monkeypatch):
    state_dir, db = tmp_path / "s", tmp_path / "s" / "state" / "seal.db"
    State(db).close()
    # a function of code that has moved since (as seal_agent.daemon:scheduled did)
    (tmp_path / "old_seal_schedules.py").write_text("def scheduled(name):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import old_seal_schedules

    old = BackgroundScheduler(jobstores={"default": job_store(state_dir)}, timezone=UTC)
    old.start(paused=True)
    old.add_job(old_seal_schedules.scheduled, trigger("every 1h"), args=["replay_check"], id="replay_check")
    old.add_job(scheduled, trigger("every 1h"), args=[str(tmp_path / "elsewhere.db"), "consolidate"],
                id="consolidate").pause()
    old.add_job(scheduled, trigger("every 2h"), args=[str(db), "restem"], id="restem")
    old.shutdown(wait=False)
    (tmp_path / "old_seal_schedules.py").unlink()
    monkeypatch.delitem(sys.modules, "old_seal_schedules")

    scheduler = start_scheduler(state_dir, db, {"replay_check": trigger("every 1h"),
                                                "consolidate": trigger("every 1h"), "restem": None})
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {"replay_check", "consolidate"}  # restem turned off: removed
        for name, job in jobs.items():
            assert job.func is scheduled and tuple(job.args) == (str(db), name) and job.name == name
        assert jobs["consolidate"].next_run_time is None and jobs["replay_check"].next_run_time is not None
    finally:
        scheduler.shutdown(wait=False)
    rows = {r["name"]: r for r in schedule_rows(state_dir)}  # and so the command line reads them
    assert rows["consolidate"]["paused"] and not rows["replay_check"]["paused"]
