"""The paper's second domain, few-shot abstract reasoning (ARC): grids as text
and the exact-match check (grids.py), the augmentations a recipe chooses from
with their inverses (augment.py), the JSON recipe the model writes as its
self-edit and its schema (recipe.py), all pure logic; the recipe policy and
sampling recipes (writing.py); and test-time training on a task as a recipe
says (ttt.py, the inner loop of model/). Storage, ReSTEM and the verbs are
above: memory/skills.py, learning/skills.py, restem/arc.py, evaluation/arc.py.
Imports errors, config and model/ only."""
