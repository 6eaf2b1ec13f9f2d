"""`seal-agent run`: the long-running daemon.

Threads, one job each:
  - the inbox watcher turns complete files into queued jobs (inbox.py);
  - the worker learns queued jobs one at a time with the SealAgent, then
    hands a copy of the new live weights to the API (a version switch is
    atomic, between requests);
  - the scheduler (schedules.py) queues tasks such as the replay check; they
    run on the worker like any job;
  - the main thread serves the API (uvicorn) until SIGTERM/SIGINT.
One daemon per state directory (an flock'ed lock file holding the pid). A kill
at any moment loses nothing: jobs are rows in SQLite, a version is live only
once its transaction commits, and an interrupted job is retried at start-up
(documents it left `learning` are marked `interrupted`). What the inbox and the
queue promise about files is in inbox.py; the worker keeps those promises: a
job learns the queue's copy of the bytes checked when its file was taken, then
moves the file only if it still holds them. One job's failure, or the queue's,
never stops the worker; a document that keeps failing ends in rejected/.
"""

from __future__ import annotations

import copy
import gc
import logging
import logging.handlers
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..agent import SealAgent
from ..config import ApiConfig, Config, _resolve, engine_for
from ..documents import shown
from ..errors import ConfigError, DocumentError, SealError
from ..memory.knowledge import routed_modules
from ..memory.lock import StateLock
from ..memory.replay import counts as replay_counts
from ..restem.rounds import RoundLog
from .api.guard import loopback_host
from .inbox import (
    DONE,
    REJECTED,
    Inbox,
    Refused,
    content_hash,
    free_names,
    ignored,
    move_to,
    read_entry,
    rename_noreplace,
    upload_problem,
)
from .queue import ACTIVE, Copies, Job, JobQueue
from .schedules import schedule_row, schedule_rows, schedules, start_scheduler
from .serving import NotFound, Served

log = logging.getLogger("seal_agent.daemon")


# -- the daemon ------------------------------------------------------------

def _storable(text: object) -> str:
    """`text` as SQLite can hold it: a name that is not UTF-8 (undecodable bytes) escaped."""
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return shown(text)
    return text


class _OneLine(logging.Formatter):
    """Every message on one line, whatever names or reasons it holds (a name with a
    newline must not forge a log line)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)


class Daemon:
    """The running service, and the API's `ServingBackend` (serving.py)."""

    retry_s = 5.0  # pause of the worker after the queue itself failed

    def __init__(self, cfg: Config, inbox: Path | None = None):
        if not loopback_host(cfg.api.host) and not cfg.api.token:
            raise ConfigError(f"api.host = {cfg.api.host!r} is reachable from other machines: set api.token "
                              "(every request must then carry 'Authorization: Bearer <token>')")
        self.cfg = cfg
        self.schedules = schedules(cfg.schedule)  # bad specs fail before anything starts
        self.state_dir = cfg.state_dir
        self.lock = StateLock(self.state_dir, "daemon")
        self.inbox_dir = (inbox or _resolve(self.state_dir, cfg.inbox.dir)).resolve()
        for key in ("database", "adapters", "models", "logs"):
            own = cfg.state_path(key).resolve()
            if own.is_relative_to(self.inbox_dir):
                # the inbox takes what it finds at its top level: it would reject the daemon's own folders
                raise ConfigError(f"the inbox {shown(self.inbox_dir)} holds the daemon's own {shown(own)} "
                                  "(paths." + key + "): give the inbox a folder of its own (inbox.dir or --inbox)")
        self.copies = Copies(cfg.state_path("database").parent / "queue")
        self.agent: SealAgent | None = None
        self.queue: JobQueue | None = None
        self.served: Served | None = None
        self.scheduler = None
        self.inbox: Inbox | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._intake = threading.Lock()
        self.current_job: int | None = None
        self.progress: dict[str, Any] = {}  # the current job's last stage (the learner's progress events)

    # -- start / stop --------------------------------------------------------
    def start(self) -> None:
        """Everything but the API: lock, model, queue recovery, inbox, worker, scheduler."""
        self.lock.acquire()
        try:
            self._setup_logging()
            self.agent = SealAgent(self.cfg, lock=self.lock)
            self.queue = JobQueue(self.agent.state, self.cfg.daemon.max_attempts)
            for job in self.queue.give_up_interrupted():
                log.warning("job %d: %s: %s", job.id, shown(job.name), job.error)
                if job.kind == "document":
                    self._give_up(job, job.error or "interrupted", job.error or "interrupted")
            recovered = self.queue.recover()
            for job_id in recovered:
                log.info("job %d: interrupted by a stop; queued again", job_id)
            pruned = self.copies.prune({(j.sha256, j.name) for j in self.queue.active_documents() if j.sha256})
            if pruned:
                log.info("removed %d queue copies no job needs (left by a stop)", pruned)
            live = self.agent.live
            self.served = Served.from_config(self.cfg, self._serving_weights(), live.tokenizer, live.version,
                                             knowledge=self.agent.knowledge)
            self.agent.bank  # noqa: B018 - load the embedder now, not during the first job
            self.inbox = Inbox(self.inbox_dir, self.cfg.inbox, self.take)
            self.inbox.start()
            self._worker = threading.Thread(target=self._work, name="learner", daemon=True)
            self._worker.start()
            self.scheduler = start_scheduler(self.state_dir, self.cfg.state_path("database"), self.schedules)
            _freeze_heap()
            log.info("daemon started: pid %d, live version %d, inbox %s", os.getpid(), live.version,
                     shown(self.inbox_dir))
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work; let the current step finish for up to `timeout` s (an
        abandoned job is retried at the next start)."""
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
                self._release(self.current_job)
        if self.served is not None:
            self.served.close()
        if self.agent is not None and (self._worker is None or not self._worker.is_alive()):
            self.agent.close()
        self.lock.release()

    def _setup_logging(self) -> None:
        logs = self.cfg.state_path("logs")
        logs.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(logs / "daemon.log", maxBytes=5_000_000, backupCount=3)
        handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("seal_agent")
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in logging.getLogger().handlers + root.handlers):
            stream = logging.StreamHandler()
            stream.setFormatter(_OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(stream)

    # -- intake ------------------------------------------------------------
    def take(self, path: Path, source: str = "inbox") -> Job | None:
        """A complete entry of the inbox: rejected (moved, with a reason), recognised
        (already queued, or learned), or queued with the queue's copy of its bytes.
        Any failure ends with this entry rejected: one bad file holds back no other."""
        with self._intake:
            return self._take(path, source)

    def _take(self, path: Path, source: str) -> Job | None:
        if ignored(path, self.inbox_dir) or not os.path.lexists(path):
            return None
        try:
            data = read_entry(path, self.inbox_dir, self.cfg.inbox.max_bytes)
        except Refused as e:
            return self._reject(path, str(e), source)
        except Exception as e:  # noqa: BLE001 - whatever it is, it is this entry's alone
            return self._reject(path, f"could not be read ({type(e).__name__}: {e})", source)
        try:
            return self._enqueue(path, data, source)
        except Exception as e:  # the database or the disk: still this entry's outcome alone
            log.exception("%s could not be queued", shown(path.name))
            return self._reject(path, f"could not be queued ({type(e).__name__}: {e}); drop it into the "
                                "inbox again to retry", source)

    def _enqueue(self, path: Path, data: bytes, source: str) -> Job:
        sha = content_hash(data)
        mine = self.queue.by_sha(sha, str(path))
        if mine is not None and mine.state in ACTIVE:
            return mine  # this very file, taken already (the API's upload, then the watcher)
        if mine is not None and mine.state == "done":  # learned: kept in place, or a stop came before its move
            if self.cfg.inbox.after == "move":
                self._settle(mine, DONE)
            return mine
        # Queued only once its copy is on disk: a crash in between leaves a copy that the
        # next start prunes, and the file, still in the inbox, is taken again.
        self.copies.put(sha, path.name, data)
        job_id = self.queue.enqueue("document", path.name, source, str(path), sha)
        log.info("job %d: queued %s (%s)", job_id, shown(path.name), source)
        self._wake.set()
        return self.queue.get(job_id)

    def _reject(self, path: Path, reason: str, source: str) -> Job:
        dest = move_to(path, self.inbox_dir, REJECTED, reason)
        log.warning("rejected %s: %s", shown(path.name), shown(reason))
        job_id = self.queue.record("document", _storable(path.name), source, "rejected", path=_storable(path),
                                   error=shown(reason), result={"moved_to": _storable(dest)})
        return self.queue.get(job_id)

    def submit(self, filename: str, data: bytes) -> Job:
        """A document posted to the API: its name checked before anything is written,
        then written into the inbox atomically under a name no file has, and taken."""
        name = filename.strip()
        reason = upload_problem(name)
        if reason is not None:
            raise SealError(reason)
        if len(data) > self.cfg.inbox.max_bytes:
            raise SealError(f"{len(data):,} bytes is over the limit of {self.cfg.inbox.max_bytes:,} "
                            "(inbox.max_bytes)")
        self.inbox_dir.mkdir(parents=True, exist_ok=True)
        with self._intake:  # the watcher sees the new file too: whoever takes it, it is the API's
            job = self._take(self._write_upload(name, data), "api")
        if job is None:
            raise SealError(f"{name!r}: not taken (it was removed from the inbox at once)")
        return job

    def _write_upload(self, name: str, data: bytes) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.inbox_dir, prefix=".upload-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            for candidate in free_names(name, room=0):
                target = self.inbox_dir / candidate
                try:
                    rename_noreplace(Path(tmp), target)
                    return target
                except FileExistsError:
                    continue
            raise AssertionError("unreachable: free_names never ends")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- files of jobs ---------------------------------------------------------
    def _content(self, path: Path) -> bytes | None:
        """What the inbox entry `path` holds now, read as taking it would; None if nothing learnable."""
        if path.parent != self.inbox_dir:
            return None
        try:
            return read_entry(path, self.inbox_dir, self.cfg.inbox.max_bytes)
        except (Refused, OSError):
            return None

    def _settle(self, job: Job, folder: str, reason: str | None = None) -> str | None:
        """Move the job's inbox file into `folder` if it still holds the content the job
        had: one edited since is the job of its new content, and is left for it. Never
        raises (the job's outcome is recorded whether or not its file could move)."""
        path = Path(job.path or "")
        data = self._content(path) if job.sha256 else None
        if data is None or content_hash(data) != job.sha256:
            if job.path and os.path.lexists(path):
                log.info("job %d: %s changed since it was queued; left in the inbox for the job of its new content",
                         job.id, shown(path.name))
            return None
        try:
            return _storable(move_to(path, self.inbox_dir, folder, reason))
        except OSError as e:
            log.warning("job %d: %s could not be moved to %s/: %s", job.id, shown(path.name), folder, shown(e))
            return None

    def _copy_of(self, job: Job) -> Path | None:
        """The queue's copy of the job's bytes. A job queued by a daemon that kept no
        copies (or whose copy was lost) takes its inbox file now if that still holds the
        content it was queued with; otherwise the job fails, without moving anything
        (the file's present content, if any, is a job of its own)."""
        if job.sha256 and job.path:
            kept = self.copies.path(job.sha256, job.name)
            if kept.is_file():
                return kept
            data = self._content(Path(job.path))
            if data is not None and content_hash(data) == job.sha256:
                return self.copies.put(job.sha256, job.name, data)
        error = "its file changed or disappeared before it was learned (a new content is a job of its own)"
        self.queue.finish(job.id, "failed", error=error)
        log.warning("job %d: %s: %s", job.id, shown(job.name), error)
        return None

    def _give_up(self, job: Job, error: str, why: str) -> None:
        """A document whose attempts ran out goes to rejected/ with `why`, so nothing sits
        in the inbox unexplained, to be tried again at every start."""
        moved = self._settle(job, REJECTED, f"{why}; drop it into the inbox again to retry")
        if moved is not None:
            self.queue.finish(job.id, "failed", error=error, result={"moved_to": moved})
        self.copies.drop(job.sha256, job.name)

    def _release(self, job_id: int | None) -> None:
        if job_id is None or self.queue is None:
            return
        try:
            self.queue.release(job_id)
        except Exception:  # at exit; the next start recovers it anyway
            log.exception("job %d: could not be queued again", job_id)

    # -- the worker ----------------------------------------------------------
    def _work(self) -> None:
        last_wakeup = time.monotonic()
        while not self._stop.is_set():
            try:
                if self.work_one():
                    continue
                self._wake.wait(0.5)
                self._wake.clear()
                if self.scheduler is not None and time.monotonic() - last_wakeup > 10:
                    # see schedules paused or resumed from the command line (they edit the store)
                    self.scheduler.wakeup()
                    last_wakeup = time.monotonic()
            except Exception:  # the queue itself failed (the database?): go on after a pause
                log.exception("the learner's queue failed; trying again in %g s", self.retry_s)
                self._stop.wait(self.retry_s)

    def work_one(self) -> bool:
        """Claim one queued job and run it; False when none is queued."""
        job = self.queue.claim()
        if job is None:
            return False
        self.current_job = job.id
        self.progress = {"job": job.id, "stage": "starting" if job.kind == "document" else job.name}
        try:
            self._run_job(job)
        except Exception as e:  # any failure of one job: retried, then failed
            error = shown(f"{type(e).__name__}: {e}")
            state = self.queue.retry_or_fail(job, error)
            log.exception("job %d: failed (%s)", job.id, "will retry" if state == "queued" else "giving up")
            if state == "failed" and job.kind == "document":
                self._give_up(job, error, f"failed {job.attempts} times, the last: {error}")
        finally:
            self.current_job = None
            _freeze_heap()  # what the job left for good frozen too; what it dropped (old weights) freed
        return True

    def _progress_of(self, job: Job):
        """The learner's progress events kept as the current job's stage (the page shows it)."""
        passages: dict[str, int] = {}

        def progress(stage: str, info: dict[str, Any]) -> None:
            if stage == "document":
                passages["total"] = info.get("passages", 0)
            if "index" in info:
                passages["index"] = info["index"]
            now = {"job": job.id, "stage": stage, "passages": passages.get("total")}
            if "index" in passages:
                now["passage"] = passages["index"] + 1
            if stage == "step":
                now.update(step=info.get("step"), steps=info.get("total"))
                now["stage"] = "train"
            self.progress = now

        return progress

    def _run_job(self, job: Job) -> None:
        if job.kind == "task":
            # A ReSTEM refresh or a consolidation holds the CPU for long: with
            # restem.on_document = "yield" a refresh ends its sampling early once a
            # document is waiting, and a consolidation stops, changing nothing.
            result = self.agent.run_task(job.name, should_stop=lambda: self.cfg.restem.on_document == "yield"
                                         and self.queue.waiting("document") > 0)
            self.queue.finish(job.id, "done", result=result)
            log.info("job %d: task %s done", job.id, job.name)
            return
        self._learn(job)

    def _learn(self, job: Job) -> None:
        copy_path = self._copy_of(job)
        if copy_path is None:
            return
        first = self.queue.learned(job.sha256)
        if first is not None:  # the same bytes as a job learned already (two files dropped together, say)
            result: dict[str, Any] = {"status": "duplicate", "duplicate_of": first.id}
            if self.cfg.inbox.after == "move":
                result["moved_to"] = self._settle(job, DONE)
            self.queue.finish(job.id, "done", result=result, document_id=first.document_id)
            self.copies.drop(job.sha256, job.name)
            log.info("job %d: %s holds what job %d learned; not learned again", job.id, shown(job.name), first.id)
            return
        log.info("job %d: learning %s", job.id, shown(job.name))
        try:
            report = self.agent.learn(copy_path, recorded_as=job.path, progress=self._progress_of(job))
        except DocumentError as e:  # every failure to parse the content is one (documents.py)
            moved = self._settle(job, REJECTED, str(e))
            self.queue.finish(job.id, "rejected", error=shown(e), result={"moved_to": moved})
            self.copies.drop(job.sha256, job.name)
            log.warning("job %d: rejected %s: %s", job.id, shown(job.name), shown(e))
            return
        summary = report.as_dict()
        summary.pop("passage_reports", None)
        if self.cfg.inbox.after == "move":
            summary["moved_to"] = self._settle(job, DONE)
        self.queue.finish(job.id, "done", result=summary, document_id=report.document_id)
        self.copies.drop(job.sha256, job.name)
        live = self.agent.live
        log.info("job %d: %s: %s; live version %d", job.id, shown(job.name), summary["status"], live.version)
        self._publish()

    def _publish(self) -> None:
        """The new live weights to the API. If that fails the API stays on the version it
        has until the next job; the job is learned all the same and not retried."""
        live = self.agent.live
        try:
            model, served_version = self.served.current()
            if live.version != served_version:
                state = self.agent.state
                same_weights = state.weights_lineage(live.version)[-1] == state.weights_lineage(served_version)[-1]
                # a new module changes the routing table only: the served weights stay
                self.served.swap(model if same_weights else self._serving_weights(), live.version)
        except Exception:  # the job is learned whatever happens here
            log.exception("the API could not switch to version %d; it serves the previous one", live.version)

    def _serving_weights(self):
        """What the API answers with: its own copy of the live weights (torch), or the
        agent's vLLM engine on them (engine.serve = "vllm"; the learner's batches join it)."""
        if engine_for(self.cfg, "serve") == "vllm":
            return self.agent.vllm()
        return copy.deepcopy(self.agent.live.model)

    # -- what the API reads ------------------------------------------------------
    @property
    def api(self) -> ApiConfig:
        return self.cfg.api

    def job(self, job_id: int) -> Job | None:
        return self.queue.get(job_id)

    def status(self) -> dict[str, Any]:
        return {**status(self.agent, self.queue, self.cfg, pid=os.getpid(), current_job=self.current_job),
                "progress": self.progress if self.current_job is not None else None}

    @property
    def database(self) -> Path:
        return self.cfg.state_path("database")

    def set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        """A schedule paused or resumed in the running scheduler (which keeps it in its store)."""
        if self.scheduler is None:
            raise SealError("the daemon's scheduler is not running")
        known = [j.id for j in self.scheduler.get_jobs()]
        if name not in known:
            raise NotFound(f"no schedule '{name}' (known: {', '.join(known) or 'none: see [schedule]'})")
        job = self.scheduler.pause_job(name) if paused else self.scheduler.resume_job(name)
        log.info("schedule %s %s", name, "paused" if paused else "resumed")
        return schedule_row(job)

    def check(self, document_id: int) -> Job:
        """A replay check of one document's QAs, queued behind the jobs before it."""
        if self.agent.state.document(document_id) is None:
            raise NotFound(f"no document {document_id}")
        job_id = self.queue.enqueue("task", f"replay_check:{document_id}", "api")
        self._wake.set()
        log.info("job %d: replay check of document %d queued", job_id, document_id)
        return self.queue.get(job_id)


def _freeze_heap() -> None:
    """What the daemon holds for good (models, tokenizers, the embedder) left out of
    Python's full garbage collections: walking it paused every request, the page's
    and the API's, for a large part of a second, every few dozen requests. At the
    start and after every job; unfrozen and collected first, so that what a job
    dropped (weights replaced, in a reference cycle or not) is freed."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def memory_status(agent: SealAgent, live: int | None) -> dict[str, Any]:
    """The modules routed at the live version, and those whose learning is in doubt."""
    routed = routed_modules(agent.state, live) if live is not None else []
    modules = agent.modules.of(routed)
    flagged = []
    for m in modules:
        if m.flagged:
            doc = agent.state.document(m.document_id) if m.document_id is not None else None
            flagged.append({"module": m.id, "document": doc["path"] if doc else None, "why": m.flagged})
    return {"mode": agent.cfg.memory.mode, "routed_modules": len(routed), "modules": len(agent.modules.all()),
            "flagged": flagged}


def status(agent: SealAgent, queue: JobQueue, cfg: Config, pid: int | None, current_job: int | None = None,
           ) -> dict[str, Any]:
    state = agent.state
    live = state.live_version()
    row = state.version(live) if live is not None else None
    decisions = []
    for e in agent.events(200):
        if e["kind"] in ("learn.accepted", "learn.rejected", "learn.module", "consolidate", "consolidate.refused",
                         "rollback", "restem.round", "policy.rollback", "skill"):
            f = (e["data"] or {}).get("forgetting") or {}
            decisions.append({"ts": e["ts"], "kind": e["kind"], "version": e["version"], "message": e["message"],
                              "forgetting": {k: f.get(k) for k in ("replay_n", "before", "after", "decision")}
                              if f else None})
    bank = replay_counts(state)
    last_round = RoundLog(state).recent(1)
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
        "memory": memory_status(agent, live),
        "policy": {"name": cfg.policy.active, "version": agent.policy_versions.active(),
                   "last_round": last_round[0] if last_round else None},
        "arc": {"policy": cfg.arc.policy, "version": agent.arc_versions.active(),
                "skills": agent.skills.count()},
        "schedules": next_runs,
    }
