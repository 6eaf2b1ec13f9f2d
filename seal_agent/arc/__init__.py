"""The paper's second domain, few-shot abstract reasoning (ARC), as far as it is
built: grids as text and the exact-match check (grids.py), the augmentations a
recipe chooses from with their inverses (augment.py), the JSON recipe the model
writes as its self-edit (recipe.py), all pure logic; and test-time training on
a task as a recipe says (ttt.py, the inner loop of model/). The `solve` and
`eval arc` verbs, the ARC policy and ReSTEM on this domain are issue 21's next
steps. Imports errors, config and model/ only."""
