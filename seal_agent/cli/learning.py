"""Verbs on the live model: `learn`, `ask`, `history`, `rollback`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress
from rich.table import Table

from ..errors import SealError
from .options import agent_of, global_options, handle_errors
from .output import emit_json, err, out, progress_bar

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
    if report.get("kind") == "arc":
        checked = f", {report['solved']} of {report['checked']} solved" if report["checked"] else ""
        skills = ", ".join(f"s{s:04d}" for s in report["skills"]) or "none"
        out.print(f"[bold]{report['document']}[/bold]: {report['tasks']} ARC task(s){checked}; "
                  f"skill module(s) {skills}; {report['seconds']:.1f}s", highlight=False)
        for r in report["results"]:
            _print_task(r)
        return
    qa = report.get("qa")
    parts = [
        f"[bold]{report['document']}[/bold] ({report['title']}): "
        f"{report['learned']} learned, {report['duplicates']} already known, {report['failed']} failed"
        + (f", {report['rejected']} rejected for forgetting" if report["rejected"] else "")
        + f" of {report['passages']} passage(s); "
        f"live version {report['version']}",
        f"  self-edits: {report['self_edit']['items']} items, {report['self_edit']['chars']} chars; "
        f"training {report['train_seconds']:.1f}s; total {report['seconds']:.1f}s",
    ]
    if qa:
        after = "n/a" if qa["after"] is None else f"{qa['after']:.1%}"
        parts.append(f"  questions ({qa['n']}, no passage in context): before {qa['before']:.1%} -> after {after}")
    if report.get("modules"):
        flagged = {p["flagged"] for p in report["passage_reports"] if p.get("flagged")}
        parts.append("  knowledge module(s): " + ", ".join(f"m{m:04d}" for m in report["modules"])
                     + "".join(f" [yellow](flagged: {why})[/yellow]" for why in sorted(flagged)))
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


@click.command()
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
    report accuracy on them before and after. An ARC task file (.json, docs/arc.md)
    is solved instead, and each task's trained adapter kept as a skill module.
    """
    from ..agent import expand_paths

    agent = agent_of(ctx)
    agent.own()  # refused at once, not per file, while another process owns the state directory
    files = expand_paths(list(paths))
    if not files:
        raise SealError("no supported documents found in " + ", ".join(map(str, paths)))
    failures = 0
    with progress_bar() as progress:
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

@click.command()
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
    result = agent_of(ctx).ask(question, max_tokens)
    if as_json:
        emit_json(result)
    else:
        out.print(result["answer"], highlight=False)
        used = ", ".join(f"module m{m['module']:04d} ({m['title']}, similarity {m['score']:.2f})"
                         for m in result["modules"]) or "no module"
        err.print(f"[dim](version {result['version']}, {used})[/dim]", highlight=False)


# -- history -------------------------------------------------------------

@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version (or event).")
@click.option("--events", "events", type=click.IntRange(min=1), default=None, metavar="N",
              help="Instead: the last N events (every accepted, checked, rejected or rolled-back update).")
@global_options
@click.pass_context
@handle_errors
def history(ctx: click.Context, as_json: bool, events: int | None) -> None:
    """List the versions of the live model: which document, when, training stats."""
    if events is not None:
        rows = agent_of(ctx).events(events)
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
    rows = agent_of(ctx).history()
    if as_json:
        for row in rows:
            emit_json(row)
        return
    if not rows:
        out.print("no versions yet: the base model becomes version 0 when it is first loaded (learn or ask)")
        return
    table = Table(title="model versions (● = live; kind: base, merge or consolidation change the weights, "
                        "a module adds to the routing table; ⚑ flagged)")
    for col in ("version", "parent", "kind", "created (UTC)", "document", "loss", "train s", "QA"):
        table.add_column(col, overflow="fold")
    for r in rows:
        qa = r["qa"]
        qa_text = f"{qa['before']:.0%}→{qa['after']:.0%}" if qa and qa.get("after") is not None else ""
        kind = r["kind"] + (f" m{r['module']:04d}" if r["module"] is not None else "") + (" ⚑" if r["flagged"] else "")
        if r["routed"]:
            kind += f" ({r['routed']} routed)"
        if r["kind"] == "consolidation":
            document = f"({len(r['absorbed'])} modules absorbed)"
        else:
            document = Path(r["documents"][0]).name if r["documents"] else "(base model)"
        table.add_row(
            f"{r['version']}{' ●' if r['live'] else ''}", "" if r["parent"] is None else str(r["parent"]),
            kind, r["created_at"][5:16].replace("T", " "), document,
            "" if r["final_loss"] is None else f"{r['final_loss']:.3f}",
            "" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}", qa_text,
        )
    out.print(table)


# -- consolidate ---------------------------------------------------------

@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@global_options
@click.pass_context
@handle_errors
def consolidate(ctx: click.Context, as_json: bool) -> None:
    """Fold the routed knowledge modules into new consolidated weights (memory.mode = "modules").

    A document whose questions the new weights answer as well as its module is
    absorbed (its module leaves the routing table); the rest keep their modules.
    Not made live if it would lose answers the weights knew (memory.max_forgetting).
    """
    def progress(stage: str, info: dict[str, Any]) -> None:
        if stage == "consolidate-train":
            err.print(f"[dim]training new weights on {info['examples']} sequences[/dim]")
        elif stage == "consolidate-check":
            err.print(f"[dim]checking {info['modules']} module(s) against the new weights[/dim]")

    result = agent_of(ctx).consolidate(progress=progress)
    if as_json:
        emit_json(result)
        return
    if result["decision"] != "consolidated":
        out.print(f"{result['decision']}: {result['reason']} (live version {result['version']})", highlight=False)
        return
    out.print(f"version {result['version']}: {len(result['absorbed'])} of {result['modules']} modules absorbed, "
              f"{len(result['kept'])} kept" + (f" ({len(result['retrained'])} retrained on the new weights)"
                                                 if result.get("retrained") else "") +
              f"; documents held before: {result['held_accuracy_before']} -> "
              f"{result['held_accuracy_after']} ({result['seconds']} s)", highlight=False)


# -- rollback ------------------------------------------------------------

@click.command()
@click.argument("version", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@global_options
@click.pass_context
@handle_errors
def rollback(ctx: click.Context, version: int, as_json: bool) -> None:
    """Make VERSION the live model again, exactly (checked against its recorded fingerprints).

    Later versions stay in the log; learning continues from VERSION.
    """
    agent = agent_of(ctx)
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


# -- solve (ARC) ---------------------------------------------------------------

@click.command()
@click.argument("tasks", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--solutions", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The ARC Prize solutions file for TASKS: each answer is checked against it.")
@click.option("--recipe", default=None, metavar="JSON",
              help="Train every task by this recipe (docs/arc.md) instead of the one the model writes.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per task.")
@global_options
@click.pass_context
@handle_errors
def solve(ctx: click.Context, tasks: Path, solutions: Path | None, recipe: str | None, as_json: bool) -> None:
    """Solve ARC tasks: the model writes a training recipe (JSON), is trained on the
    demonstrations as it says, and answers each test input with a grid.

    TASKS: one task in ARC's layout ({"train": [...], "test": [...]}) or an ARC Prize
    challenges file ({id: task}). Nothing is learned for good: the live model is
    exactly as it was afterwards.
    """
    for r in agent_of(ctx).solve(tasks, solutions, recipe=recipe):
        if as_json:
            emit_json(r)
            continue
        _print_task(r)


def _print_task(r: dict[str, Any]) -> None:
    if "refused" in r:
        err.print(f"{r['task']}: refused: {r['refused']}", highlight=False)
        return
    edit = r["self_edit"]
    if r["trained"]:
        how = (f"trained on {r['train']['sequences']} sequences ({edit['recipe']['epochs']} epochs, "
               f"lr {edit['recipe']['lr']})")
    elif edit and edit["recipe"]:
        how = f"not trained: all {r['train']['left_out_too_long']} sequences over train.max_length"
    else:
        how = f"not trained: {edit['refused'] if edit else 'no recipe'}"
    verdicts = ", ".join(v["reason"] for v in r["verdicts"]) if r["verdicts"] else "no solution to check"
    out.print(f"{r['task']}: {how}; {verdicts} ({r['seconds']} s)", highlight=False)
    for answer in r["answers"]:
        out.print(answer, highlight=False)
