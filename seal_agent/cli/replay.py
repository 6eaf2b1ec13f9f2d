"""Verbs on the replay QA bank: `replay stats/search/check`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..errors import SealError
from .options import agent_of, global_options, handle_errors
from .output import emit_json, out

# -- replay --------------------------------------------------------------

@click.group()
def replay() -> None:
    """The replay QA bank: questions about everything learned, used to catch forgetting."""


@replay.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def replay_stats(ctx: click.Context, as_json: bool) -> None:
    """Size of the bank: QAs, documents, passages, sources, index."""
    s = agent_of(ctx).replay_stats()
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
    hits = agent_of(ctx).replay_search(text, k)
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
    r = agent_of(ctx).replay_check(sample)
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
