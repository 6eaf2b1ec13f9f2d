"""The model writes an ARC task's recipe (its self-edit), prompted by the recipe
policy (`policies/arc-recipe.toml`, the SEAL authors' prompt)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicyError
from ..model.generation import Sampling, generate, render_prompt
from . import recipe as recipes
from .grids import Task, prompt_text


@dataclass(frozen=True)
class RecipePolicy:
    name: str
    system: str
    user: str  # with {task}
    sampling: Sampling
    attempts: int  # samples until one parses


def load_recipe_policy(path: Path) -> RecipePolicy:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot be read as TOML: {e}") from None
    if data.get("domain") != "arc":
        raise PolicyError(f"{path}: not an ARC recipe policy (it needs domain = \"arc\")")
    s = data.get("sampling", {})
    try:
        policy = RecipePolicy(
            name=str(data["name"]), system=str(data["system"]), user=str(data["user"]),
            sampling=Sampling(max_new_tokens=int(s.get("max_new_tokens", 160)),
                              temperature=float(s.get("temperature", 1.0)), top_p=float(s.get("top_p", 0.95))),
            attempts=max(1, int(s.get("attempts", 3))),
        )
        policy.user.format(task="")
    except KeyError as e:
        raise PolicyError(f"{path}: field {e} is missing, or a placeholder other than {{task}} is used") from None
    except (TypeError, ValueError) as e:
        raise PolicyError(f"{path}: {e}") from None
    return policy


def recipe_prompt(policy: RecipePolicy, tokenizer, task: Task, use_chat: bool) -> str:
    user = policy.user.format(task=prompt_text(task.train, task.test[0]).rstrip())
    return render_prompt(tokenizer, system=policy.system, user=user, base=user + "\n", use_chat=use_chat)


@dataclass(frozen=True)
class Written:
    texts: tuple[str, ...]  # every sample, the last the one used
    parsed: recipes.Parsed  # of the last: a recipe, or why none


def write_recipe(model, tokenizer, policy: RecipePolicy, task: Task, *, use_chat: bool = True,
                 seed: int = 0) -> Written:
    """Samples until one parses as a recipe (at most `policy.attempts`)."""
    prompt = recipe_prompt(policy, tokenizer, task, use_chat)
    texts: list[str] = []
    parsed = recipes.Parsed(None, "no sample")
    for i in range(policy.attempts):
        [text] = generate(model, tokenizer, [prompt], policy.sampling, seed=seed + i)
        texts.append(text)
        parsed = recipes.parse(text)
        if parsed.recipe is not None:
            break
    return Written(tuple(texts), parsed)
