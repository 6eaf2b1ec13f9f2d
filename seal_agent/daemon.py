"""`seal-agent run`: the long-running daemon.

Threads, one job each:
  - the inbox watcher turns complete files into queued jobs (inbox.py);
  - the worker learns queued jobs one at a time with the SealAgent, then
    hands a copy of the new live weights to the API (a version switch is
    atomic, between requests);
  - the scheduler (APScheduler, persistent SQLite job store) queues tasks such
    as the replay check; they run on the worker like any job;
  - the main thread serves the API (uvicorn) until SIGTERM/SIGINT.
One daemon per state directory (an flock'ed lock file holding the pid). A kill
at any moment loses nothing: jobs are rows in SQLite, a version is live only
once its transaction commits, and an interrupted job is retried at start-up.
"""

from __future__ import annotations

import copy
import fcntl
import ipaddress
import logging
import logging.handlers
import os
import re
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .agent import TASKS, SealAgent
from .config import Config, ScheduleConfig, _resolve
from .documents import file_hash
from .errors import ConfigError, DocumentError, SealError
from .inbox import DONE, REJECTED, Inbox, ignored, move_to, problem
from .jobs import ACTIVE, Job, JobQueue
from .model.loader import answer_dtype
from .refresh import rounds
from .replay import counts as replay_counts

log = logging.getLogger("seal_agent.daemon")
_CURRENT: Daemon | None = None  # the running daemon, for scheduler callbacks


class DaemonRunning(SealError):
    pass


# -- the lock --------------------------------------------------------------

class StateLock:
    """An exclusive flock on STATE/state/daemon.lock; the file holds the owner's pid."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DaemonRunning(f"another seal-agent daemon (pid {pid}) is running on this state directory "
                                f"({self.path.parent.parent}); stop it first or use another --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def running_pid(state_dir: Path) -> int | None:
    """The pid of the daemon holding this state directory's lock, if any."""
    path = state_dir / "state" / "daemon.lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# -- schedules -------------------------------------------------------------

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


def scheduled(name: str) -> None:
    """What the scheduler runs: queue the task for the worker (a module-level
    function, so the persistent job store can refer to it)."""
    if _CURRENT is not None:
        _CURRENT.queue_task(name, source="schedule")


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


def _row(job) -> dict[str, Any]:
    next_run = getattr(job, "next_run_time", None)
    return {"name": job.id, "trigger": str(job.trigger), "paused": next_run is None,
            "next_run": next_run.isoformat(timespec="seconds") if next_run else None}


def schedule_rows(state_dir: Path) -> list[dict[str, Any]]:
    """The persisted schedules (readable while the daemon runs or not)."""
    if not (state_dir / "state" / "schedule.db").exists():
        return []
    store = job_store(state_dir, open_=True)
    try:
        return [_row(job) for job in store.get_all_jobs()]
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
        return _row(job)
    finally:
        store.shutdown()


# -- the daemon ------------------------------------------------------------

def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Daemon:
    def __init__(self, cfg: Config, inbox: Path | None = None):
        if not _loopback(cfg.api.host) and not cfg.api.token:
            raise ConfigError(f"api.host = {cfg.api.host!r} is reachable from other machines: set api.token "
                              "(every request must then carry 'Authorization: Bearer <token>')")
        self.cfg = cfg
        self.schedules = schedules(cfg.schedule)  # bad specs fail before anything starts
        self.state_dir = cfg.state_dir
        self.lock = StateLock(self.state_dir / "state" / "daemon.lock")
        self.inbox_dir = (inbox or _resolve(self.state_dir, cfg.inbox.dir)).resolve()
        self.agent: SealAgent | None = None
        self.queue: JobQueue | None = None
        self.served = None
        self.scheduler = None
        self.inbox: Inbox | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._intake = threading.Lock()
        self.current_job: int | None = None

    # -- start / stop --------------------------------------------------------
    def start(self) -> None:
        """Everything but the API: lock, model, queue recovery, inbox, worker, scheduler."""
        global _CURRENT
        self.lock.acquire()
        try:
            self._setup_logging()
            self.agent = SealAgent(self.cfg)
            self.queue = JobQueue(self.agent.state, self.cfg.daemon.max_attempts)
            recovered = self.queue.recover()
            for job_id in recovered:
                log.info("job %d: interrupted by a stop; queued again", job_id)
            from .server import Served

            live = self.agent.live
            self.served = Served(copy.deepcopy(live.model), live.tokenizer, live.version,
                                 use_chat=self.cfg.model.use_chat_template, dtype=answer_dtype(self.cfg))
            self.agent.bank  # noqa: B018 - load the embedder now, not during the first job
            _CURRENT = self
            self.inbox = Inbox(self.inbox_dir, self.cfg.inbox, self.take)
            self.inbox.start()
            self._worker = threading.Thread(target=self._work, name="learner", daemon=True)
            self._worker.start()
            self._start_scheduler()
            log.info("daemon started: pid %d, live version %d, inbox %s", os.getpid(), live.version, self.inbox_dir)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work; let the current step finish for up to `timeout` s (an
        abandoned job is retried at the next start)."""
        global _CURRENT
        self._stop.set()
        self._wake.set()
        if self.inbox is not None:
            self.inbox.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.warning("job %s still learning at exit: it will be retried at the next start",
                            self.current_job)
        _CURRENT = None
        if self.agent is not None and (self._worker is None or not self._worker.is_alive()):
            self.agent.close()
        self.lock.release()

    def _setup_logging(self) -> None:
        logs = self.cfg.state_path("logs")
        logs.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(logs / "daemon.log", maxBytes=5_000_000, backupCount=3)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("seal_agent")
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in logging.getLogger().handlers + root.handlers):
            stream = logging.StreamHandler()
            stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(stream)

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(
            jobstores={"default": job_store(self.state_dir)}, timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self.scheduler.start(paused=True)
        for name, trig in self.schedules.items():
            existing = self.scheduler.get_job(name)
            if trig is None:
                if existing is not None:
                    existing.remove()
                continue
            if existing is not None and str(existing.trigger) == str(trig):
                continue  # keep its persisted next run (and a pause)
            self.scheduler.add_job(scheduled, trig, args=[name], id=name, name=name, replace_existing=True)
        self.scheduler.resume()

    # -- intake ------------------------------------------------------------
    def take(self, path: Path) -> Job | None:
        """A complete file in the inbox: reject it, skip it, or queue it."""
        with self._intake:
            if ignored(path, self.inbox_dir) or not (path.exists() or path.is_symlink()):
                return None
            reason = problem(path, self.inbox_dir, self.cfg.inbox.max_bytes)
            if reason is not None:
                dest = move_to(path, self.inbox_dir, REJECTED, reason)
                log.warning("rejected %s: %s", path.name, reason)
                job_id = self.queue.enqueue("document", path.name, "inbox", str(dest))
                self.queue.finish(job_id, "rejected", error=reason)
                return self.queue.get(job_id)
            sha = file_hash(path)
            previous = self.queue.by_sha(sha)
            if previous is not None and previous.state in ACTIVE:
                return previous  # already queued (e.g. submitted through the API)
            if previous is not None and previous.state == "done":
                if self.cfg.inbox.after == "move":
                    move_to(path, self.inbox_dir, DONE)
                return previous
            job_id = self.queue.enqueue("document", path.name, "inbox", str(path), sha)
            log.info("job %d: queued %s", job_id, path.name)
            self._wake.set()
            return self.queue.get(job_id)

    def submit(self, filename: str, data: bytes) -> Job:
        """A document posted to the API: written into the inbox atomically, then taken."""
        name = filename.strip()
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            raise SealError(f"bad file name {filename!r}: a plain name such as notes.md, no folders")
        self.inbox_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.inbox_dir, prefix=".upload-", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        target = self.inbox_dir / name
        i = 1
        while target.exists():
            target = self.inbox_dir / f"{Path(name).stem}.{i}{Path(name).suffix}"
            i += 1
        os.replace(tmp, target)
        job = self.take(target)
        if job is None:
            raise SealError(f"{name}: not taken (hidden or temporary file name)")
        return job

    def queue_task(self, name: str, source: str) -> int:
        job_id = self.queue.enqueue("task", name, source)
        log.info("job %d: task %s queued (%s)", job_id, name, source)
        self._wake.set()
        return job_id

    # -- the worker ----------------------------------------------------------
    def _work(self) -> None:
        last_wakeup = time.monotonic()
        while not self._stop.is_set():
            job = self.queue.claim()
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                if self.scheduler is not None and time.monotonic() - last_wakeup > 10:
                    # see schedules paused or resumed from the command line (they edit the store)
                    self.scheduler.wakeup()
                    last_wakeup = time.monotonic()
                continue
            self.current_job = job.id
            try:
                self._run_job(job)
            except Exception as e:  # any failure of one job: retried, then failed
                state = self.queue.retry_or_fail(job, f"{type(e).__name__}: {e}")
                log.exception("job %d: failed (%s)", job.id, "will retry" if state == "queued" else "giving up")
            finally:
                self.current_job = None

    def _run_job(self, job: Job) -> None:
        if job.kind == "task":
            # A ReSTEM refresh holds the CPU for long: with restem.on_document = "yield"
            # it ends its sampling early once a document is waiting.
            result = self.agent.run_task(job.name, should_stop=lambda: self.cfg.restem.on_document == "yield"
                                         and self.queue.waiting("document") > 0)
            self.queue.finish(job.id, "done", result=result)
            log.info("job %d: task %s done", job.id, job.name)
            return
        path = Path(job.path or "")
        if not path.exists():
            self.queue.finish(job.id, "failed", error=f"{path} disappeared before it was learned")
            return
        log.info("job %d: learning %s", job.id, path.name)
        try:
            report = self.agent.learn(path)
        except (DocumentError, UnicodeDecodeError) as e:
            dest = move_to(path, self.inbox_dir, REJECTED, str(e))
            self.queue.finish(job.id, "rejected", error=str(e), result={"moved_to": str(dest)})
            log.warning("job %d: rejected %s: %s", job.id, path.name, e)
            return
        summary = report.as_dict()
        summary.pop("passage_reports", None)
        if self.cfg.inbox.after == "move" and path.parent == self.inbox_dir:
            summary["moved_to"] = str(move_to(path, self.inbox_dir, DONE))
        self.queue.finish(job.id, "done", result=summary, document_id=report.document_id)
        live = self.agent.live
        if live.version != self.served.current()[1]:
            self.served.swap(copy.deepcopy(live.model), live.version)
        log.info("job %d: %s: %s; live version %d", job.id, path.name, summary["status"], live.version)

    # -- status --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return status(self.agent, self.queue, self.cfg, pid=os.getpid(), current_job=self.current_job)


def status(agent: SealAgent, queue: JobQueue, cfg: Config, pid: int | None, current_job: int | None = None,
           ) -> dict[str, Any]:
    state = agent.state
    live = state.live_version()
    row = state.version(live) if live is not None else None
    decisions = []
    for e in agent.events(200):
        if e["kind"] in ("learn.accepted", "learn.rejected", "rollback", "restem.round", "policy.rollback"):
            f = (e["data"] or {}).get("forgetting") or {}
            decisions.append({"ts": e["ts"], "kind": e["kind"], "version": e["version"], "message": e["message"],
                              "forgetting": {k: f.get(k) for k in ("replay_n", "before", "after", "decision")}
                              if f else None})
    bank = replay_counts(state)
    last_round = rounds(agent, 1)
    try:
        next_runs = schedule_rows(cfg.state_dir)
    except Exception:  # noqa: BLE001 - status must work without the scheduler store
        next_runs = []
    return {
        "pid": pid,
        "running": pid is not None,
        "live_version": live,
        "live_since": row.created_at if row else None,
        "queue": queue.counts(),
        "current_job": current_job,
        "decisions": decisions[-cfg.daemon.status_decisions:],
        "replay_bank": {"qas": bank["qas"], "documents": bank["documents"]},
        "policy": {"name": cfg.policy.active, "version": agent.policy_versions.active(),
                   "last_round": last_round[0] if last_round else None},
        "schedules": next_runs,
    }
