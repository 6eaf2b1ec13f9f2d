"""The paper's second domain, few-shot abstract reasoning (ARC), as far as it is
built: grids as text and the exact-match check (grids.py), the augmentations a
recipe chooses from with their inverses (augment.py), and the JSON recipe the
model writes as its self-edit (recipe.py). Pure logic; imports only errors.
Test-time training, `solve`, `eval arc` and ReSTEM on this domain are issue 21's
next steps."""
