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


def run_continual(cfg: Config, passages: list[Passage], *, gate: bool, state_dir: Path, external: str | None,
                  progress: Progress = no_progress) -> dict[str, Any]:
    from ..agent import SealAgent

    run_cfg = scratch_config(cfg, state_dir, replay={"gate": gate})
    docs = state_dir / "documents"
    docs.mkdir(parents=True, exist_ok=True)
    agent = SealAgent(run_cfg)
    t0 = time.perf_counter()
    try:
        live = agent.live
        learner = agent.learner(external)
        questions = [qa_mod.questions_of(p.title, p.questions) for p in passages]

        def accuracies(upto: int) -> list[float | None]:
            flat = [q for qs in questions[:upto] for q in qs]
            scored = qa_mod.evaluate(live.model, live.tokenizer, flat, cfg.qa, use_chat=cfg.model.use_chat_template,
                                     compute_dtype=answer_dtype(cfg))
            out, i = [], 0
            for qs in questions[:upto]:
                out.append(qa_mod.accuracy(scored[i:i + len(qs)]))
                i += len(qs)
            return out

        progress("base", {"n": len(passages)})
        matrix: list[list[float | None]] = [accuracies(len(passages))]
        steps = []
        for i, p in enumerate(passages):
            path = docs / f"{i:02d}.json"
            path.write_text(json.dumps({"title": p.title, "context": p.text,
                                        "questions": [dataclasses.asdict(q) for q in p.questions],
                                        "external_self_edits": p.external_self_edits}), encoding="utf-8")
            progress("learn", {"step": i + 1, "n": len(passages), "title": p.title})
            report = learner.learn_file(path)
            [pr] = report.passages
            steps.append({"step": i + 1, "title": p.title, "status": pr.status, "version": live.version,
                          "forgetting": pr.forgetting, "train_seconds": (pr.train or {}).get("seconds"),
                          "seconds": round(pr.seconds, 1)})
            matrix.append(accuracies(i + 1))
            progress("row", {"step": i + 1, "row": matrix[-1], "status": pr.status})
    finally:
        agent.close()
    return {
        "gate": gate,
        "self_edits": external or "self",
        "passages": [p.title for p in passages],
        "questions": [len(qs) for qs in questions],
        "matrix": [[None if x is None else round(x, 4) for x in row] for row in matrix],
        "steps": steps,
        "summary": summarize(matrix),
        "accepted": sum(s["status"] == "learned" for s in steps),
        "rejected": sum(s["status"] == "rejected-forgetting" for s in steps),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def evaluate_continual(cfg: Config, *, data: Path | None = None, n: int = 8, gate: bool = True,
                       self_edits: str = "self", out_dir: Path | None = None,
                       progress: Progress = no_progress) -> tuple[dict[str, Any], dict[str, Path]]:
    """`eval continual`: the first `n` passages of `data` (default eval.data) learned in sequence, in a state
    directory of its own under `out_dir` (default STATE/state/eval/continual-TIME); writes the result and
    its heatmap there and returns them with their paths."""
    data, passages = eval_passages(cfg, data, n)
    passages = passages[:n]
    external = None
    if self_edits != "self":
        if not self_edits.startswith(EXTERNAL):
            raise SealError(f"--self-edits must be 'self' or external:<name>, got '{self_edits}'")
        external = self_edits.removeprefix(EXTERNAL)
        require_external(passages, external, str(data))
    out_dir = out_dir or cfg.state_dir / "state" / "eval" / f"continual-{datetime.now():%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    switch = "on" if gate else "off"
    state_dir = out_dir / f"state-gate-{switch}"
    if state_dir.exists() and any(state_dir.iterdir()):
        raise SealError(f"{state_dir} already holds a run; choose another --out")
    resolve_base(cfg)  # converted once into the configured state directory, shared by the run's
    result = run_continual(cfg, passages, gate=gate, state_dir=state_dir, external=external, progress=progress)
    result["data"] = str(data)
    files = {"result": out_dir / f"continual-gate-{switch}.json", "heatmap": out_dir / f"heatmap-gate-{switch}.png"}
    files["result"].write_text(json.dumps(result, indent=2), encoding="utf-8")
    heatmap(result, files["heatmap"],
            f"seal-agent eval continual: {n} passages, gate {switch}, self-edits {result['self_edits']}")
    return result, files


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
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 1.2 + 0.6 * len(matrix)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if not np.isnan(grid[r, c]):
                ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[r, c] < 0.5 else "black")
    ax.set_xticks(range(n), [f"P{j + 1}" for j in range(n)])
    marks = {s["step"]: "" if s["status"] == "learned" else " ✗" for s in result["steps"]}
    ax.set_yticks(range(len(matrix)), ["base"] + [f"after {i}{marks.get(i, '')}" for i in range(1, len(matrix))])
    ax.set_xlabel("passage (questions, no passage in context)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
