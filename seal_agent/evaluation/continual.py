"""`eval continual`: the paper's retention experiment (its Figure 6), with and without the gate.

Passages with questions are learned one after another, as the daemon would,
into a fresh state directory; after each step the live model answers the
questions of every passage learned so far (no passage in context). The result
is the lower-triangular matrix acc[step][passage] (row 0: the base model), and
its summary: how much of what was learned right after each step is still
there at the end. `evaluate_continual` is the whole job the CLI calls: the
inputs checked, the run in its own folder, the result and its heatmap written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import Config
from ..documents import Passage
from ..errors import SealError
from ..model.loader import answer_dtype, resolve_base
from ..progress import Progress, no_progress
from ..qa import answering as qa_mod
from .conditions import EXTERNAL, require_external
from .ladder import eval_passages
from .routing import share
from .scratch import scratch_config


def summarize(matrix: list[list[float | None]]) -> dict[str, Any]:
    """Retention figures from the matrix (rows: base, after step 1..n; columns: passages).

    just_learned[j] = acc right after learning passage j (row j+1);
    final[j] = acc after the last step; forgetting = mean(just_learned - final).
    """
    n = len(matrix) - 1
    if n <= 0:
        return {}
    base = matrix[0]
    just = [matrix[j + 1][j] for j in range(n)]
    final = matrix[n][:n]
    earlier = range(n - 1)  # passages that saw later updates

    def mean(xs: list[float | None]) -> float | None:
        xs = [x for x in xs if x is not None]
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "base_mean": mean(base[:n]),
        "just_learned_mean": mean(just),
        "final_mean": mean(final),
        "earlier_just_learned_mean": mean([just[j] for j in earlier]),
        "earlier_final_mean": mean([final[j] for j in earlier]),
        "forgetting": mean([just[j] - final[j] for j in earlier if just[j] is not None and final[j] is not None]),
    }


def perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp of the mean next-token loss over all tokens of `texts` (general ability:
    passages the model never learned)."""
    import math

    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :1024]
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss.float().item()
            total += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return round(math.exp(total / count), 4) if count else float("nan")


def checkpoints(n: int, every: int) -> set[int]:
    """The steps after which every learned passage is asked: every `every`, and the last."""
    return {i for i in range(1, n + 1) if i % every == 0} | {n}


def run_continual(cfg: Config, passages: list[Passage], *, gate: bool, state_dir: Path, external: str | None,
                  progress: Progress = no_progress, every: int = 1, unlearned: list[Passage] = (),
                  consolidate: bool = False, ppl_texts: list[str] = (),
                  save: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """Learn `passages` in sequence; ask all learned so far at each checkpoint.
    Between checkpoints a row holds only the passage just learned (its own
    questions, asked right after it). `unlearned`: passages never learned, whose
    questions should be answered with no module. `consolidate`: at the end, a
    consolidation (modules) and the accuracies after it. `ppl_texts`: texts for
    the perplexity of the base and of the final weights. `save` is handed the
    result measured so far before consolidating."""
    from ..agent import SealAgent

    run_cfg = scratch_config(cfg, state_dir, replay={"gate": gate})
    modules_mode = run_cfg.memory.mode == "modules"
    docs = state_dir / "documents"
    docs.mkdir(parents=True, exist_ok=True)
    agent = SealAgent(run_cfg)
    t0 = time.perf_counter()
    marks_at = checkpoints(len(passages), every)
    extra: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    matrix: list[list[float | None]] = []
    questions = [qa_mod.questions_of(p.title, p.questions) for p in passages]

    def result() -> dict[str, Any]:
        not_learned = [s for s in steps if s["status"] != "learned"]
        return {
            "mode": run_cfg.memory.mode,
            "gate": gate,
            "self_edits": external or "self",
            "passages": [p.title for p in passages],
            "questions": [len(qs) for qs in questions],
            "every": every,
            "matrix": [[None if x is None else round(x, 4) for x in row] for row in matrix],
            "curve": curve,
            "steps": steps,
            "summary": summarize(matrix),
            "accepted": sum(s["status"] == "learned" for s in steps),
            "rejected": sum(s["status"] == "rejected-forgetting" for s in steps),
            # Not learned for any reason but unreadable or duplicate (all passages here are distinct and readable).
            "refused": len([s for s in not_learned if s["status"] != "duplicate"]),
            "flagged": sum(s["flagged"] is not None for s in steps),
            "final_mean": summarize(matrix).get("final_mean"),
            **extra,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    try:
        live = agent.live
        learner = agent.learner(external)
        module_of: dict[int, int | None] = {}

        def ask(upto: int) -> tuple[list[float | None], list[bool], list[bool]]:
            """Accuracy per passage, and per question whether the router picked its
            passage's module as nearest (recall@1) and applied it (above the threshold)."""
            flat = [q for qs in questions[:upto] for q in qs]
            scored, routes = agent.knowledge.evaluate(agent.decoder("generate"), live.tokenizer, live.version, flat)
            out, nearest, applied, i = [], [], [], 0
            for j, qs in enumerate(questions[:upto]):
                out.append(qa_mod.accuracy(scored[i:i + len(qs)]))
                for r in routes[i:i + len(qs)]:
                    nearest.append(module_of.get(j) is not None and r.nearest == module_of.get(j))
                    applied.append(module_of.get(j) is not None and r.module == module_of.get(j))
                i += len(qs)
            return out, nearest, applied

        progress("base", {"n": len(passages)})
        matrix.append(ask(len(passages))[0])
        base_ppl = perplexity(live.model, live.tokenizer, list(ppl_texts)) if ppl_texts else None
        routing: tuple[list[bool], list[bool]] = ([], [])
        for i, p in enumerate(passages):
            path = docs / f"{i:02d}.json"
            path.write_text(json.dumps({"title": p.title, "context": p.text,
                                        "questions": [dataclasses.asdict(q) for q in p.questions],
                                        "external_self_edits": p.external_self_edits}), encoding="utf-8")
            progress("learn", {"step": i + 1, "n": len(passages), "title": p.title})
            report = learner.learn_file(path)
            [pr] = report.passages
            module_of[i] = pr.module
            steps.append({"step": i + 1, "title": p.title, "status": pr.status, "version": live.version,
                          "module": pr.module, "flagged": pr.flagged, "forgetting": pr.forgetting,
                          "qa_before": pr.qa_before, "qa_after": pr.qa_after,
                          "train_seconds": (pr.train or {}).get("seconds"), "seconds": round(pr.seconds, 1)})
            if i + 1 in marks_at:
                row, nearest, applied = ask(i + 1)
                routing = (nearest, applied)
                learned = [x for x in row if x is not None]
                curve.append({"step": i + 1, "mean": round(sum(learned) / len(learned), 4) if learned else None})
            else:  # the passage just learned, asked as the others will be
                row = [None] * i + [ask_one(agent, live, questions[i])]
            matrix.append(row)
            progress("row", {"step": i + 1, "row": matrix[-1], "status": pr.status})
        if modules_mode:
            extra["router_recall_at_1"] = share(routing[0])
            extra["router_applied_right_module"] = share(routing[1])
            extra.update(_unlearned_routing(agent, live, passages, unlearned))
        if ppl_texts:
            extra["perplexity"] = {"base": base_ppl, "final": perplexity(live.model, live.tokenizer, list(ppl_texts))}
        if consolidate and modules_mode:
            save(result())  # what is measured so far is kept, whatever consolidating does
            progress("consolidate", {})
            folded = agent.consolidate()
            after, _, _ = ask(len(passages))
            slow = _slow_alone(agent, live, questions)
            extra["consolidation"] = {
                **{k: folded.get(k) for k in ("decision", "reason", "version", "seconds", "held_lost")},
                "absorbed": len(folded.get("absorbed", [])), "kept": len(folded.get("kept", [])),
                "retrained": len(folded.get("retrained", {})),
                "mean_after": _mean(after), "mean_slow_alone": _mean(slow),
                "row_after": [None if x is None else round(x, 4) for x in after],
            }
            if ppl_texts and folded["decision"] == "consolidated":  # otherwise the weights did not change
                extra["perplexity"]["consolidated"] = perplexity(live.model, live.tokenizer, list(ppl_texts))
    finally:
        agent.close()
    return result()


def _mean(row: list[float | None]) -> float | None:
    xs = [x for x in row if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def ask_one(agent, live, questions: list[qa_mod.Question]) -> float | None:
    scored, _ = agent.knowledge.evaluate(agent.decoder("generate"), live.tokenizer, live.version, questions)
    return qa_mod.accuracy(scored)


def _slow_alone(agent, live, questions: list[list[qa_mod.Question]]) -> list[float | None]:
    """Accuracy per passage from the weights alone, no module applied (the slow memory)."""
    flat = [q for qs in questions for q in qs]
    scored = qa_mod.evaluate(agent.decoder("generate"), live.tokenizer, flat, agent.cfg.qa,
                             use_chat=agent.cfg.model.use_chat_template,
                             compute_dtype=answer_dtype(agent.cfg))
    out, i = [], 0
    for qs in questions:
        out.append(qa_mod.accuracy(scored[i:i + len(qs)]))
        i += len(qs)
    return out


def _unlearned_routing(agent, live, learned: list[Passage], unlearned: list[Passage]) -> dict[str, Any]:
    """Share of questions about passages never learned that get no module: all of
    them, and those of articles (titles) none of whose passages was learned."""
    if not unlearned:
        return {}
    titles = {p.title for p in learned}
    qs = [(p.title in titles, q) for p in unlearned for q in qa_mod.questions_of(p.title, p.questions)]
    routes = agent.knowledge.route_questions(live.version, [q for _, q in qs])
    none = [r.module is None for r in routes]
    other = [r.module is None for (same, _), r in zip(qs, routes) if not same]
    same = [r.module is None for (s, _), r in zip(qs, routes) if s]
    return {"unlearned_no_module": share(none), "unlearned_questions": len(none),
            "unlearned_other_articles_no_module": share(other), "unlearned_other_articles_questions": len(other),
            "unlearned_same_article_no_module": share(same), "unlearned_same_article_questions": len(same)}


def evaluate_continual(cfg: Config, *, data: Path | None = None, n: int = 8, gate: bool = True,
                       self_edits: str = "self", out_dir: Path | None = None, every: int = 1,
                       unlearned: int = 0, consolidate: bool = False, ppl_data: Path | None = None,
                       ppl_n: int = 50, progress: Progress = no_progress) -> tuple[dict[str, Any], dict[str, Path]]:
    """`eval continual`: the first `n` passages of `data` (default eval.data) learned in sequence, in a state
    directory of its own under `out_dir` (default STATE/state/eval/continual-TIME); writes the result and
    its heatmap there and returns them with their paths. `unlearned`: the next passages of `data`, for
    the router's no-module check; `ppl_data`: passages (the first `ppl_n`) for the perplexity check."""
    data, all_passages = eval_passages(cfg, data, n + unlearned)
    passages, held_back = all_passages[:n], all_passages[n:n + unlearned]
    external = None
    if self_edits != "self":
        if not self_edits.startswith(EXTERNAL):
            raise SealError(f"--self-edits must be 'self' or external:<name>, got '{self_edits}'")
        external = self_edits.removeprefix(EXTERNAL)
        require_external(passages, external, str(data))
    ppl_texts: list[str] = []
    if ppl_data is not None:
        from ..documents import read_qa_passages

        ppl_texts = [f"{p.title}\n{p.text}" for p in read_qa_passages(ppl_data, "perplexity")[:ppl_n]]
    out_dir = out_dir or cfg.state_dir / "state" / "eval" / f"continual-{datetime.now():%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    label = f"gate-{'on' if gate else 'off'}" if cfg.memory.mode == "merge" else "modules"
    state_dir = out_dir / f"state-{label}"
    if state_dir.exists() and any(state_dir.iterdir()):
        raise SealError(f"{state_dir} already holds a run; choose another --out")
    resolve_base(cfg)  # converted once into the configured state directory, shared by the run's
    files = {"result": out_dir / f"continual-{label}.json", "heatmap": out_dir / f"heatmap-{label}.png",
             "retention": out_dir / f"retention-{label}.png"}

    def save(result: dict[str, Any]) -> None:
        files["result"].write_text(json.dumps({**result, "data": str(data)}, indent=2), encoding="utf-8")

    result = run_continual(cfg, passages, gate=gate, state_dir=state_dir, external=external, progress=progress,
                           every=every, unlearned=held_back, consolidate=consolidate, ppl_texts=ppl_texts, save=save)
    result["data"] = str(data)
    save(result)
    retention_chart({label: result}, files["retention"], f"seal-agent eval continual: {n} passages, {label}")
    heatmap(result, files["heatmap"],
            f"seal-agent eval continual: {n} passages, {label}, self-edits {result['self_edits']}")
    return result, files


def curve_of(result: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, mean accuracy over the passages learned so far) at each step whose row is whole."""
    out = []
    for step, row in enumerate(result["matrix"][1:], start=1):
        cells = row[:step]
        if all(x is not None for x in cells):
            out.append((step, sum(cells) / step))
    return out


def retention_chart(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """The retention curves of several `eval continual` results (label -> result), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in results.items():
        points = curve_of(result)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("passages learned (step)")
    ax.set_ylabel("mean accuracy over the passages learned so far")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = result["matrix"]
    n = len(result["passages"])
    grid = np.full((len(matrix), n), np.nan)
    for r, row in enumerate(matrix):
        for c, v in enumerate(row[:n] if r else row):
            if v is not None and (r == 0 or c < r):
                grid[r, c] = v
    small = n <= 16  # larger runs: no figure in each cell, every 5th label
    scale = 0.7 if small else 0.22
    fig, ax = plt.subplots(figsize=(2.0 + scale * n, 1.6 + scale * 0.85 * len(matrix)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if small and not np.isnan(grid[r, c]):
                ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[r, c] < 0.5 else "black")
    every = 1 if small else 5
    ax.set_xticks(range(0, n, every), [f"P{j + 1}" for j in range(0, n, every)])
    marks = {s["step"]: "" if s["status"] == "learned" else " ✗" for s in result["steps"]}
    rows = range(0, len(matrix), every)
    ax.set_yticks(rows, ["base" if i == 0 else f"after {i}{marks.get(i, '')}" for i in rows])
    ax.set_xlabel("passage (questions, no passage in context)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
