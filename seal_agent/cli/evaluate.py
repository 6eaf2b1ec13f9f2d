"""Verbs that measure: `eval squad/cpt/continual` and `bench`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress
from rich.table import Table

from ..evaluation.conditions import DEFAULT_CONDITIONS, DEFAULT_CPT_CONDITIONS
from .options import agent_of, config_of, global_options, handle_errors
from .output import emit_json, err, out, progress_bar

# -- eval ----------------------------------------------------------------

DATA_HELP = "SQuAD-style JSON/JSONL (default: eval.data in config.toml)."


@click.group(name="eval")
def eval_group() -> None:
    """Measure how well the model learns (the SEAL paper's Table 2 ladder on passages, Table 1 on ARC tasks)."""


def _eval_options(f: Callable) -> Callable:
    options = [
        click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help=DATA_HELP),
        click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Use the first N passages."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for self-edit sampling and training (same seed, same result)."),
        click.option("--from-version", type=int, default=0, show_default=True,
                     help="Model version every update starts from (0 = the base model)."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
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


class _LadderProgress:
    """Renders the ladder's stages as a progress bar on stderr."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task = None
        self.passages = 0

    def __call__(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            self.passages = info["passages"]
            self.task = self.bar.add_task(f"eval {info['kind']}", total=info["total"])
        elif stage == "passage":
            self.bar.update(self.task, description=f"passage {info['index'] + 1}/{info['total']}: "
                                                   f"{info['title'][:30]}")
        elif stage == "condition-start":
            self.bar.update(self.task, description=f"{info['condition']} ({self.passages} passages)")
        elif stage == "condition":
            self.bar.advance(self.task)
            logging.getLogger("seal_agent.eval").info("%s: %d/%d", info["condition"], info["correct"], info["n"])


def _run_eval(ctx: click.Context, kind: str, as_json: bool, **options: Any) -> None:
    from ..evaluation.ladder import run_ladder

    agent = agent_of(ctx)
    with progress_bar() as bar:
        done = run_ladder(agent, kind, progress=_LadderProgress(bar), **options)
    if as_json:
        for row in done.run.rows():
            emit_json(row)
        return
    table = Table(title=f"eval {kind}: {done.passages} passages of {done.data.name} (no passage in context)")
    for col in ("condition", "accuracy", "95% CI", "questions", "seconds") + (("judge",) if done.judged else ()):
        table.add_column(col)
    for r in done.run.rows():
        cells = [r["condition"], f"{r['accuracy']:.1%}", f"{r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}", str(r["n"]),
                 f"{r['seconds']:.0f}"]
        if done.judged:
            cells.append(f"{r.get('judge_accuracy', 0):.1%}")
        table.add_row(*cells)
    out.print(table)
    if done.run.per_worker is not None:
        out.print("on the Ray pool: " + ", ".join(f"{w} {s['jobs']} cases {s['seconds']:.0f} s"
                                                  for w, s in done.run.per_worker.items()), highlight=False)
    out.print(f"answers: {done.files['answers']}\nchart:   {done.files['chart']}", highlight=False)


@eval_group.command("squad")
@click.option("--conditions", default=DEFAULT_CONDITIONS, show_default=True,
              help="Comma-separated: base, passage, self, external:<name>, in-context.")
@_eval_options
@global_options
@click.pass_context
@handle_errors
def eval_squad(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Single-passage setting: each passage learned independently from the same model."""
    _run_eval(ctx, "squad", as_json, **options)


class _ArcProgress:
    def __init__(self, bar: Progress):
        self.bar = bar
        self.task = None

    def __call__(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            self.task = self.bar.add_task("eval arc", total=info["tasks"] * len(info["conditions"]))
        elif stage == "task":
            self.bar.update(self.task, description=f"{info['condition']}: task {info['index'] + 1}/{info['total']} "
                                                   f"({info['task']})")
        elif stage == "solved":
            self.bar.advance(self.task)
        elif stage == "condition":
            logging.getLogger("seal_agent.eval").info("%s: %d/%d solved", info["condition"], info["solved"],
                                                      info["n"])


@eval_group.command("arc")
@click.option("--data", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="ARC tasks: an ARC Prize challenges file or one task (default: arc.eval_data).")
@click.option("--solutions", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Its solutions file (default: arc.eval_solutions with the default data).")
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Use the first N tasks.")
@click.option("--tasks", default=None, metavar="ID1,ID2,..", help="Use these tasks only.")
@click.option("--conditions", default="icl,ttt-self,ttt-oracle,seal", show_default=True,
              help="Comma-separated: icl, ttt-self, ttt-oracle, seal.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for recipe sampling and training.")
@click.option("--policy-version", type=int, default=None,
              help="ARC policy version of the seal condition (default: the promoted one).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for results.json and chart.png (default: STATE/eval/arc-TIME).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per condition (condition, solved, n, success_rate, seconds, tasks).")
@global_options
@click.pass_context
@handle_errors
def eval_arc(ctx: click.Context, data, solutions, n, tasks, conditions, seed, policy_version, out_dir,
             as_json) -> None:
    """The paper's Table 1 ladder on ARC tasks: in context, trained by the model's own
    recipe, by the best of a fixed grid of recipes, and by the ReSTEM-trained policy's."""
    from ..evaluation.arc import run_arc

    agent = agent_of(ctx)
    only = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    with progress_bar() as bar:
        done = run_arc(agent, conditions, data=data, solutions=solutions, n=n, tasks=only, seed=seed,
                       out_dir=out_dir, policy_version=policy_version, progress=_ArcProgress(bar))
    if as_json:
        for row in done.rows:
            emit_json(row)
        return
    table = Table(title=f"eval arc: {done.rows[0]['n']} tasks of {done.data.name}")
    for col in ("condition", "solved", "success", "95% CI", "failures", "seconds"):
        table.add_column(col)
    for r in done.rows:
        fails = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())) or "-"
        table.add_row(r["condition"], f"{r['solved']}/{r['n']}", f"{r['success_rate']:.0%}",
                      f"{r['ci95'][0]:.0%}-{r['ci95'][1]:.0%}", fails, f"{r['seconds']:.0f}")
    out.print(table)
    out.print(f"results: {done.files['results']}\nchart:   {done.files['chart']}", highlight=False)


@eval_group.command("cpt")
@click.option("--conditions", default=DEFAULT_CPT_CONDITIONS, show_default=True,
              help="Comma-separated: base, passage, self, external:<name>.")
@_eval_options
@global_options
@click.pass_context
@handle_errors
def eval_cpt(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Continued-pretraining setting: one update on N passages together, then all their questions."""
    _run_eval(ctx, "cpt", as_json, **options)


def _continual_progress(stage: str, info: dict[str, Any]) -> None:
    if stage == "learn":
        err.print(f"[dim]step {info['step']}/{info['n']}: learning {info['title']}[/dim]")
    elif stage == "row":
        err.print(f"[dim]  {info['status']}; accuracy by passage: "
                  + " ".join("-" if x is None else f"{x:.2f}" for x in info["row"]) + "[/dim]")


@eval_group.command("continual")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help=DATA_HELP)
@click.option("--n", "n", type=click.IntRange(min=2), default=8, show_default=True,
              help="Learn the first N passages one after another.")
@click.option("--gate", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="off: updates are checked and reported but always merged (the paper's setting).")
@click.option("--self-edits", "self_edits", default="self", show_default=True,
              help="'self' (the active policy writes them) or external:<name> from the data file.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for continual.json, heatmap.png and the run's state "
                   "(default: STATE/eval/continual-TIME).")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ask every learned passage after every K steps (and the last); in between only the "
                   "passage just learned.")
@click.option("--unlearned", type=click.IntRange(min=0), default=0, show_default=True,
              help="The next M passages of the data, never learned: their questions should get no module.")
@click.option("--consolidate", is_flag=True,
              help="At the end, consolidate (memory.mode = \"modules\") and ask every passage again.")
@click.option("--ppl-data", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Passages never learned (e.g. train_pool.json): perplexity of the base and final weights.")
@click.option("--ppl-n", type=click.IntRange(min=1), default=50, show_default=True,
              help="How many of --ppl-data's passages.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def eval_continual(ctx, data, n, gate, self_edits, out_dir, every, unlearned, consolidate, ppl_data, ppl_n,
                   as_json) -> None:
    """Retention: learn N passages in sequence, after each step ask the questions of all learned so far.

    Prints the lower-triangular accuracy matrix of the paper's continual
    experiment (row: after step i; column: passage j) and writes a heatmap.
    Runs in a fresh state directory: the live model is not touched.
    """
    from ..evaluation.continual import evaluate_continual

    result, files = evaluate_continual(config_of(ctx), data=data, n=n, gate=gate == "on", self_edits=self_edits,
                                       out_dir=out_dir, every=every, unlearned=unlearned, consolidate=consolidate,
                                       ppl_data=ppl_data, ppl_n=ppl_n, progress=_continual_progress)
    if as_json:
        emit_json(result)
        return
    _print_matrix(result, f"gate {gate}" if result["mode"] == "merge" else "modules")
    sm = result["summary"]
    if result["mode"] == "modules":
        out.print(f"learned {result['accepted']}, refused {result['refused']}, flagged {result['flagged']}; "
                  f"router recall@1 {result.get('router_recall_at_1')}, unlearned questions with no module "
                  f"{result.get('unlearned_no_module')}", highlight=False)
    out.print(f"accepted {result['accepted']}, rejected {result['rejected']}; earlier passages: "
              f"{sm.get('earlier_just_learned_mean')} just after learning -> {sm.get('earlier_final_mean')} at the end "
              f"(forgetting {sm.get('forgetting')})\nheatmap: {files['heatmap']}", highlight=False)


@eval_group.command("routing")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help=DATA_HELP)
@click.option("--n", "n", type=click.IntRange(min=1), default=50, show_default=True,
              help="The first N passages stand for learned modules.")
@click.option("--unlearned", type=click.IntRange(min=0), default=50, show_default=True,
              help="The next M passages, never learned: their questions should get no module.")
@click.option("--seeds", default=None, metavar="S1,S2,..",
              help="Shuffle the data with each seed first, one draw each, pooled (train_pool.json is ordered "
                   "by article).")
@click.option("--target", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Report the lowest threshold leaving this share of unlearned questions with no module.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@global_options
@click.pass_context
@handle_errors
def eval_routing(ctx, data, n, unlearned, seeds, target, as_json) -> None:
    """The router alone, nothing trained: does a question find its passage's module?

    Reports recall@1, the share applied at memory.route_threshold, the share of
    questions about unlearned passages given no module, and a threshold sweep.
    """
    from ..evaluation.routing import evaluate_routing

    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds else None
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of integers: {seeds!r}", param_hint="--seeds") from None
    result = evaluate_routing(config_of(ctx), data=data, n=n, unlearned=unlearned, seeds=seed_list, target=target)
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"routing {result['questions']} questions to {n} passages' modules "
                        f"(lexical_weight {result['lexical_weight']})")
    for c in ("threshold", "own module applied", "unlearned: no module"):
        table.add_column(c, justify="right")
    for row in result["sweep"]:
        table.add_row(f"{row['threshold']:.2f}", str(row["applied_right"]), str(row["unlearned_no_module"]))
    out.print(table)
    out.print(f"recall@1 {result['router_recall_at_1']}; at route_threshold {result['route_threshold']}: own module "
              f"applied {result['router_applied_right_module']}, unlearned questions with no module "
              f"{result['unlearned_no_module']} (same article {result['unlearned_same_article_no_module']}, "
              f"other articles {result['unlearned_other_articles_no_module']}); threshold for "
              f"{target:.0%} unlearned with no module: {result['threshold_for_target']}", highlight=False)


def _print_matrix(result: dict[str, Any], gate: str) -> None:
    n = len(result["passages"])
    table = Table(title=f"accuracy after each step ({gate}; rows: after learning passage i)")
    table.add_column("")
    for j in range(n):
        table.add_column(f"P{j + 1}")
    for i, row in enumerate(result["matrix"]):
        label = "base" if i == 0 else f"after {i}" + ("" if result["steps"][i - 1]["status"] == "learned" else " ✗")
        cells = ["" if x is None or (i and j >= i) else f"{x:.2f}" for j, x in enumerate(row)]
        table.add_row(label, *cells + [""] * (n - len(cells)))
    out.print(table)


# -- bench ---------------------------------------------------------------

@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as one JSON object.")
@click.option("--part", type=click.Choice(["all", "core", "engines", "restem", "page"]), default="all",
              show_default=True,
              help="core: the inner loop, generation, QA, search, ingest, modules, API latency; "
                   "engines: the torch engine and vLLM side by side (needs the vllm extra); "
                   "restem: one small ReSTEM round locally and on Ray with 1 and 2 workers (the cluster extra); "
                   "page: the daemon's page with 1,000 documents in the database.")
@global_options
@click.pass_context
@handle_errors
def bench(ctx: click.Context, as_json: bool, part: str) -> None:
    """Measure speed side by side: inner loop vs references, generation, QA, replay search, ingest, API latency,
    and the two decoding engines.

    core takes 7-10 minutes on 2 cores, engines about as long, restem about 15, page one.
    Ratios (speedup, fraction of peak, vLLM over torch, Ray over local) are
    measured in the same run, so they hold on a noisy machine.
    """
    from ..evaluation import cluster as cluster_bench
    from ..evaluation import engines as engines_bench
    from ..evaluation import page as page_bench
    from ..evaluation.bench import run_bench, summary

    agent = agent_of(ctx)
    def log(m: str) -> None:
        err.print(f"[dim]{m}[/dim]")

    result: dict = {}
    if part in ("all", "core"):
        result.update(run_bench(agent.cfg, agent.policy, log=log))
    if part in ("all", "engines"):
        result.update(engines_bench.engines(agent.cfg, log=log))
    if part in ("all", "restem"):
        result.update(cluster_bench.restem_executors(agent.cfg, log=log))
    if part in ("all", "page"):
        result["page"] = page_bench.page_speed(agent.cfg, log=log)
    if as_json:
        emit_json(result)
        return
    if part in ("all", "core"):
        out.print(summary(result), highlight=False)
    if part in ("all", "engines"):
        out.print(engines_bench.summary(result), highlight=False)
    if part in ("all", "restem"):
        out.print(cluster_bench.summary(result), highlight=False)
    if part in ("all", "page"):
        out.print(page_bench.summary(result["page"]), highlight=False)
