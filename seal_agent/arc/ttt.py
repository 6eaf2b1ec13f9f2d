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

import dataclasses
import time
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


@dataclass
class Solved:
    outputs: list[Grid | None]  # per test input: the answer's grid (None: not a grid)
    answers: list[str]  # what the model wrote
    verdicts: list[dict[str, Any]] | None  # per test input, where the solution is known
    train: dict[str, Any]  # sequences, left out, loss, seconds
    seconds: float


def solve(model, tokenizer, task: Task, recipe: Recipe | None, lora: LoraConfig, train: TrainConfig, *,
          use_chat: bool = True, seed: int = 0, context: int | None = None) -> Solved:
    """Train on the task's demonstrations as `recipe` says, answer its test inputs,
    and take the adapter off again (`model` is left exactly as it was). No recipe:
    the demonstrations in context only (the paper's ICL condition)."""
    t0 = time.perf_counter()
    every = examples(task, recipe, tokenizer, use_chat) if recipe is not None else []

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])

    fitting = [e for e in every if tokens(e.text) <= train.max_length]
    stats_out: dict[str, Any] = {"sequences": len(fitting), "left_out_too_long": len(every) - len(fitting)}
    if recipe is not None:
        stats_out.update(lr=recipe.lr, epochs=recipe.epochs, loss_on=recipe.loss_on)
    room = answer_tokens(task)
    prompts = [render(tokenizer, task.train, g, use_chat) for g in task.test]
    for g, p in zip(task.test, prompts):
        if context is not None and tokens(p) + room > context:
            raise ValueError(f"task {task.id}: a {shape(g)[0]}x{shape(g)[1]} test input's prompt takes "
                             f"{tokens(p)} tokens and its answer up to {room}: over the model's {context}")
    adapted = None
    if fitting:
        recipe_train = dataclasses.replace(train, lr=recipe.lr, epochs=recipe.epochs, loss_on=recipe.loss_on)
        adapted, stats = train_adapter(model, tokenizer, fitting, lora, recipe_train, seed=seed, append_eos=True)
        stats_out.update(final_loss=stats.final_loss, train_seconds=round(stats.seconds, 2))
    try:
        # a blank line ends the grid (grids.decode reads no further): decoding stops there
        done = complete(adapted if adapted is not None else model, tokenizer, prompts,
                        Sampling(max_new_tokens=room, stop=("\n\n",)), batch_size=len(prompts))
    finally:
        if adapted is not None:
            adapted.unload()
    answers = [c.text for c in done]
    verdicts = None
    if task.solutions is not None:
        verdicts = [dataclasses.asdict(check(a, gold)) for a, gold in zip(answers, task.solutions)]
    return Solved([decode(a).grid for a in answers], answers, verdicts, stats_out,
                  round(time.perf_counter() - t0, 2))
