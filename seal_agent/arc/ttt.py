"""Test-time training on an ARC task, as a recipe says (the paper's inner loop
for its second domain).

From the demonstrations alone, each one in turn is held out and answered from
the others (leave-one-out), in its plain form and under each augmentation the
recipe turns on. A LoRA is trained on those sequences with the recipe's
learning rate, epochs and loss, by the knowledge domain's own inner loop, and
the adapted model answers each test input greedily. A sequence longer than
`train.max_length` is left out rather than cut (a cut sequence would teach a
grid without its end), and a test input whose prompt and answer cannot fit the
model's context is refused with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..config import LoraConfig, TrainConfig
from ..model.generation import Sampling, complete, render_prompt
from ..model.inner_loop import Example, train_adapter
from . import augment
from .grids import Grid, Pair, Task, check, decode, encode, prompt_text, shape
from .recipe import Recipe

SYSTEM = "Each input grid is turned into its output grid by the same rule. Answer with the output grid only."


def render(tokenizer, demonstrations: tuple[Pair, ...], test_input: Grid, use_chat: bool) -> str:
    text = prompt_text(demonstrations, test_input)
    return render_prompt(tokenizer, system=SYSTEM, user=text, base=text, use_chat=use_chat)


def examples(task: Task, recipe: Recipe, tokenizer, use_chat: bool) -> list[Example]:
    """The leave-one-out sequences, plain and under the recipe's augmentations."""
    augmentations = augment.chosen(recipe.basic, recipe.size, recipe.chain, recipe.repeat)
    out = []
    for shown, held in augment.leave_one_out(task):
        for *s, h in [(*shown, held), *augment.augment_pairs((*shown, held), augmentations)]:
            out.append(Example(render(tokenizer, tuple(s), h.input, use_chat), encode(h.output)))
    return list(dict.fromkeys(out))  # a symmetric grid makes some views the same sequence


def answer_tokens(task: Task) -> int:
    """Room for an answer: the largest demonstration output's text, twice over (an
    output may be larger than any shown), at most a 30x30 grid's."""
    largest = max(len(encode(p.output)) for p in task.train)
    return min(2 * largest + 8, 30 * 31 + 8)


def held_out(task: Task) -> Task:
    """The task as ReSTEM's reward sees it: its last demonstration becomes the one
    test input, with its output as the solution, and the others are the
    demonstrations. The real test inputs (and any test outputs) are not in it."""
    if len(task.train) < 2:
        raise ValueError(f"task {task.id}: one demonstration, none left to hold out")
    *shown, held = task.train
    return Task(task.id, tuple(shown), (held.input,), (held.output,))


class OverBudget(Exception):
    """Test-time training ran past its time budget (and was stopped)."""


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def check_fits(task: Task, tokenizer, context: int | None, use_chat: bool = True) -> None:
    """Raises ValueError, saying why, when a test input's prompt and room for its
    answer are over the model's context."""
    if context is None:
        return
    room = answer_tokens(task)
    for g in task.test:
        n = _tokens(tokenizer, render(tokenizer, task.train, g, use_chat))
        if n + room > context:
            raise ValueError(f"task {task.id}: a {shape(g)[0]}x{shape(g)[1]} test input's prompt takes "
                             f"{n} tokens and its answer up to {room}: over the model's {context}")


@contextlib.contextmanager
def adapted(model, tokenizer, task: Task, recipe: Recipe | None, lora: LoraConfig, train: TrainConfig, *,
            use_chat: bool = True, seed: int = 0, budget_s: float | None = None) -> Iterator[tuple[Any, dict]]:
    """`model` test-time trained on `task`'s demonstrations as `recipe` says, with
    what the training did; the adapter is taken off on exit. No recipe, or no
    sequence that fits `train.max_length`: `model` itself, untrained. Past
    `budget_s` seconds of training, OverBudget (and `model` is left as it was)."""
    every = examples(task, recipe, tokenizer, use_chat) if recipe is not None else []
    fitting = [e for e in every if _tokens(tokenizer, e.text) <= train.max_length]
    stats: dict[str, Any] = {"sequences": len(fitting), "left_out_too_long": len(every) - len(fitting)}
    if recipe is not None:
        stats.update(lr=recipe.lr, epochs=recipe.epochs, loss_on=recipe.loss_on)
    if not fitting:
        yield model, stats
        return
    t0 = time.perf_counter()

    def on_step(step: int, total: int, loss: float) -> None:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            raise OverBudget(f"test-time training passed its {budget_s:g} s budget at step {step} of {total}")

    recipe_train = dataclasses.replace(train, lr=recipe.lr, epochs=recipe.epochs, loss_on=recipe.loss_on)
    peft_model, trained = train_adapter(model, tokenizer, fitting, lora, recipe_train, seed=seed,
                                        append_eos=True, on_step=on_step)
    stats.update(steps=trained.steps, final_loss=trained.final_loss, train_seconds=round(trained.seconds, 2))
    try:
        yield peft_model, stats
    finally:
        peft_model.unload()


def answer(model, tokenizer, task: Task, use_chat: bool = True) -> list[str]:
    """Greedy answers to the task's test inputs, from its demonstrations in context."""
    prompts = [render(tokenizer, task.train, g, use_chat) for g in task.test]
    # a blank line ends the grid (grids.decode reads no further): decoding stops there
    done = complete(model, tokenizer, prompts, Sampling(max_new_tokens=answer_tokens(task), stop=("\n\n",)),
                    batch_size=len(prompts))
    return [c.text for c in done]


def vote(model, tokenizer, task: Task, answers: list[str], use_chat: bool = True,
         ) -> tuple[list[str], list[dict[str, Any]]]:
    """Each test input answered again under every basic view (the task rotated,
    flipped, transposed: demonstrations and input alike), each answer mapped back,
    and the most common grid taken; on a tie, the plain answer's, if it is among
    the most common. Returns the answers (a voted grid as its text) and, per test
    input, each view's grid (None: not a grid)."""
    views = [(a, Task(task.id, tuple(Pair(a(p.input), a(p.output)) for p in task.train),
                      tuple(a(g) for g in task.test))) for a in augment.BASIC]
    polls: list[dict[str, Any]] = [{"plain": decode(a).grid} for a in answers]
    for aug, view in views:
        for poll, text in zip(polls, answer(model, tokenizer, view, use_chat)):
            g = decode(text).grid
            poll[aug.name] = aug.undo(g) if g is not None else None
    voted = [plain if (best := majority(poll)) is None else encode(best) for plain, poll in zip(answers, polls)]
    return voted, [{k: (list(map(list, g)) if g is not None else None) for k, g in p.items()} for p in polls]


def majority(poll: dict[str, Grid | None]) -> Grid | None:
    """The most common grid of a poll (view name -> grid; "plain" the unaugmented
    answer's); on a tie the plain one if it is among the most common, else the
    first view's in order. None: no view gave a grid."""
    counts: dict[Grid, int] = {}
    for g in poll.values():
        if g is not None:
            counts[g] = counts.get(g, 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    plain = poll.get("plain")
    return plain if counts.get(plain) == top else next(g for g, n in counts.items() if n == top)


def verdicts(task: Task, answers: list[str]) -> list[dict[str, Any]] | None:
    if task.solutions is None:
        return None
    return [dataclasses.asdict(check(a, gold)) for a, gold in zip(answers, task.solutions)]


@dataclass
class Solved:
    outputs: list[Grid | None]  # per test input: the answer's grid (None: not a grid)
    answers: list[str]  # what the model wrote
    verdicts: list[dict[str, Any]] | None  # per test input, where the solution is known
    train: dict[str, Any]  # sequences, left out, loss, seconds
    seconds: float
    votes: list[dict[str, Any]] | None = None  # per test input, each view's grid (when voting)

    @property
    def solved(self) -> bool | None:
        """Every test input answered right (None: no solutions to check against)."""
        return None if self.verdicts is None else all(v["correct"] for v in self.verdicts)


def solve(model, tokenizer, task: Task, recipe: Recipe | None, lora: LoraConfig, train: TrainConfig, *,
          use_chat: bool = True, seed: int = 0, context: int | None = None, budget_s: float | None = None,
          keep: Callable[[Any], None] | None = None, voting: bool = False) -> Solved:
    """Train on the task's demonstrations as `recipe` says, answer its test inputs,
    and take the adapter off again (`model` is left exactly as it was). No recipe:
    the demonstrations in context only (the paper's ICL condition). `keep(adapted)`
    is called with the trained model before its adapter is taken off (to save it).
    `voting`: the answers voted over the basic views (`vote`)."""
    t0 = time.perf_counter()
    check_fits(task, tokenizer, context, use_chat)
    with adapted(model, tokenizer, task, recipe, lora, train, use_chat=use_chat, seed=seed,
                 budget_s=budget_s) as (m, stats):
        answers = answer(m, tokenizer, task, use_chat)
        polls = None
        if voting:
            answers, polls = vote(m, tokenizer, task, answers, use_chat)
        if keep is not None and m is not model:
            keep(m)
    return Solved([decode(a).grid for a in answers], answers, verdicts(task, answers), stats,
                  round(time.perf_counter() - t0, 2), polls)
