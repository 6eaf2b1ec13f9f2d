"""Verbs on the self-edit policy: `restem` (one refresh now) and `policy list/show/rollback`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from .options import agent_of, global_options, handle_errors
from .output import emit_json, out, progress_bar

# -- ReSTEM and policy versions -----------------------------------------------

class _RestemProgress:
    def __init__(self):
        self.bar = progress_bar()
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


@click.command("restem")
@click.option("--domain", type=click.Choice(["knowledge", "arc"]), default="knowledge", show_default=True,
              help="knowledge: the active self-edit policy on passages; arc: the recipe policy on ARC tasks.")
@click.option("--contexts", type=int, default=None, help="Training contexts this round (default: restem.contexts).")
@click.option("--samples", type=int, default=None, help="Self-edits sampled per context (default: restem.samples).")
@click.option("--seeds", type=int, default=None, help="Inner-loop seeds per self-edit (default: restem.seeds).")
@click.option("--data", "data", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Contexts besides the daemon's own (repeatable): SQuAD-style files (default: restem.data); "
                   "with --domain arc, ARC task files (default: arc.data).")
@click.option("--json", "as_json", is_flag=True, help="Print the round's record as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def restem_cmd(ctx: click.Context, domain: str, contexts: int | None, samples: int | None, seeds: int | None,
               data: tuple[Path, ...], as_json: bool) -> None:
    """Run one ReSTEM refresh of a self-edit policy now and print its record."""
    agent = agent_of(ctx)
    agent.own()
    progress = _RestemProgress()
    with progress.bar:
        record = agent.restem(domain=domain, contexts=contexts, samples=samples, seeds=seeds, data=list(data),
                              progress=progress)
    if as_json:
        emit_json(record)
        return
    rewards = [r["reward"] for r in record["rewards"] if r["reward"] is not None]
    lines = [f"ReSTEM round {record['round']} ({record['policy']}, {record['domain']}, "
             f"reward {record['reward_kind']}): "
             f"{len(record['contexts'])} contexts x {record['samples_per_context']} samples, "
             f"{len(record['winners'])} winners",
             f"  mean reward {sum(rewards) / len(rewards):+.3f}" if rewards else "  no rewards"]
    for r in record.get("refused_contexts", []):
        lines.append(f"  not a context: {r['task']} ({r['source']}): {r['reason']}")
    if record.get("stopped_early"):
        lines.append(f"  {record['stopped_early']}")
    if record["sft"]:
        lines.append(f"  SFT: {record['sft']['pairs']} pairs, final loss {record['sft']['final_loss']}")
    if record["heldout"]:
        h = record["heldout"]
        lines.append(f"  held-out ({len(h['contexts'])} contexts): current policy {h['old']:+.3f}, "
                     f"new {h['new']:+.3f}")
    lines.append(f"  decision: {record['decision']} ({record['reason']}); policy version {record['policy_version']}")
    if record.get("executor") == "ray":
        per = ", ".join(f"{name} {w['jobs']} jobs {w['seconds']:.0f}s" + ("" if w["alive"] else " (died)")
                        for name, w in record["per_worker"].items())
        lines.append(f"  on Ray ({record['cluster_address']}): {per}; {len(record['reruns'])} candidates rerun")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in record["stage_seconds"].items())
    lines.append(f"  {record['seconds']:.0f}s ({stages})")
    out.print("\n".join(lines), highlight=False)


@click.group()
def policy() -> None:
    """Versions of the self-edit policy that ReSTEM trains: list, show, rollback."""


@policy.command("list")
@click.option("--domain", type=click.Choice(["knowledge", "arc"]), default="knowledge", show_default=True,
              help="Whose line: the active self-edit policy's, or the ARC recipe policy's.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version.")
@global_options
@click.pass_context
@handle_errors
def policy_list(ctx: click.Context, domain: str, as_json: bool) -> None:
    """The policy's versions (0 = its prompt alone); * marks the promoted one."""
    versions = agent_of(ctx).versions_of(domain)
    rows = versions.rows()
    if as_json:
        for r in rows:
            emit_json(r)
        return
    table = Table(title=f"policy {versions.policy}")
    for col in ("", "version", "parent", "created", "round", "winners", "held-out old -> new"):
        table.add_column(col)
    for r in rows:
        held = "" if r["heldout_old"] is None else f"{r['heldout_old']:+.3f} -> {r['heldout_new']:+.3f}"
        table.add_row("*" if r["active"] else "", str(r["version"]), str(r["parent"] if r["parent"] is not None else ""),
                      r["created_at"] or "", str(r["round"] or ""), str(r["winners"] or ""), held)
    out.print(table)


@policy.command("show")
@click.argument("version", type=int)
@click.option("--domain", type=click.Choice(["knowledge", "arc"]), default="knowledge", show_default=True,
              help="Whose line: the active self-edit policy's, or the ARC recipe policy's.")
@global_options
@click.pass_context
@handle_errors
def policy_show(ctx: click.Context, version: int, domain: str) -> None:
    """A policy version's manifest (its round, winners, held-out result) as JSON."""
    emit_json(agent_of(ctx).versions_of(domain).manifest(version))


@policy.command("rollback")
@click.argument("version", type=int)
@click.option("--domain", type=click.Choice(["knowledge", "arc"]), default="knowledge", show_default=True,
              help="Whose line: the active self-edit policy's, or the ARC recipe policy's.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@global_options
@click.pass_context
@handle_errors
def policy_rollback(ctx: click.Context, version: int, domain: str, as_json: bool) -> None:
    """Make policy VERSION the one that writes self-edits (0 = the prompt alone)."""
    result = agent_of(ctx).policy_rollback(version, domain)
    if as_json:
        emit_json(result)
    else:
        out.print(f"policy {result['policy']}: version {result['from']} -> {result['version']}", highlight=False)
