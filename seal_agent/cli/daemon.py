"""Verbs of the service: `run` (the daemon), `status`, `schedule list/run/pause/resume`."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import SealError
from .options import agent_of, config_of, global_options, handle_errors
from .output import emit_json, err, out

# -- the daemon ----------------------------------------------------------

def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after shutting down, which would kill
        the process before the daemon stops cleanly; handled here instead."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == __import__("signal").SIGINT:
                self.force_exit = True
            self.should_exit = True

    return Server


@click.command("run")
@click.option("--inbox", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Watched folder (default: inbox.dir, relative to the state directory).")
@click.option("--host", default=None, help="API bind address (default api.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="API port (default api.port, 8765).")
@global_options
@click.pass_context
@handle_errors
def run_daemon(ctx: click.Context, inbox: Path | None, host: str | None, port: int | None) -> None:
    """Run the daemon: learn what arrives in the inbox, answer on an OpenAI-compatible API.

    Drop .txt/.md/.html/.pdf/SQuAD .json files into the inbox (or POST them to
    /v1/documents); each is learned once and moved to inbox/done/ (bad ones to
    inbox/rejected/ with a reason). Ask at /v1/chat/completions. Scheduled
    tasks (replay check, snapshot) run between documents. Stop with Ctrl-C or
    SIGTERM: nothing is lost, an interrupted document is retried at the next start.
    """
    import uvicorn

    from ..service.api.app import build_app
    from ..service.daemon import Daemon

    _Server = _uvicorn_server()
    cfg = config_of(ctx)
    if host is not None:
        cfg.api.host = host
    if port is not None:
        cfg.api.port = port
    daemon = Daemon(cfg, inbox.resolve() if inbox else None)
    daemon.start()
    try:
        err.print(f"seal-agent daemon (pid {__import__('os').getpid()}): live version {daemon.served.version}; "
                  f"inbox {daemon.inbox_dir}; API http://{cfg.api.host}:{cfg.api.port}/v1", highlight=False)
        server = _Server(uvicorn.Config(build_app(daemon), host=cfg.api.host, port=cfg.api.port,
                                        log_level="warning", timeout_graceful_shutdown=5))
        server.run()
    finally:
        daemon.stop()
        err.print("seal-agent daemon stopped")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Live version, job queue, last decisions, replay bank, schedules (daemon running or not)."""
    from ..memory.lock import running_pid
    from ..service.daemon import status as daemon_status
    from ..service.queue import JobQueue

    agent = agent_of(ctx)
    s = daemon_status(agent, JobQueue(agent.state), agent.cfg, pid=running_pid(agent.cfg.state_dir))
    if as_json:
        emit_json(s)
        return
    q = s["queue"]
    lines = [
        f"daemon: {'running, pid ' + str(s['pid']) if s['running'] else 'not running'}",
        f"live version: {s['live_version']} (since {s['live_since']})",
        f"jobs: {q['queued']} queued, {q['learning']} learning, {q['done']} done, {q['rejected']} rejected, "
        f"{q['failed']} failed",
        f"replay bank: {s['replay_bank']['qas']} QAs from {s['replay_bank']['documents']} documents",
        f"memory: {s['memory']['mode']}, {s['memory']['routed_modules']} modules routed "
        f"({s['memory']['modules']} learned, {len(s['memory']['flagged'])} flagged)",
        *[f"  flagged m{f['module']:04d} {f['document']}: {f['why']}" for f in s['memory']['flagged']],
        f"policy: {s['policy']['name']} (version {s['policy']['version']})" + (
            f"; last ReSTEM round {r['round']}: {r['decision']} ({r['finished_at'] or 'running'})"
            if (r := s["policy"]["last_round"]) else ""),
    ]
    for d in s["decisions"]:
        lines.append(f"  {d['ts']} {d['kind']}: {d['message']}")
    for r in s["schedules"]:
        lines.append(f"  schedule {r['name']}: {r['trigger']}, "
                     + ("paused" if r["paused"] else f"next {r['next_run']}"))
    out.print("\n".join(lines), highlight=False)


@click.group()
def schedule() -> None:
    """The daemon's scheduled tasks (replay_check, consolidate, restem): list, run now, pause, resume."""


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per schedule.")
@global_options
@click.pass_context
@handle_errors
def schedule_list(ctx: click.Context, as_json: bool) -> None:
    """Schedules as persisted by the daemon, with their next runs."""
    from ..service.schedules import schedule_rows

    rows = schedule_rows(config_of(ctx).state_dir)
    if as_json:
        for r in rows:
            emit_json(r)
        return
    if not rows:
        out.print("no schedules yet: `seal-agent run` records those of [schedule] in config.toml")
        return
    for r in rows:
        out.print(f"{r['name']}: {r['trigger']}, " + ("paused" if r["paused"] else f"next run {r['next_run']}"),
                  highlight=False)


@schedule.command("run")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@global_options
@click.pass_context
@handle_errors
def schedule_run(ctx: click.Context, name: str, as_json: bool) -> None:
    """Run a task now: queued for the running daemon, or run here if none is running."""
    from ..agent import TASKS
    from ..memory.lock import running_pid
    from ..service.queue import JobQueue

    if name not in TASKS:
        raise SealError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    agent = agent_of(ctx)
    pid = running_pid(agent.cfg.state_dir)
    if pid is not None:
        job_id = JobQueue(agent.state).enqueue("task", name, "cli")
        result = {"queued": True, "job": job_id, "daemon_pid": pid}
        text = f"queued as job {job_id} for the running daemon (pid {pid})"
    else:
        result = agent.run_task(name)
        text = {
            "replay_check": lambda r: f"version {r['version']}: {r['accuracy']} on {r['n']} replay QAs",
            "consolidate": lambda r: f"snapshot: {r['snapshot']}",
            "restem": lambda r: f"ReSTEM round {r['round']}: {r['decision']}, policy version "
                                f"{r['policy_version']} ({r['reason']})",
        }[name](result)
    if as_json:
        emit_json(result)
    else:
        out.print(text, highlight=False)


def _pause(ctx: click.Context, name: str, paused: bool) -> None:
    from ..service.schedules import set_paused

    r = set_paused(config_of(ctx).state_dir, name, paused)
    out.print(f"{r['name']}: " + ("paused" if r["paused"] else f"next run {r['next_run']}"), highlight=False)


@schedule.command("pause")
@click.argument("name")
@global_options
@click.pass_context
@handle_errors
def schedule_pause(ctx: click.Context, name: str) -> None:
    """Stop a schedule from running until resumed (survives restarts)."""
    _pause(ctx, name, True)


@schedule.command("resume")
@click.argument("name")
@global_options
@click.pass_context
@handle_errors
def schedule_resume(ctx: click.Context, name: str) -> None:
    """Resume a paused schedule from its next due time."""
    _pause(ctx, name, False)
