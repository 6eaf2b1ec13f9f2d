"""The daemon's schedules: when each task of [schedule] runs ("every 6h",
"cron 0 3 * * *"), kept in an APScheduler job store (state/schedule.db) that
survives restarts and that the command line reads and edits (list, pause,
resume) whether the daemon runs or not.

A schedule that fires queues its task as a row of the job queue, which the
daemon's worker polls: the persisted job names a module-level function and
plain arguments (the state database, the task), never the running daemon.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..agent import TASKS
from ..config import ScheduleConfig
from ..documents import shown
from ..errors import ConfigError, SealError
from ..memory.state import State
from .queue import JobQueue

log = logging.getLogger(__name__)

_EVERY = re.compile(r"^every\s+(\d+)\s*(s|m|h|d)$")


def trigger(spec: str):
    """"every 6h" -> IntervalTrigger, "cron 0 3 * * *" -> CronTrigger, "" -> None."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    spec = spec.strip()
    if not spec:
        return None
    m = _EVERY.match(spec)
    if m:
        seconds = int(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
        if seconds <= 0:
            raise ConfigError(f"schedule '{spec}': the interval must be positive")
        return IntervalTrigger(seconds=seconds)
    if spec.startswith("cron "):
        try:
            return CronTrigger.from_crontab(spec[5:].strip(), timezone=UTC)
        except ValueError as e:
            raise ConfigError(f"schedule '{spec}': {e}") from None
    raise ConfigError(f"schedule '{spec}' must be \"\", \"every <n><s|m|h|d>\" or \"cron <crontab>\"")


def schedules(cfg: ScheduleConfig) -> dict[str, Any]:
    """Task name -> trigger (None when off), checked at start-up."""
    return {name: trigger(getattr(cfg, name)) for name in TASKS}


def scheduler_store_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'state' / 'schedule.db'}"


def scheduled(database: str, name: str) -> None:
    """What a schedule runs: task `name` queued in the job queue of the state
    database at `database`, for the worker."""
    if not Path(database).is_file():  # never a new database where the state directory was
        log.warning("schedule %s: no state database at %s; not queued", name, shown(database))
        return
    state = State(Path(database))
    try:
        job_id = JobQueue(state).enqueue("task", name, "schedule")
    finally:
        state.close()
    log.info("job %d: task %s queued (schedule)", job_id, name)


def job_store(state_dir: Path, open_: bool = False):
    """The persistent APScheduler job store; `open_=True` makes it readable
    without a running scheduler (for the CLI)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    (state_dir / "state").mkdir(parents=True, exist_ok=True)
    store = SQLAlchemyJobStore(url=scheduler_store_url(state_dir))
    if open_:
        store.start(BackgroundScheduler(timezone=UTC), "default")
    return store


def start_scheduler(state_dir: Path, database: Path, triggers: dict[str, Any]):
    """The running scheduler, its persisted schedules brought in line with
    `triggers`: a task turned off is removed, one with a new trigger replaced;
    one persisted with another function or other arguments (code moved since,
    or the state directory) is pointed at `scheduled` and this database, and
    like the unchanged ones keeps its next run and its pause."""
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(
        jobstores={"default": job_store(state_dir)}, timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )
    scheduler.start(paused=True)
    # A job whose function no longer imports cannot be looked up (that raises): reading
    # them all drops those (APScheduler logs each), and the loop below adds them again.
    scheduler.get_jobs()
    ref = f"{scheduled.__module__}:{scheduled.__qualname__}"
    for name, trig in triggers.items():
        existing = scheduler.get_job(name)
        args = (str(database), name)
        if trig is None:
            if existing is not None:
                existing.remove()
            continue
        if existing is None or str(existing.trigger) != str(trig):
            scheduler.add_job(scheduled, trig, args=args, id=name, name=name, replace_existing=True)
        elif existing.func_ref != ref or tuple(existing.args) != args:
            existing.modify(func=scheduled, args=args, name=name)
    scheduler.resume()
    return scheduler


def schedule_row(job) -> dict[str, Any]:
    next_run = getattr(job, "next_run_time", None)
    return {"name": job.id, "trigger": str(job.trigger), "paused": next_run is None,
            "next_run": next_run.isoformat(timespec="seconds") if next_run else None}


def schedule_rows(state_dir: Path) -> list[dict[str, Any]]:
    """The persisted schedules (readable while the daemon runs or not)."""
    if not (state_dir / "state" / "schedule.db").exists():
        return []
    store = job_store(state_dir, open_=True)
    try:
        return [schedule_row(job) for job in store.get_all_jobs()]
    finally:
        store.shutdown()


def set_paused(state_dir: Path, name: str, paused: bool) -> dict[str, Any]:
    """Pause or resume a persisted schedule (the running daemon's scheduler reads the store)."""
    known = [r["name"] for r in schedule_rows(state_dir)]
    if name not in known:
        raise SealError(f"no schedule '{name}' (known: {', '.join(known) or 'none: start `seal-agent run` once'})")
    store = job_store(state_dir, open_=True)
    try:
        job = store.lookup_job(name)
        job._modify(next_run_time=None if paused else job.trigger.get_next_fire_time(None, datetime.now(UTC)))
        store.update_job(job)
        return schedule_row(job)
    finally:
        store.shutdown()
