"""ReSTEM: one refresh of the self-edit policy (rejection sampling + SFT).

The loop is domain-generic. A domain (knowledge incorporation is the first,
`knowledge.py`; ARC tasks with recipe self-edits, `arc.py`, the second) says how to
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import LoraConfig, RestemConfig, TrainConfig
from ..learning.self_edit import policy_adapter
from ..model.inner_loop import Example, attach_lora, train
from ..progress import Progress, no_progress


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

    def portable(self) -> Domain:
        """The domain as a worker of a pool gets it (pickled: nothing tied to this process)."""


# -- training candidates: here, or on a pool of workers ---------------------------

@dataclass(frozen=True)
class Job:
    """One inner loop: a self-edit applied with one seed, then scored."""

    context: Any
    completion: str
    seed: int
    forgetting: bool = False  # also measure what the update forgot (retention penalty)


@dataclass(frozen=True)
class Outcome:
    score: float
    forgetting: float | None
    seconds: float
    worker: str  # who ran it ("local", or a pool's worker)


def run_job(domain: Domain, model, job: Job) -> tuple[float, float | None]:
    """What every executor does with a job, on its own copy of the weights: the
    update is put on `model` and taken off again."""
    update = domain.parse(job.context, job.completion)
    with domain.apply(model, update, job.seed) as candidate:
        score = domain.score(candidate, job.context)
        forgot = domain.forgetting(model, candidate, job.context) if job.forgetting else None
    return score, forgot


class Executor(Protocol):
    def run(self, jobs: list[Job]) -> list[Outcome]:
        """Every job's outcome, in the order given (a failed job is rerun or raises)."""


class LocalExecutor:
    """The jobs one after another on the round's scratch model."""

    def __init__(self, domain: Domain, model):
        self.domain, self.model = domain, model

    def run(self, jobs: list[Job]) -> list[Outcome]:
        out = []
        for job in jobs:
            t0 = time.perf_counter()
            score, forgot = run_job(self.domain, self.model, job)
            out.append(Outcome(score, forgot, round(time.perf_counter() - t0, 2), "local"))
        return out


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

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Adds the time spent in the block to `stage_seconds[name]`."""
        t0 = time.perf_counter()
        yield
        self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + time.perf_counter() - t0, 2)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("candidate")
        trained = [r for r in self.rewards if r.get("seconds_train") is not None]
        d["seconds_per_candidate"] = (
            round(sum(r["seconds_train"] for r in trained) / len(trained), 2) if trained else None)
        return d


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


# -- the decisions (pure) -----------------------------------------------------

def best_of_k(rewards: list[dict[str, Any]], min_reward: float) -> dict[str, Any] | None:
    """The winner among one context's samples: the highest reward above `min_reward`
    (the first of equals); None when no reward is above it."""
    improving = [r for r in rewards if r["reward"] is not None and r["reward"] > min_reward]
    return max(improving, key=lambda r: r["reward"]) if improving else None


def promotion(old: float, new: float, margin: float) -> tuple[str, str]:
    """Decision and reason from the held-out mean gains of the current policy (`old`)
    and the candidate (`new`): promoted only if `new` beats `old` by more than `margin`."""
    if new > old + margin:
        return "promoted", f"held-out gain {new:+.3f} beats {old:+.3f} by more than {margin}"
    return "kept", (f"held-out gain {new:+.3f} does not beat the current policy's "
                    f"{old:+.3f} by more than {margin}")


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


def refresh(domain: Domain, model, tokenizer, train_contexts: list[Any], heldout_contexts: list[Any],
            settings: Settings, current_adapter: Path | None, work_dir: Path, *,
            should_stop: Callable[[], bool] = lambda: False, progress: Progress = no_progress,
            sampler=None, executor: Executor | None = None) -> Round:
    """One ReSTEM round on `model` (a scratch copy: updates are put on and taken off it).
    `sampler`: what writes the self-edits (a decoding engine on `model`'s weights,
    engine.generate); `model` itself when None. `executor`: where the candidates are
    trained and scored (a pool of workers, each with its own copy of `model`'s
    weights); on `model` itself, one after another, when None."""
    sampler = model if sampler is None else sampler
    cfg = settings.restem
    t_start = time.perf_counter()
    rnd = Round(contexts=[{"id": c.id, "title": c.title} for c in train_contexts],
                heldout_contexts=[{"id": c.id, "title": c.title} for c in heldout_contexts])
    executor = _Timed(LocalExecutor(domain, model) if executor is None else executor, rnd)
    train_ids = {c.id for c in train_contexts}
    if train_ids & {c.id for c in heldout_contexts}:  # select() never does this; a caller might
        raise ValueError("a held-out context is also a training context")
    before = _scores_before(domain, model)

    pairs = _winning_pairs(rnd, domain, executor, sampler, train_contexts, settings, current_adapter, before,
                           should_stop, progress)
    rnd.proxy_agreement = _agreement(rnd.rewards)
    if not pairs:
        rnd.decision, rnd.reason = "kept", (
            "no training contexts" if not train_contexts else
            f"no self-edit's reward exceeded {cfg.min_reward}: nothing to learn from")
    elif not heldout_contexts:
        rnd.decision, rnd.reason = "kept", "no held-out contexts to test a new policy on"
    else:
        with rnd.stage("sft"):
            progress("sft", {"pairs": len(pairs)})
            rnd.candidate, rnd.sft = _sft(model, tokenizer, pairs, settings, current_adapter, work_dir)
        with rnd.stage("heldout"):
            progress("heldout", {"contexts": len(heldout_contexts)})
            old = _heldout_gains(domain, executor, sampler, heldout_contexts, current_adapter, before, settings)
            new = _heldout_gains(domain, executor, sampler, heldout_contexts, rnd.candidate, before, settings)
        rnd.heldout = {"contexts": [c.id for c in heldout_contexts],
                       "before": [round(before(c), 4) for c in heldout_contexts], "old": round(_mean(old), 4),
                       "new": round(_mean(new), 4), "old_gains": old, "new_gains": new,
                       "margin": cfg.promote_margin}
        rnd.decision, rnd.reason = promotion(_mean(old), _mean(new), cfg.promote_margin)
    rnd.seconds = round(time.perf_counter() - t_start, 2)
    return rnd


@dataclass
class _Timed:
    """An executor whose runs add up in the round's "candidates" stage: the wall
    time of its jobs as the round sees it (dispatch and results included), apart
    from this process's own sampling and scoring."""

    executor: Executor
    rnd: Round

    def run(self, jobs: list[Job]) -> list[Outcome]:
        with self.rnd.stage("candidates"):
            return self.executor.run(jobs)


def _scores_before(domain: Domain, model) -> Callable[[Any], float]:
    """A context's score on `model` untouched, measured once per round."""
    cache: dict[str, float] = {}

    def before(ctx) -> float:
        if ctx.id not in cache:
            cache[ctx.id] = domain.score(model, ctx)
        return cache[ctx.id]

    return before


def _winning_pairs(rnd: Round, domain: Domain, executor: Executor, sampler, contexts: list[Any], settings: Settings,
                   current_adapter: Path | None, before: Callable[[Any], float], should_stop: Callable[[], bool],
                   progress: Progress) -> list[Example]:
    """Per training context, until `should_stop`: the winning self-edit (best-of-k) as a
    (prompt -> self-edit) pair to train the policy on. Samples, rewards and winners go into `rnd`."""
    pairs: list[Example] = []
    for ci, ctx in enumerate(contexts):
        if should_stop():
            rnd.stopped_early = f"stopped after {ci} of {len(contexts)} contexts: documents are waiting"
            rnd.contexts = rnd.contexts[:ci]
            break
        progress("context", {"index": ci, "total": len(contexts), "title": ctx.title})
        completions, rows = _sample_and_reward(rnd, domain, executor, sampler, ctx, ci, settings,
                                               current_adapter, before)
        best = best_of_k(rows, settings.restem.min_reward)
        if best is not None:
            rnd.winners.append({"context": ctx.id, "sample": best["sample"], "reward": best["reward"]})
            pairs.append(Example(domain.prompt(ctx), completions[best["sample"]]))
        progress("rewarded", {"index": ci, "rewards": [r["reward"] for r in rows], "winner": best is not None})
    return pairs


def _sample_and_reward(rnd: Round, domain: Domain, executor: Executor, sampler, ctx, ci: int, settings: Settings,
                       current_adapter: Path | None, before: Callable[[Any], float],
                       ) -> tuple[list[str], list[dict[str, Any]]]:
    """k self-edits for the `ci`-th context, written with the current policy, and their rewards."""
    with rnd.stage("sample"), policy_adapter(sampler, current_adapter) as writer:
        completions = domain.sample(writer, ctx, settings.restem.samples, settings.seed * 7919 + ci)
    for si, completion in enumerate(completions):
        rnd.samples.append({"context": ctx.id, "sample": si, **domain.describe(ctx, completion)})
    with rnd.stage("reward"):
        cfg = settings.restem
        trained = cfg.reward in ("train", "both")
        b = before(ctx) if trained else None  # on `model` itself, before any update is put on it
        jobs = [Job(ctx, c, settings.seed * 1000 + s, cfg.retention_penalty > 0)
                for c in completions for s in range(cfg.seeds)] if trained else []
        outcomes = executor.run(jobs)  # every sample's seeds at once: a pool trains them side by side
        rows = [_reward(domain, ctx, si, c, b, outcomes[si * cfg.seeds:(si + 1) * cfg.seeds], settings)
                for si, c in enumerate(completions)]
    rnd.rewards.extend(rows)
    return completions, rows


def _reward(domain: Domain, ctx, si: int, completion: str, before: float | None, outcomes: list[Outcome],
            settings: Settings) -> dict[str, Any]:
    """A sample's reward row from its seeds' outcomes (none: the proxy reward only)."""
    cfg = settings.restem
    row: dict[str, Any] = {"context": ctx.id, "sample": si, "before": None, "after": None, "gain": None,
                           "forgetting": None, "proxy": None, "reward": None, "seconds_train": None}
    if cfg.reward in ("proxy", "both"):
        row["proxy"] = round(domain.proxy(ctx, completion), 4)
    if before is not None:
        after = [o.score for o in outcomes]
        forgot = [o.forgetting for o in outcomes if o.forgetting is not None]
        gain = _mean(after) - before
        row.update(before=round(before, 4), after=[round(a, 4) for a in after], gain=round(gain, 4),
                   seconds_train=round(sum(o.seconds for o in outcomes), 2),
                   workers=sorted({o.worker for o in outcomes}))
        penalty = cfg.retention_penalty * _mean(forgot) if forgot else 0.0
        row["forgetting"] = round(_mean(forgot), 4) if forgot else None
        row["reward"] = round(gain - penalty, 4)
    else:
        row["reward"] = row["proxy"]
    return row


def _heldout_gains(domain: Domain, executor: Executor, sampler, contexts: list[Any], adapter: Path | None,
                   before: Callable[[Any], float], settings: Settings) -> list[float]:
    """Per held-out context: the gain of one self-edit written with `adapter`
    (same sampling seed for every policy compared, so the comparison is paired)."""
    jobs = []
    for hi, ctx in enumerate(contexts):
        with policy_adapter(sampler, adapter) as writer:
            [completion] = domain.sample(writer, ctx, 1, settings.seed * 104729 + hi)
        jobs.append(Job(ctx, completion, settings.seed))
    outcomes = executor.run(jobs)  # all held-out contexts side by side on a pool
    # before: on the untouched weights (inside apply() they would carry the update)
    return [round(o.score - before(ctx), 4) for o, ctx in zip(outcomes, contexts)]


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
