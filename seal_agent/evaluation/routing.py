"""`eval routing`: how well the router finds a question's module, with nothing trained.

The router decides from keys and passages alone (memory/modules.py), so its
quality can be measured, and its threshold chosen, in seconds: the first n
passages of a data file stand for n learned modules (their keys embedded, their
texts for the lexical signal), the next `unlearned` for what was never learned.
Each passage's own questions, which the router never saw, are routed:

- recall@1: the best-scoring module is the question's own (recall@k: among
  the k best, what top-k routing could gain at most);
- applied_right: ... and its score reaches the threshold (it is applied);
- unlearned_no_module: a question about an unlearned passage gets no module
  (also split into articles with and without a learned passage).

The sweep gives both shares at other thresholds, and the threshold at which the
unlearned share reaches a target: what `memory.route_threshold` should be for
the data. `seeds` shuffles the data before taking passages (train_pool.json is
ordered by article; eval_dev.json is already shuffled), one draw per seed,
pooled. `eval continual` measures the same router on trained modules.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import SealError
from ..memory.embedding import load_embedder
from ..memory.modules import Router, key_texts
from ..qa import answering as qa_mod
from .ladder import eval_passages


def share(xs) -> float | None:
    """The share of true marks (None: no marks), to 4 places."""
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else None


def sweep(learned: list[tuple[bool, float]], unlearned: list[float], thresholds) -> list[dict[str, float | None]]:
    """Per threshold, the share of learned questions whose own module is picked and
    applied, and of unlearned questions given no module. `learned`: (own module
    picked, score) per question; `unlearned`: the best score per question."""
    return [{"threshold": round(float(t), 4),
             "applied_right": share(right and s >= t for right, s in learned),
             "unlearned_no_module": share(s < t for s in unlearned)} for t in thresholds]


def threshold_for(unlearned: list[float], target: float) -> float | None:
    """The lowest threshold that leaves at least `target` of the unlearned questions with no module."""
    if not unlearned:
        return None
    ordered = sorted(unlearned)
    k = int(np.ceil(target * len(ordered)))  # questions that must score below it
    return float(np.nextafter(ordered[k - 1], np.inf)) if k > 0 else ordered[0]


def evaluate_routing(cfg: Config, *, data: Path | None = None, n: int = 50, unlearned: int = 50,
                     seeds: list[int] | None = None, target: float = 0.95) -> dict[str, Any]:
    data, passages = eval_passages(cfg, data, None)
    if len(passages) < n + unlearned:
        raise SealError(f"{data}: {len(passages)} passages with questions, fewer than --n + --unlearned "
                        f"({n + unlearned})")
    embedder = load_embedder(cfg)
    threshold, weight = cfg.memory.route_threshold, cfg.memory.lexical_weight
    learned_q: list[tuple[bool, float]] = []
    unlearned_q: list[tuple[bool, float]] = []  # (same article as a learned passage, best score)
    rank_of: list[int] = []  # where each learned question's own module ranks (0: first)
    for seed in seeds or [None]:
        drawn = list(passages)
        if seed is not None:
            random.Random(seed).shuffle(drawn)
        learned, held = drawn[:n], drawn[n:n + unlearned]
        keys = [(i + 1, k) for i, p in enumerate(learned) for k in key_texts(p.title, p.text)]
        router = Router(embedder, np.array([m for m, _ in keys], dtype=np.int64),
                        embedder.embed([k for _, k in keys]), threshold,
                        texts={i + 1: f"{p.title}\n{p.text}" for i, p in enumerate(learned)},
                        titles={i + 1: p.title for i, p in enumerate(learned)}, lexical_weight=weight)
        for i, p in enumerate(learned):
            for ranked in router.rank(_questions(cfg, p)):
                learned_q.append((ranked[0].nearest == i + 1, ranked[0].score))
                rank_of.append(next((j for j, r in enumerate(ranked) if r.nearest == i + 1), len(ranked)))
        titles = {p.title for p in learned}
        for p in held:
            for r in router.route(_questions(cfg, p)):
                unlearned_q.append((p.title in titles, r.score))
    u_scores = [s for _, s in unlearned_q]
    return {
        "data": str(data), "n": n, "unlearned": unlearned, "seeds": seeds, "embedder": embedder.name,
        "route_threshold": threshold, "lexical_weight": weight,
        "questions": len(learned_q), "unlearned_questions": len(unlearned_q),
        "router_recall_at_1": share(right for right, _ in learned_q),
        # how often the own module is among the k best: what top-k routing could win at most
        "router_recall_at_k": {k: share(r < k for r in rank_of) for k in (1, 2, 3, 5)},
        "router_applied_right_module": share(right and s >= threshold for right, s in learned_q),
        "unlearned_no_module": share(s < threshold for s in u_scores),
        "unlearned_same_article_no_module": share(s < threshold for same, s in unlearned_q if same),
        "unlearned_other_articles_no_module": share(s < threshold for same, s in unlearned_q if not same),
        "target": target, "threshold_for_target": threshold_for(u_scores, target),
        "sweep": sweep(learned_q, u_scores, np.round(np.arange(0.3, 1.3001, 0.04), 4)),
    }


def _questions(cfg: Config, p) -> list[str]:
    return [qa_mod.question_text(q, cfg.qa) for q in qa_mod.questions_of(p.title, p.questions)]
