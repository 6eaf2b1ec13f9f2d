"""ReSTEM: one refresh of the self-edit policy (rejection sampling + SFT).

The loop is domain-generic. A domain (knowledge incorporation is the first,
`knowledge.py`; ARC-style recipe self-edits could be the next) says how to
prompt for a self-edit, sample it, parse it into an update, apply the update
to a model (a context manager: the update is taken off on exit), score a
model on a context, and optionally how much an update made the model forget.

One refresh:
  1. sample k self-edits per training context with the current policy;
  2. reward each: apply it (per seed) to the scratch model, score, compare with
     the scratch model before; reward = gain (minus a retention penalty), or a
     cheap proxy score of the text with no training;
  3. per context, the best improving sample wins (best-of-k, as in the paper);
  4. SFT a policy adapter on (prompt -> winning self-edit), continuing the
     current one;
  5. on held-out contexts, compare the mean gain of the new policy's
     self-edits with the current policy's: promote only if better by a margin.
The caller stores the adapter and the record; this module touches no files
but the candidate adapter's directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import LoraConfig, RestemConfig, TrainConfig
from ..learning.self_edit import policy_adapter
from ..model.inner_loop import Example, attach_lora, train

Progress = Callable[[str, dict[str, Any]], None]


class Context(Protocol):
    id: str  # stable across rounds (the held-out split and usage counts key on it)
    title: str
    recency: int  # higher = newer


class Domain(Protocol):
    name: str

    def prompt(self, context: Any) -> str: ...

    def sample(self, model, context: Any, k: int, seed: int) -> list[str]:
        """k completions of the prompt (the raw text the policy wrote)."""

    def parse(self, context: Any, completion: str) -> Any:
        """The completion as an update the domain can apply."""

    def apply(self, model, update: Any, seed: int) -> contextlib.AbstractContextManager:
        """Train the update onto `model`; yields the updated model, removes the update on exit."""

    def score(self, model, context: Any) -> float:
        """The model's accuracy on the context's held questions (nothing in context)."""

    def forgetting(self, model, candidate, context: Any) -> float | None:
        """Share of what `model` answered right elsewhere that `candidate` gets wrong (None: nothing to check)."""

    def proxy(self, context: Any, completion: str) -> float:
        """A cheap reward of the completion, with no training."""

    def describe(self, context: Any, completion: str) -> dict[str, Any]:
        """Facts about a sample for the record (length, items)."""


# -- choosing contexts -------------------------------------------------------

def is_heldout(context_id: str, fraction: float) -> bool:
    """A fixed share of all contexts, chosen by hash: the same context is held out in every round."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha256(f"heldout:{context_id}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def select(contexts: Sequence[Any], uses: dict[str, int], n_train: int, n_heldout: int,
           fraction: float) -> tuple[list[Any], list[Any]]:
    """Training contexts: never or least used first, then newest; held-out
    contexts: the newest of the held-out slice (the same set round after round
    while no new ones arrive). The two never overlap."""
    unique = list({c.id: c for c in contexts}.values())
    heldout = [c for c in unique if is_heldout(c.id, fraction)]
    train_pool = [c for c in unique if not is_heldout(c.id, fraction)]
    order = {c.id: i for i, c in enumerate(unique)}
    train_pool.sort(key=lambda c: (uses.get(c.id, 0), -c.recency, order[c.id]))
    heldout.sort(key=lambda c: (-c.recency, order[c.id]))
    return train_pool[:n_train], heldout[:n_heldout]


# -- the round's record ------------------------------------------------------

@dataclass
class Round:
    contexts: list[dict[str, Any]] = field(default_factory=list)
    heldout_contexts: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    rewards: list[dict[str, Any]] = field(default_factory=list)
    winners: list[dict[str, Any]] = field(default_factory=list)
    sft: dict[str, Any] | None = None
    heldout: dict[str, Any] | None = None
    decision: str = "kept"
    reason: str = ""
    stopped_early: str | None = None
    # reward = "both": how often the cheap proxy picks a sample the trained reward ranks best.
    proxy_agreement: dict[str, Any] | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # The trained candidate's directory (when SFT ran); the caller stores it if promoted.
    candidate: Path | None = None

    def timed(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = round(self.stage_seconds.get(stage, 0.0) + seconds, 2)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("candidate")
        trained = [r for r in self.rewards if r.get("seconds_train") is not None]
        d["seconds_per_candidate"] = (
            round(sum(r["seconds_train"] for r in trained) / len(trained), 2) if trained else None)
        return d


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _winner(rewards: list[dict[str, Any]], min_reward: float) -> dict[str, Any] | None:
    """Best-of-k among the samples whose reward beats `min_reward` (first on ties)."""
    improving = [r for r in rewards if r["reward"] is not None and r["reward"] > min_reward]
    return max(improving, key=lambda r: r["reward"]) if improving else None


def _agreement(rewards: list[dict[str, Any]]) -> dict[str, Any] | None:
    """With both rewards measured: how often the proxy picks the trained reward's best sample."""
    by_ctx: dict[str, list[dict[str, Any]]] = {}
    for r in rewards:
        if r.get("gain") is not None and r.get("proxy") is not None:
            by_ctx.setdefault(r["context"], []).append(r)
    if not by_ctx:
        return None
    same = 0
    for rows in by_ctx.values():
        best_real = max(r["reward"] for r in rows)
        same += max(rows, key=lambda r: r["proxy"])["reward"] == best_real
    return {"contexts": len(by_ctx), "proxy_picks_a_best": same}


# -- the refresh ---------------------------------------------------------------

@dataclass
class Settings:
    restem: RestemConfig
    lora: LoraConfig  # target modules of the policy adapter
    train: TrainConfig  # the base of the policy SFT recipe
    train_dtype: torch.dtype = torch.float32
    seed: int = 0


def _ignore(_stage: str, _info: dict[str, Any]) -> None:
    pass


def refresh(domain: Domain, model, tokenizer, train_contexts: list[Any], heldout_contexts: list[Any],
            settings: Settings, current_adapter: Path | None, work_dir: Path, *,
            should_stop: Callable[[], bool] = lambda: False, progress: Progress = _ignore) -> Round:
    """One ReSTEM round on `model` (a scratch copy: updates are put on and taken off it)."""
    cfg = settings.restem
    t_start = time.perf_counter()
    rnd = Round(contexts=[{"id": c.id, "title": c.title} for c in train_contexts],
                heldout_contexts=[{"id": c.id, "title": c.title} for c in heldout_contexts])
    train_ids = {c.id for c in train_contexts}
    if train_ids & {c.id for c in heldout_contexts}:  # select() never does this; a caller might
        raise ValueError("a held-out context is also a training context")
    before_cache: dict[str, float] = {}

    def before(ctx) -> float:
        if ctx.id not in before_cache:
            before_cache[ctx.id] = domain.score(model, ctx)
        return before_cache[ctx.id]

    pairs: list[Example] = []
    for ci, ctx in enumerate(train_contexts):
        if should_stop():
            rnd.stopped_early = f"stopped after {ci} of {len(train_contexts)} contexts: documents are waiting"
            rnd.contexts = rnd.contexts[:ci]
            break
        progress("context", {"index": ci, "total": len(train_contexts), "title": ctx.title})
        t0 = time.perf_counter()
        with policy_adapter(model, current_adapter) as writer:
            completions = domain.sample(writer, ctx, cfg.samples, settings.seed * 7919 + ci)
        rnd.timed("sample", time.perf_counter() - t0)
        for si, completion in enumerate(completions):
            rnd.samples.append({"context": ctx.id, "sample": si, **domain.describe(ctx, completion)})
        t0 = time.perf_counter()
        rows = [_reward(domain, model, ctx, si, c, before, settings) for si, c in enumerate(completions)]
        rnd.timed("reward", time.perf_counter() - t0)
        rnd.rewards.extend(rows)
        best = _winner(rows, cfg.min_reward)
        if best is not None:
            rnd.winners.append({"context": ctx.id, "sample": best["sample"], "reward": best["reward"]})
            pairs.append(Example(domain.prompt(ctx), completions[best["sample"]]))
        progress("rewarded", {"index": ci, "rewards": [r["reward"] for r in rows], "winner": best is not None})
    rnd.proxy_agreement = _agreement(rnd.rewards)

    if not pairs:
        rnd.decision, rnd.reason = "kept", (
            "no training contexts" if not train_contexts else
            f"no self-edit's reward exceeded {cfg.min_reward}: nothing to learn from")
    elif not heldout_contexts:
        rnd.decision, rnd.reason = "kept", "no held-out contexts to test a new policy on"
    else:
        t0 = time.perf_counter()
        progress("sft", {"pairs": len(pairs)})
        rnd.candidate, rnd.sft = _sft(model, tokenizer, pairs, settings, current_adapter, work_dir)
        rnd.timed("sft", time.perf_counter() - t0)
        t0 = time.perf_counter()
        progress("heldout", {"contexts": len(heldout_contexts)})
        old = _heldout_gains(domain, model, heldout_contexts, current_adapter, before, settings)
        new = _heldout_gains(domain, model, heldout_contexts, rnd.candidate, before, settings)
        rnd.timed("heldout", time.perf_counter() - t0)
        rnd.heldout = {"contexts": [c.id for c in heldout_contexts],
                       "before": [round(before(c), 4) for c in heldout_contexts], "old": round(_mean(old), 4),
                       "new": round(_mean(new), 4), "old_gains": old, "new_gains": new,
                       "margin": cfg.promote_margin}
        if _mean(new) > _mean(old) + cfg.promote_margin:
            rnd.decision = "promoted"
            rnd.reason = f"held-out gain {_mean(new):+.3f} beats {_mean(old):+.3f} by more than {cfg.promote_margin}"
        else:
            rnd.decision = "kept"
            rnd.reason = (f"held-out gain {_mean(new):+.3f} does not beat the current policy's "
                          f"{_mean(old):+.3f} by more than {cfg.promote_margin}")
    rnd.seconds = round(time.perf_counter() - t_start, 2)
    return rnd


def _reward(domain: Domain, model, ctx, si: int, completion: str, before: Callable[[Any], float],
            settings: Settings) -> dict[str, Any]:
    cfg = settings.restem
    row: dict[str, Any] = {"context": ctx.id, "sample": si, "before": None, "after": None, "gain": None,
                           "forgetting": None, "proxy": None, "reward": None, "seconds_train": None}
    if cfg.reward in ("proxy", "both"):
        row["proxy"] = round(domain.proxy(ctx, completion), 4)
    if cfg.reward in ("train", "both"):
        t0 = time.perf_counter()
        b = before(ctx)  # on `model` itself, before any update is put on it
        update = domain.parse(ctx, completion)
        after, forgot = [], []
        for s in range(cfg.seeds):
            with domain.apply(model, update, settings.seed * 1000 + s) as candidate:
                after.append(domain.score(candidate, ctx))
                if cfg.retention_penalty > 0:
                    f = domain.forgetting(model, candidate, ctx)
                    if f is not None:
                        forgot.append(f)
        gain = _mean(after) - b
        row.update(before=round(b, 4), after=[round(a, 4) for a in after], gain=round(gain, 4),
                   seconds_train=round(time.perf_counter() - t0, 2))
        penalty = cfg.retention_penalty * _mean(forgot) if forgot else 0.0
        row["forgetting"] = round(_mean(forgot), 4) if forgot else None
        row["reward"] = round(gain - penalty, 4)
    else:
        row["reward"] = row["proxy"]
    return row


def _heldout_gains(domain: Domain, model, contexts: list[Any], adapter: Path | None,
                   before: Callable[[Any], float], settings: Settings) -> list[float]:
    """Per held-out context: the gain of one self-edit written with `adapter`
    (same sampling seed for every policy compared, so the comparison is paired)."""
    gains = []
    for hi, ctx in enumerate(contexts):
        b = before(ctx)  # on `model` itself: inside apply() it would carry the update
        with policy_adapter(model, adapter) as writer:
            [completion] = domain.sample(writer, ctx, 1, settings.seed * 104729 + hi)
        update = domain.parse(ctx, completion)
        with domain.apply(model, update, settings.seed) as candidate:
            gains.append(round(domain.score(candidate, ctx) - b, 4))
    return gains


def _sft(model, tokenizer, pairs: list[Example], settings: Settings, current_adapter: Path | None,
         work_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Behaviour-clone the winners: continue the current policy adapter (or a
    fresh LoRA) on prompt -> winning self-edit, loss on the self-edit only."""
    from peft import PeftModel

    cfg = settings.restem
    if current_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(current_adapter), is_trainable=True)
    else:
        lora = dataclasses.replace(settings.lora, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0)
        peft_model = attach_lora(model, lora, seed=settings.seed)
    recipe = dataclasses.replace(settings.train, epochs=cfg.epochs, lr=cfg.lr, loss_on="completion",
                                 pack_tokens=0, batch_size=1, seed=settings.seed)
    try:
        stats = train(peft_model, tokenizer, pairs, recipe, compute_dtype=settings.train_dtype, append_eos=True)
        out = work_dir / "candidate"
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out))
    finally:
        peft_model.unload()
    return out, {"pairs": len(pairs), "continued_from_adapter": current_adapter is not None,
                 "epochs": cfg.epochs, "lr": cfg.lr, **stats.as_dict()}
