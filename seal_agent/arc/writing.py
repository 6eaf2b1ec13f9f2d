"""The model writes an ARC task's recipe (its self-edit), prompted by the recipe
policy (`policies/arc-recipe.toml`, the SEAL authors' prompt).

With `constrained = true` (the shipped policy) decoding is held to the
recipe's JSON schema, so every sample that ends is a recipe: the model
chooses the values, not the syntax. SmolLM2-135M wrote no valid recipe
unconstrained (BENCHMARKS.md), which left ReSTEM nothing to reward.
"""

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
    sampling: Sampling  # with the recipe's schema when the policy is constrained
    attempts: int  # samples until one parses

    @property
    def constrained(self) -> bool:
        return self.sampling.json_schema is not None


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
                              temperature=float(s.get("temperature", 1.0)), top_p=float(s.get("top_p", 0.95)),
                              json_schema=recipes.SCHEMA if _flag(s.get("constrained", False), path) else None),
            attempts=max(1, int(s.get("attempts", 3))),
        )
        policy.user.format(task="")
    except KeyError as e:
        raise PolicyError(f"{path}: field {e} is missing, or a placeholder other than {{task}} is used") from None
    except (TypeError, ValueError) as e:
        raise PolicyError(f"{path}: {e}") from None
    return policy


def _flag(value, path: Path) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{path}: sampling.constrained must be true or false, not {value!r}")
    return value


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
    texts: list[str] = []
    parsed = recipes.Parsed(None, "no sample")
    for i in range(policy.attempts):
        [text] = sample_recipes(model, tokenizer, policy, task, 1, use_chat=use_chat, seed=seed + i)
        texts.append(text)
        parsed = recipes.parse(text)
        if parsed.recipe is not None:
            break
    return Written(tuple(texts), parsed)


def sample_recipes(model, tokenizer, policy: RecipePolicy, task: Task, k: int, *, use_chat: bool = True,
                   seed: int = 0) -> list[str]:
    """k samples of the recipe prompt, drawn in one batch (ReSTEM's candidates)."""
    prompt = recipe_prompt(policy, tokenizer, task, use_chat)
    return generate(model, tokenizer, [prompt] * k, policy.sampling, seed=seed, batch_size=k)
