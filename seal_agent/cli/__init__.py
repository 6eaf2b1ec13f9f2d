"""`seal-agent`: a thin click layer over SealAgent. Each subcommand is one verb.

Global options (--config, --state-dir, --set, -v) work before or after the
subcommand. `--json` prints one JSON object per line. User mistakes end in a
one-line error (exit 1 or 2), never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import Config, load_config
from ..errors import SealError

err = Console(stderr=True)
out = Console()


# -- global options ------------------------------------------------------

def _remember(name: str):
    def callback(ctx: click.Context, _param, value):
        if value not in (None, ()):
            store = ctx.find_root().meta.setdefault("seal_globals", {})
            if name == "overrides":
                store[name] = tuple(store.get(name, ())) + tuple(value)
            elif name == "verbose":
                store[name] = store.get(name, 0) + value
            else:
                store[name] = value
        return value
    return callback


def global_options(f: Callable) -> Callable:
    """--config/--state-dir/--set/-v, accepted on the group and on every subcommand."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     expose_value=False, callback=_remember("config_path"),
                     help="Config file (default: ./config.toml)."),
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), expose_value=False,
                     callback=_remember("state_dir"),
                     help="State directory (database, adapters, models); overrides paths.state_dir."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", expose_value=False,
                     callback=_remember("overrides"),
                     help="Override a config value by dotted path, e.g. --set train.epochs=5 (repeatable)."),
        click.option("-v", "--verbose", count=True, expose_value=False, callback=_remember("verbose"),
                     help="More log output (-v info, -vv debug)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(ctx: click.Context) -> Config:
    g = ctx.find_root().meta.get("seal_globals", {})
    level = {0: logging.WARNING, 1: logging.INFO}.get(g.get("verbose", 0), logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries(level)
    return load_config(g.get("config_path"), g.get("overrides", ()), g.get("state_dir"))


def _quiet_libraries(level: int) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if level > logging.INFO:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def _agent(ctx: click.Context):
    from ..agent import SealAgent

    root = ctx.find_root()
    verb = ctx.command_path[len(root.command_path):].strip()
    agent = SealAgent(_config(ctx), role=f"`seal-agent {verb}`")
    ctx.call_on_close(agent.close)
    return agent


def handle_errors(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except SealError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
    return wrapper


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, default=str))


# -- the group -----------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@global_options
def main() -> None:
    """seal-agent: a continual-learning LLM daemon (SEAL).

    Learns documents into the model's weights by writing its own training data
    (self-edits), keeps every update in a reversible adapter log, and answers
    questions with the continually updated model.
    """


# -- learn ---------------------------------------------------------------

class _LearnProgress:
    """Renders learner progress events as a rich progress bar on stderr."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.doc_task = None
        self.step_task = None

    def __call__(self, stage: str, info: dict[str, Any]) -> None:
        p = self.p
        if stage == "document":
            self.doc_task = p.add_task(f"{info['title'][:40]}", total=info["passages"])
        elif stage == "passage":
            p.update(self.doc_task, description=f"passage {info['index'] + 1}/{info['total']}")
        elif stage in ("self-edit", "questions", "qa-before", "replay", "qa-after", "commit"):
            indices = info.get("indices", [info["index"]])
            which = f"passage {indices[0] + 1}" if len(indices) == 1 else \
                f"passages {', '.join(str(i + 1) for i in indices)}"
            p.update(self.doc_task, description=f"{which}: {stage}")
        elif stage == "train":
            if self.step_task is not None:
                p.remove_task(self.step_task)
            attempt = f" (attempt {info['attempt']}, with rehearsal)" if info.get("attempt", 1) > 1 else ""
            p.update(self.doc_task, description=f"passage {info['index'] + 1}: training on "
                                                f"{info['examples']} sequences{attempt}")
            compiling = " (compiling first: once per process)" if info.get("compiles") else ""
            self.step_task = p.add_task(f"  inner loop{compiling}", total=None)
        elif stage == "step":
            p.update(self.step_task, total=info["total"], completed=info["step"],
                     description=f"  inner loop, loss {info['loss']:.3f}")
        elif stage in ("learned", "duplicate", "failed", "rejected"):
            if self.step_task is not None:
                p.remove_task(self.step_task)
                self.step_task = None
            p.advance(self.doc_task)


def _print_learn(report: dict[str, Any]) -> None:
    qa = report.get("qa")
    parts = [
        f"[bold]{report['document']}[/bold] ({report['title']}): "
        f"{report['learned']} learned, {report['duplicates']} already known, {report['failed']} failed, "
        f"{report['rejected']} rejected for forgetting of {report['passages']} passage(s); "
        f"live version {report['version']}",
        f"  self-edits: {report['self_edit']['items']} items, {report['self_edit']['chars']} chars; "
        f"training {report['train_seconds']:.1f}s; total {report['seconds']:.1f}s",
    ]
    if qa:
        after = "n/a" if qa["after"] is None else f"{qa['after']:.1%}"
        parts.append(f"  questions ({qa['n']}, no passage in context): before {qa['before']:.1%} -> after {after}")
    f = report.get("forgetting")
    if f and f["replay_n"]:
        parts.append(
            f"  forgetting check: {f['replay_n']} replay questions, accuracy {f['before']:.1%} -> {f['after']:.1%}, "
            f"{len(f['flipped'])} forgotten; {f['attempts']} training attempt(s); {f['decision']}")
    for p in report["passage_reports"]:
        gen = p.get("qa_generated")
        if gen is not None:
            parts.append(f"  passage {p['index'] + 1}: wrote {gen['generated']} questions, {gen['grounded']} grounded "
                         f"in the passage, {gen['kept']} kept"
                         + ("" if p["checked"] else " [yellow](unchecked: no usable questions)[/yellow]"))
        if p["status"] == "rejected-forgetting":
            parts.append(f"  passage {p['index'] + 1}: [red]rejected[/red]: {p['error']}")
        if p["status"] == "duplicate":
            parts.append(f"  passage {p['index'] + 1}: already learned in version {p['duplicate_of']} (skipped)")
        elif p["status"] == "failed":
            parts.append(f"  passage {p['index'] + 1}: [red]failed[/red]: {p['error']}")
    out.print("\n".join(parts), highlight=False)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--max-passages", type=click.IntRange(min=1), default=None,
              help="Learn only the first N passages of each document.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per document.")
@global_options
@click.pass_context
@handle_errors
def learn(ctx: click.Context, paths: tuple[Path, ...], max_passages: int | None, as_json: bool) -> None:
    """Learn documents into the model's weights.

    Each PATH is a .txt, .md, .html, .pdf or SQuAD-style .json/.jsonl file, or
    a directory of them. Every passage gets a self-edit and a LoRA update that
    is merged into the live model as a new version. Files with questions also
    report accuracy on them before and after.
    """
    from ..agent import expand_paths

    agent = _agent(ctx)
    agent.own()  # refused at once, not per file, while another process owns the state directory
    files = expand_paths(list(paths))
    if not files:
        raise SealError("no supported documents found in " + ", ".join(map(str, paths)))
    failures = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as progress:
        for path in files:
            try:
                report = agent.learn(path, _LearnProgress(progress), max_passages).as_dict()
            except SealError as e:
                failures += 1
                if as_json:
                    emit_json({"document": str(path), "status": "error", "error": str(e)})
                else:
                    click.echo(f"error: {e}", err=True)
                continue
            failures += report["status"] == "failed"
            if as_json:
                emit_json(report)
            else:
                _print_learn(report)
    if failures:
        sys.exit(1)


# -- ask -----------------------------------------------------------------

@main.command()
@click.argument("question")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=None, help="Longest answer in tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print {question, answer, version} as JSON.")
@global_options
@click.pass_context
@handle_errors
def ask(ctx: click.Context, question: str, max_tokens: int | None, as_json: bool) -> None:
    """Ask the live model a question (no documents in context: only what it has learned)."""
    if not question.strip():
        raise SealError("the question is empty")
    result = _agent(ctx).ask(question, max_tokens)
    if as_json:
        emit_json(result)
    else:
        out.print(result["answer"], highlight=False)
        err.print(f"[dim](version {result['version']})[/dim]")


# -- history -------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version (or event).")
@click.option("--events", "events", type=click.IntRange(min=1), default=None, metavar="N",
              help="Instead: the last N events (every accepted, checked, rejected or rolled-back update).")
@global_options
@click.pass_context
@handle_errors
def history(ctx: click.Context, as_json: bool, events: int | None) -> None:
    """List the versions of the live model: which document, when, training stats."""
    if events is not None:
        rows = _agent(ctx).events(events)
        if as_json:
            for row in rows:
                emit_json(row)
            return
        table = Table(title=f"last {len(rows)} events")
        for col in ("time (UTC)", "event", "version", "message"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r["ts"][5:19].replace("T", " "), r["kind"], "" if r["version"] is None else str(r["version"]),
                          r["message"])
        out.print(table)
        return
    rows = _agent(ctx).history()
    if as_json:
        for row in rows:
            emit_json(row)
        return
    if not rows:
        out.print("no versions yet: the base model becomes version 0 when it is first loaded (learn or ask)")
        return
    table = Table(title="model versions (● = live)")
    for col in ("version", "parent", "created (UTC)", "document", "loss", "train s", "QA"):
        table.add_column(col, overflow="fold")
    for r in rows:
        qa = r["qa"]
        qa_text = f"{qa['before']:.0%}→{qa['after']:.0%}" if qa and qa.get("after") is not None else ""
        table.add_row(
            f"{r['version']}{' ●' if r['live'] else ''}", "" if r["parent"] is None else str(r["parent"]),
            r["created_at"][5:16].replace("T", " "),
            Path(r["documents"][0]).name if r["documents"] else "(base model)",
            "" if r["final_loss"] is None else f"{r['final_loss']:.3f}",
            "" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}", qa_text,
        )
    out.print(table)


# -- rollback ------------------------------------------------------------

@main.command()
@click.argument("version", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@global_options
@click.pass_context
@handle_errors
def rollback(ctx: click.Context, version: int, as_json: bool) -> None:
    """Make VERSION the live model again, exactly (checked against its recorded fingerprints).

    Later versions stay in the log; learning continues from VERSION.
    """
    agent = _agent(ctx)
    agent.own()
    result = agent.rollback(version)
    if as_json:
        emit_json(result)
        return
    v = result["verified"]
    out.print(
        f"live version {result['from']} -> {result['version']} "
        f"(weights {'identical' if v['weights'] else 'DIFFER'}, probe logits {'identical' if v['logits'] else 'differ'})",
        highlight=False,
    )


# -- ReSTEM and policy versions -----------------------------------------------

class _RestemProgress:
    def __init__(self):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
        self.task = None

    def __call__(self, stage: str, info: dict[str, Any]) -> None:
        if self.task is None:
            self.task = self.bar.add_task("ReSTEM", total=info.get("total", 1))
        if stage == "context":
            self.bar.update(self.task, description=f"sample+reward {info['index'] + 1}/{info['total']}: "
                                                   f"{info['title'][:30]}")
        elif stage == "rewarded":
            self.bar.advance(self.task)
            logging.getLogger("seal_agent.restem").info("context %d rewards %s", info["index"], info["rewards"])
        elif stage == "sft":
            self.bar.update(self.task, description=f"SFT on {info['pairs']} winners")
        elif stage == "heldout":
            self.bar.update(self.task, description=f"held-out test on {info['contexts']} contexts")


@main.command("restem")
@click.option("--contexts", type=int, default=None, help="Training contexts this round (default: restem.contexts).")
@click.option("--samples", type=int, default=None, help="Self-edits sampled per context (default: restem.samples).")
@click.option("--seeds", type=int, default=None, help="Inner-loop seeds per self-edit (default: restem.seeds).")
@click.option("--data", "data", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="SQuAD-style file whose passages are contexts too (repeatable; default: restem.data).")
@click.option("--json", "as_json", is_flag=True, help="Print the round's record as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def restem_cmd(ctx: click.Context, contexts: int | None, samples: int | None, seeds: int | None,
               data: tuple[Path, ...], as_json: bool) -> None:
    """Run one ReSTEM refresh of the self-edit policy now and print its record."""
    agent = _agent(ctx)
    agent.own()
    progress = _RestemProgress()
    with progress.bar:
        record = agent.restem(contexts=contexts, samples=samples, seeds=seeds, data=list(data),
                              progress=progress)
    if as_json:
        emit_json(record)
        return
    rewards = [r["reward"] for r in record["rewards"] if r["reward"] is not None]
    lines = [f"ReSTEM round {record['round']} ({record['policy']}, reward {record['reward_kind']}): "
             f"{len(record['contexts'])} contexts x {record['samples_per_context']} samples, "
             f"{len(record['winners'])} winners",
             f"  mean reward {sum(rewards) / len(rewards):+.3f}" if rewards else "  no rewards"]
    if record.get("stopped_early"):
        lines.append(f"  {record['stopped_early']}")
    if record["sft"]:
        lines.append(f"  SFT: {record['sft']['pairs']} pairs, final loss {record['sft']['final_loss']}")
    if record["heldout"]:
        h = record["heldout"]
        lines.append(f"  held-out ({len(h['contexts'])} contexts): current policy {h['old']:+.3f}, "
                     f"new {h['new']:+.3f}")
    lines.append(f"  decision: {record['decision']} ({record['reason']}); policy version {record['policy_version']}")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in record["stage_seconds"].items())
    lines.append(f"  {record['seconds']:.0f}s ({stages})")
    out.print("\n".join(lines), highlight=False)


@main.group()
def policy() -> None:
    """Versions of the self-edit policy that ReSTEM trains: list, show, rollback."""


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version.")
@global_options
@click.pass_context
@handle_errors
def policy_list(ctx: click.Context, as_json: bool) -> None:
    """The active policy's versions (0 = its prompt alone); * marks the promoted one."""
    agent = _agent(ctx)
    rows = agent.policy_versions.rows()
    if as_json:
        for r in rows:
            emit_json(r)
        return
    table = Table(title=f"policy {agent.policy.name}")
    for col in ("", "version", "parent", "created", "round", "winners", "held-out old -> new"):
        table.add_column(col)
    for r in rows:
        held = "" if r["heldout_old"] is None else f"{r['heldout_old']:+.3f} -> {r['heldout_new']:+.3f}"
        table.add_row("*" if r["active"] else "", str(r["version"]), str(r["parent"] if r["parent"] is not None else ""),
                      r["created_at"] or "", str(r["round"] or ""), str(r["winners"] or ""), held)
    out.print(table)


@policy.command("show")
@click.argument("version", type=int)
@global_options
@click.pass_context
@handle_errors
def policy_show(ctx: click.Context, version: int) -> None:
    """A policy version's manifest (its round, winners, held-out result) as JSON."""
    emit_json(_agent(ctx).policy_versions.manifest(version))


@policy.command("rollback")
@click.argument("version", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@global_options
@click.pass_context
@handle_errors
def policy_rollback(ctx: click.Context, version: int, as_json: bool) -> None:
    """Make policy VERSION the one that writes self-edits (0 = the prompt alone)."""
    result = _agent(ctx).policy_rollback(version)
    if as_json:
        emit_json(result)
    else:
        out.print(f"policy {result['policy']}: version {result['from']} -> {result['version']}", highlight=False)


# -- replay --------------------------------------------------------------

@main.group()
def replay() -> None:
    """The replay QA bank: questions about everything learned, used to catch forgetting."""


@replay.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def replay_stats(ctx: click.Context, as_json: bool) -> None:
    """Size of the bank: QAs, documents, passages, sources, index."""
    s = _agent(ctx).replay_stats()
    if as_json:
        emit_json(s)
        return
    sources = ", ".join(f"{n} {k}" for k, n in sorted(s["by_source"].items())) or "none"
    out.print(f"{s['qas']} QAs ({sources}) from {s['passages']} passages of {s['documents']} documents; "
              f"{s['active_qas']} on the live line (version {s['live_version']}); "
              f"index: {s['index_vectors']} vectors, {s['embedder']} ({s['dim']}-dim), {s['index_path']}",
              highlight=False)


@replay.command("search")
@click.argument("text")
@click.option("-k", "k", type=click.IntRange(min=1), default=8, show_default=True, help="How many QAs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per QA.")
@global_options
@click.pass_context
@handle_errors
def replay_search(ctx: click.Context, text: str, k: int, as_json: bool) -> None:
    """The k QAs nearest to TEXT (cosine similarity of sentence embeddings)."""
    if not text.strip():
        raise SealError("the search text is empty")
    hits = _agent(ctx).replay_search(text, k)
    if as_json:
        for h in hits:
            emit_json(h)
        return
    if not hits:
        out.print("the replay bank is empty: learn a document first")
        return
    table = Table(title=f"nearest QAs to {text[:40]!r}")
    for col in ("score", "question", "answer", "source", "version"):
        table.add_column(col, overflow="fold")
    for h in hits:
        table.add_row(f"{h['score']:.3f}", h["question"], h["answer"], h["source"], str(h["version"]))
    out.print(table)


@replay.command("check")
@click.option("--sample", type=click.IntRange(min=1), default=None, help="Ask only N random QAs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def replay_check(ctx: click.Context, sample: int | None, as_json: bool) -> None:
    """Ask the live model the bank's questions; accuracy overall and per document."""
    r = _agent(ctx).replay_check(sample)
    if as_json:
        emit_json(r)
        return
    if not r["n"]:
        out.print("the replay bank has no questions on the live line")
        return
    table = Table(title=f"version {r['version']}: {r['accuracy']:.1%} of {r['n']} replay questions")
    for col in ("document", "questions", "accuracy"):
        table.add_column(col, overflow="fold")
    for d in r["documents"]:
        table.add_row(Path(d["document"]).name if d["document"] else "?", str(d["n"]), f"{d['accuracy']:.1%}")
    out.print(table)


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


@main.command("run")
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
    cfg = _config(ctx)
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Live version, job queue, last decisions, replay bank, schedules (daemon running or not)."""
    from ..memory.lock import running_pid
    from ..service.daemon import status as daemon_status
    from ..service.queue import JobQueue

    agent = _agent(ctx)
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


@main.group()
def schedule() -> None:
    """The daemon's scheduled tasks (replay_check, consolidate, restem): list, run now, pause, resume."""


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per schedule.")
@global_options
@click.pass_context
@handle_errors
def schedule_list(ctx: click.Context, as_json: bool) -> None:
    """Schedules as persisted by the daemon, with their next runs."""
    from ..service.daemon import schedule_rows

    rows = schedule_rows(_config(ctx).state_dir)
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
    agent = _agent(ctx)
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
    from ..service.daemon import set_paused

    r = set_paused(_config(ctx).state_dir, name, paused)
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


# -- eval ----------------------------------------------------------------

DEFAULT_EVAL_DATA = "../shared/data/squad/eval_dev.json"


@main.group(name="eval")
def eval_group() -> None:
    """Measure how well the model learns (the SEAL paper's Table 2 ladder)."""


def _eval_options(f: Callable) -> Callable:
    options = [
        click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help=f"SQuAD-style JSON/JSONL (default: {DEFAULT_EVAL_DATA} next to config.toml)."),
        click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Use the first N passages."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for self-edit sampling and training (same seed, same result)."),
        click.option("--from-version", type=int, default=0, show_default=True,
                     help="Model version every update starts from (0 = the base model)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Directory for answers.jsonl, results.json, chart.png (default: STATE/eval/KIND-TIME)."),
        click.option("--policy-version", type=int, default=None,
                     help="Policy adapter that writes the self condition's self-edits "
                          "(default: the promoted one; 0 = the prompt alone)."),
        click.option("--policy-adapter", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
                     help="Or any policy adapter directory, e.g. a candidate ReSTEM did not promote."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per condition."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _eval_passages(cfg: Config, data: Path | None, n: int | None) -> tuple[Path, list]:
    """The first n passages with questions of a SQuAD-style file (default: the dev set)."""
    from ..documents import read_qa_passages
    from ..evaluation.ladder import passage_subset

    data = data or (cfg.root / DEFAULT_EVAL_DATA)
    passages = [p for p in passage_subset(read_qa_passages(data, "evaluation"), n) if p.questions]
    if not passages:
        raise SealError(f"{data}: no passages with questions")
    return data, passages


def _run_eval(ctx: click.Context, kind: str, data: Path | None, n: int | None, conditions: str, seed: int,
              from_version: int, out_dir: Path | None, as_json: bool, policy_version: int | None,
              policy_adapter: Path | None) -> None:
    from datetime import datetime

    from ..evaluation.ladder import parse_conditions, run_eval, write_outputs
    from ..qa.grading import Judge

    agent = _agent(ctx)
    cfg = agent.cfg
    data, passages = _eval_passages(cfg, data, n)
    conds = parse_conditions(conditions, passages, cpt=kind == "cpt")
    judge = Judge(cfg.judge) if cfg.judge.base_url else None
    if policy_adapter is not None and policy_version is not None:
        raise SealError("give --policy-version or --policy-adapter, not both")
    policy_version = agent.policy_versions.active() if policy_version is None else policy_version
    adapter = policy_adapter or agent.policy_versions.adapter_dir(policy_version)
    policy_label = str(policy_adapter) if policy_adapter else agent.policy_versions.label(policy_version)
    model, tokenizer = agent.model_at(from_version)
    total = len(passages) * len(conds) if kind == "squad" else len(conds)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(f"eval {kind}", total=total)

        def on(stage: str, info: dict[str, Any]) -> None:
            if stage == "passage":
                progress.update(task, description=f"passage {info['index'] + 1}/{info['total']}: {info['title'][:30]}")
            elif stage == "condition-start":
                progress.update(task, description=f"{info['condition']} ({len(passages)} passages)")
            elif stage == "condition":
                progress.advance(task)
                logging.getLogger("seal_agent.eval").info("%s: %d/%d", info["condition"], info["correct"], info["n"])

        t0 = datetime.now()
        run = run_eval(kind, cfg, model, tokenizer, agent.policy, passages, conds, judge=judge, seed=seed,
                       progress=on, policy_adapter=adapter)
    out_dir = out_dir or cfg.state_dir / "state" / "eval" / f"{kind}-{t0:%Y%m%d-%H%M%S}"
    meta = {
        "data": str(data), "passages": len(passages), "seed": seed, "from_version": from_version,
        "policy": policy_label, "model": cfg.model.base, "started": t0.isoformat(timespec="seconds"),
        "title": f"seal-agent eval {kind}: {len(passages)} passages of {data.name}, {cfg.model.base}",
    }
    files = write_outputs(run, out_dir, meta)
    if as_json:
        for row in run.rows():
            emit_json(row)
        return
    table = Table(title=f"eval {kind}: {len(passages)} passages of {data.name} (no passage in context)")
    for col in ("condition", "accuracy", "95% CI", "questions", "seconds") + (("judge",) if judge else ()):
        table.add_column(col)
    for r in run.rows():
        cells = [r["condition"], f"{r['accuracy']:.1%}", f"{r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}", str(r["n"]),
                 f"{r['seconds']:.0f}"]
        if judge:
            cells.append(f"{r.get('judge_accuracy', 0):.1%}")
        table.add_row(*cells)
    out.print(table)
    out.print(f"answers: {files['answers']}\nchart:   {files['chart']}", highlight=False)


@eval_group.command("squad")
@click.option("--conditions", default="base,passage,self,external:gpt-4.1,in-context", show_default=True,
              help="Comma-separated: base, passage, self, external:<name>, in-context.")
@_eval_options
@global_options
@click.pass_context
@handle_errors
def eval_squad(ctx, data, n, seed, from_version, out, policy_version, policy_adapter, as_json, conditions) -> None:
    """Single-passage setting: each passage learned independently from the same model."""
    _run_eval(ctx, "squad", data, n, conditions, seed, from_version, out, as_json, policy_version, policy_adapter)


@eval_group.command("cpt")
@click.option("--conditions", default="base,passage,self,external:gpt-4.1", show_default=True,
              help="Comma-separated: base, passage, self, external:<name>.")
@_eval_options
@global_options
@click.pass_context
@handle_errors
def eval_cpt(ctx, data, n, seed, from_version, out, policy_version, policy_adapter, as_json, conditions) -> None:
    """Continued-pretraining setting: one update on N passages together, then all their questions."""
    _run_eval(ctx, "cpt", data, n, conditions, seed, from_version, out, as_json, policy_version, policy_adapter)


@eval_group.command("continual")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"SQuAD-style JSON/JSONL (default: {DEFAULT_EVAL_DATA} next to config.toml).")
@click.option("--n", "n", type=click.IntRange(min=2), default=8, show_default=True,
              help="Learn the first N passages one after another.")
@click.option("--gate", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="off: updates are checked and reported but always merged (the paper's setting).")
@click.option("--self-edits", "self_edits", default="self", show_default=True,
              help="'self' (the active policy writes them) or external:<name> from the data file.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for continual.json, heatmap.png and the run's state "
                   "(default: STATE/eval/continual-TIME).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def eval_continual(ctx, data, n, gate, self_edits, out, as_json) -> None:
    """Retention: learn N passages in sequence, after each step ask the questions of all learned so far.

    Prints the lower-triangular accuracy matrix of the paper's continual
    experiment (row: after step i; column: passage j) and writes a heatmap.
    Runs in a fresh state directory: the live model is not touched.
    """
    from datetime import datetime

    from ..evaluation.continual import heatmap, run_continual

    cfg = _config(ctx)
    data, passages = _eval_passages(cfg, data, n)
    passages = passages[:n]
    external = None
    if self_edits != "self":
        if not self_edits.startswith("external:"):
            raise SealError(f"--self-edits must be 'self' or external:<name>, got '{self_edits}'")
        external = self_edits.removeprefix("external:")
        missing = [i for i, p in enumerate(passages) if not p.external_self_edits.get(external)]
        if missing:
            raise SealError(f"passage(s) {missing[:5]} of {data} carry no external self-edit '{external}'")
    out_dir = out or cfg.state_dir / "state" / "eval" / f"continual-{datetime.now():%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = out_dir / f"state-gate-{gate}"
    if state_dir.exists() and any(state_dir.iterdir()):
        raise SealError(f"{state_dir} already holds a run; choose another --out")
    # the base conversion is shared with the configured state directory
    from ..model.loader import resolve_base

    resolve_base(cfg)

    def on(stage: str, info: dict[str, Any]) -> None:
        if stage == "learn":
            err.print(f"[dim]step {info['step']}/{info['n']}: learning {info['title']}[/dim]")
        elif stage == "row":
            err.print(f"[dim]  {info['status']}; accuracy by passage: "
                      + " ".join("-" if x is None else f"{x:.2f}" for x in info["row"]) + "[/dim]")

    result = run_continual(cfg, passages, gate=gate == "on", state_dir=state_dir, external=external, progress=on)
    result["data"] = str(data)
    (out_dir / f"continual-gate-{gate}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    chart = out_dir / f"heatmap-gate-{gate}.png"
    heatmap(result, chart, f"seal-agent eval continual: {n} passages, gate {gate}, self-edits {result['self_edits']}")
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"accuracy after each step (gate {gate}; rows: after learning passage i)")
    table.add_column("")
    for j in range(len(passages)):
        table.add_column(f"P{j + 1}")
    for i, row in enumerate(result["matrix"]):
        label = "base" if i == 0 else f"after {i}" + ("" if result["steps"][i - 1]["status"] == "learned" else " ✗")
        cells = ["" if x is None or (i and j >= i) else f"{x:.2f}" for j, x in enumerate(row)]
        table.add_row(label, *cells + [""] * (len(passages) - len(cells)))
    out.print(table)
    sm = result["summary"]
    out.print(f"accepted {result['accepted']}, rejected {result['rejected']}; earlier passages: "
              f"{sm.get('earlier_just_learned_mean')} just after learning -> {sm.get('earlier_final_mean')} at the end "
              f"(forgetting {sm.get('forgetting')})\nheatmap: {chart}", highlight=False)


# -- bench ---------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def bench(ctx: click.Context, as_json: bool) -> None:
    """Measure speed side by side: inner loop vs references, generation, QA, replay search, ingest, API latency.

    Takes 7-10 minutes on 2 cores. Ratios (speedup, fraction of peak) are
    measured in the same run, so they hold on a noisy machine.
    """
    from ..evaluation.bench import run_bench, summary

    agent = _agent(ctx)
    result = run_bench(agent.cfg, agent.policy, log=lambda m: err.print(f"[dim]{m}[/dim]"))
    if as_json:
        emit_json(result)
        return
    out.print(summary(result), highlight=False)


if __name__ == "__main__":
    main()
