"""Few-shot tasks (ARC) as a ReSTEM domain (the paper's second domain).

A context is a task. A self-edit is the recipe the policy writes for it
(arc/writing.py); applying it is test-time training on the task's
demonstrations as the recipe says (arc/ttt.py). The reward is the paper's:
whether the trained model solves a demonstration it was not trained on. The
last demonstration is held out of the training and asked; the task's test
inputs and outputs are never used, so a refresh may run on tasks whose
answers nobody knows (the ones the daemon was given).

Nothing an ARC update does stays in the weights, so there is nothing to
forget: `forgetting` is None.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..arc import recipe as recipes
from ..arc import ttt
from ..arc.grids import Task, check
from ..arc.writing import RecipePolicy, recipe_prompt, sample_recipes
from ..config import Config
from ..memory.skills import task_json

log = logging.getLogger(__name__)


def context_id(task: Task) -> str:
    """A task's context id, from its content: the same task is the same context
    whichever file (or inbox drop) it came from, and two tasks that share a name
    are not confused."""
    return "arc:" + hashlib.sha256(task_json(task).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ArcContext:
    id: str  # context_id (stable across rounds: the held-out split keys on it)
    title: str
    task: Task
    source: str  # file name, or "inbox"
    recency: int = 0

    @property
    def held_out(self) -> Task:
        return ttt.held_out(self.task)


def contexts(tasks: list[Task], source: str, tokenizer, context: int | None,
             use_chat: bool = True) -> tuple[list[ArcContext], list[dict[str, str]]]:
    """The tasks that can be contexts, and why the others cannot (one
    demonstration only, or a held-out view over the model's context)."""
    out, refused = [], []
    for task in tasks:
        try:
            ttt.check_fits(ttt.held_out(task), tokenizer, context, use_chat)
        except ValueError as e:
            refused.append({"task": task.id, "source": source, "reason": str(e)})
            continue
        out.append(ArcContext(context_id(task), task.id, task, source))
    return out, refused


@dataclass(frozen=True)
class ArcUpdate:
    parsed: recipes.Parsed  # the recipe, or why there is none
    task: Task  # what it trains on: the context's held-out view


class ArcDomain:
    name = "arc"

    def __init__(self, cfg: Config, tokenizer, policy: RecipePolicy):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.policy = policy
        self.use_chat = cfg.model.use_chat_template

    def portable(self) -> ArcDomain:
        """As a pool's worker gets it: as it is (nothing of this machine's in it)."""
        return self

    def prompt(self, ctx: ArcContext) -> str:
        # The whole task, as `solve` shows it: the policy is trained on the prompts it will see.
        return recipe_prompt(self.policy, self.tokenizer, ctx.task, self.use_chat)

    def sample(self, model, ctx: ArcContext, k: int, seed: int) -> list[str]:
        return sample_recipes(model, self.tokenizer, self.policy, ctx.task, k, use_chat=self.use_chat, seed=seed)

    def parse(self, ctx: ArcContext, completion: str) -> ArcUpdate:
        return ArcUpdate(recipes.parse(completion), ctx.held_out)

    @contextlib.contextmanager
    def apply(self, model, update: ArcUpdate, seed: int) -> Iterator[Any]:
        """Trained on the held-out view's demonstrations. A refused recipe trains
        nothing; one whose training passes `arc.budget_s` counts as untrained."""
        try:
            with ttt.adapted(model, self.tokenizer, update.task, update.parsed.recipe, self.cfg.lora,
                             self.cfg.train, use_chat=self.use_chat, seed=seed,
                             budget_s=self.cfg.arc.budget_s) as (adapted, _stats):
                yield adapted
                return
        except ttt.OverBudget as e:
            log.info("ReSTEM ARC candidate untrained: %s", e)
        yield model

    def score(self, model, ctx: ArcContext) -> float:
        """1 when the held-out demonstration is answered exactly, else 0."""
        held = ctx.held_out
        [answer] = ttt.answer(model, self.tokenizer, held, self.use_chat)
        return float(check(answer, held.solutions[0]).correct)

    def forgetting(self, model, candidate, ctx: ArcContext) -> float | None:
        return None

    def proxy(self, ctx: ArcContext, completion: str) -> float:
        """1 for a recipe that parses, else 0 (no training)."""
        return float(recipes.parse(completion).recipe is not None)

    def describe(self, ctx: ArcContext, completion: str) -> dict[str, Any]:
        parsed = recipes.parse(completion)
        return {"chars": len(completion), "text": completion,
                "recipe": dataclasses.asdict(parsed.recipe) if parsed.recipe else None, "refused": parsed.reason}
