"""The ARC domain's pure parts: grids as text and the exact-match check, the
augmentations and their inverses, the JSON recipe (on the real ARC tasks of
../shared/data/arc/)."""

import pytest
from conftest import SHARED_DATA

from seal_agent.arc import augment, recipe
from seal_agent.arc.grids import GridError, Pair, Task, check, decode, encode, grid, load_tasks, prompt_text

ARC = SHARED_DATA / "arc"
EVAL = (ARC / "arc-agi_evaluation_challenges_filtered_1B_eval_set.json",
        ARC / "arc-agi_evaluation_solutions_filtered_1B_eval_set.json")
TRAIN = (ARC / "arc-agi_training_challenges_filtered_1B_training_set.json",
         ARC / "arc-agi_training_solutions_filtered_1B_training_set.json")


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return load_tasks(*EVAL) + load_tasks(*TRAIN)


def test_the_real_tasks_load_and_every_grid_survives_encoding(tasks):
    assert len(tasks) == 22 and all(t.solutions and len(t.solutions) == len(t.test) for t in tasks)
    for t in tasks:
        for g in [p.input for p in t.train] + [p.output for p in t.train] + list(t.test) + list(t.solutions):
            assert decode(encode(g)).grid == g
    t = tasks[0]
    text = prompt_text(t.train, t.test[0])
    assert text.count("Input:\n") == len(t.train) + 1 and text.endswith("Output:\n")


def test_grids_that_break_arcs_rules_are_refused():
    for bad, why in (([], "empty"), ([[1, 2], [3]], "different lengths"), ([[10]], "0-9"),
                     ([[0] * 31], "at most 30x30"), ([["a"]], "integers")):
        with pytest.raises(GridError, match=why):
            grid(bad)


def test_an_answer_is_graded_cell_by_cell_and_a_malformed_one_says_why():
    gold = grid([[1, 2], [3, 4]])
    assert check("12\n34", gold).correct
    assert check("Output:\n12\n34\n\nThe rule is a swap.", gold).correct  # a header and an explanation around it
    assert check("Output: 12\n34", gold).correct  # the header echoed on the first row's line
    assert check("Output: the same as before", gold).reason.startswith("parse: not rows of digits")
    assert check("12\n35", gold).reason == "cells: 1 of 4 wrong"
    assert check("12\n34\n56", gold).reason == "shape: 3x2, expected 2x2"
    assert check("12\n3", gold).reason.startswith("parse: rows of different lengths")
    assert check("I think it is blue", gold).reason.startswith("parse: not rows of digits")
    assert check("", gold).reason == "parse: no grid in the answer"
    assert not check("21\n43", gold).correct


@pytest.mark.parametrize("aug", [a for family in augment.FAMILIES.values() for a in family], ids=lambda a: a.name)
def test_every_augmentation_is_undone_by_its_inverse(aug, tasks):
    for t in tasks[:6]:
        for p in t.train:
            if aug.fits(p.input):
                out = aug(p.input)
                assert aug.undo(out) == p.input
    g = grid([[1, 2, 3], [4, 5, 6]])
    assert aug(g) != g  # each changes a grid that is not symmetric


def test_augmentations_do_what_their_names_say():
    g = grid([[1, 2], [3, 4]])
    named = {a.name: a for family in augment.FAMILIES.values() for a in family}
    assert named["rotate90"](g) == ((2, 4), (1, 3))  # counter-clockwise, as numpy's rot90
    assert named["flip_updown"](g) == ((3, 4), (1, 2))
    assert named["transpose"](g) == ((1, 3), (2, 4))
    assert named["double_height"](g) == ((1, 2), (1, 2), (3, 4), (3, 4))
    assert named["tile_across"](g) == ((1, 2, 1, 2), (3, 4, 3, 4))
    assert named["rotate90+double_cells"](g) == named["double_cells"](named["rotate90"](g))
    assert [a.name for a in augment.chosen(False, False, False, True)] == ["tile_down", "tile_across", "tile_both"]
    assert len(augment.chosen(True, True, True, True)) == 6 + 3 + 6 + 3
    big = grid([[0] * 16] * 16)
    assert not named["double_cells"].fits(big) and named["rotate90"].fits(big)
    pairs = (Pair(big, big),)
    assert len(augment.augment_pairs(pairs, [named["double_cells"], named["rotate90"]])) == 1  # 32 wide left out


def test_leave_one_out_holds_out_each_demonstration_and_never_the_test(tasks):
    t = tasks[0]
    splits = augment.leave_one_out(t)
    assert len(splits) == len(t.train)
    for i, (shown, held) in enumerate(splits):
        assert held == t.train[i] and held not in shown and len(shown) == len(t.train) - 1
        assert all(p.output not in t.solutions for p in shown)


GOOD = ('{"data_generation": {"use_basic_augmentations": true, "use_size_augmentations": false, '
        '"use_chain_augmentations": false, "use_repeat_augmentations": true}, '
        '"training": {"strategy": "train_using_output_tokens", "learning_rate": 0.0001, "num_train_epochs": 3}}')


def test_a_recipe_is_parsed_clamped_or_refused_with_its_reason():
    r = recipe.parse(GOOD).recipe
    assert (r.basic, r.size, r.chain, r.repeat, r.loss_on, r.lr, r.epochs) == \
        (True, False, False, True, "completion", 1e-4, 3) and r.notes == ()
    fenced = recipe.parse("Here is the config:\n```json\n" + GOOD + "\n```")
    assert fenced.recipe == r
    wild = recipe.parse(GOOD.replace("0.0001", "1.5").replace('"num_train_epochs": 3', '"num_train_epochs": 0'))
    assert (wild.recipe.lr, wild.recipe.epochs) == (recipe.LR_RANGE[1], recipe.EPOCHS_RANGE[0])
    assert len(wild.recipe.notes) == 2 and "learning_rate 1.5" in wild.recipe.notes[0]
    for text, why in (("use basic augmentations", "no JSON object"),
                      (GOOD[:-5], "not valid JSON"),
                      (GOOD.replace('"use_size_augmentations": false, ', ""), "use_size_augmentations"),
                      (GOOD.replace("train_using_output_tokens", "train_on_vibes"), "strategy"),
                      (GOOD.replace("true", '"yes"', 1), "use_basic_augmentations"),
                      (GOOD.replace('"training"', '"extra": 1, "training"'), "extra")):
        parsed = recipe.parse(text)
        assert parsed.recipe is None and why in parsed.reason, (text, parsed.reason)


def test_test_time_training_on_a_real_task_answers_and_leaves_the_model_as_it_was(tasks, tiny_model_dir, tiny_cfg):
    import dataclasses

    from seal_agent.arc import ttt
    from seal_agent.memory.live import weights_fingerprint
    from seal_agent.model.loader import load_model, load_tokenizer

    task = next(t for t in tasks if t.id == "5582e5ca")  # three 3x3 demonstrations
    model, tokenizer = load_model(tiny_model_dir, tiny_cfg), load_tokenizer(tiny_model_dir)
    before = weights_fingerprint(model)
    basic = recipe.parse(GOOD.replace('"use_repeat_augmentations": true', '"use_repeat_augmentations": false')
                         .replace('"num_train_epochs": 3', '"num_train_epochs": 1')).recipe
    seqs = ttt.examples(task, basic, tokenizer, use_chat=True)
    # each demonstration held out once, plain and under the 6 basic views (none of them repeats another here)
    assert len(seqs) == len(task.train) * (1 + len(augment.BASIC)) == len(set(seqs))
    outputs = {encode(p.output) for p in task.train} | {encode(a(p.output)) for p in task.train for a in augment.BASIC}
    assert {s.completion for s in seqs} <= outputs
    assert all(encode(g) not in s.text for s in seqs for g in task.solutions)  # the test output is never trained on
    solved = ttt.solve(model, tokenizer, task, basic, tiny_cfg.lora, tiny_cfg.train, context=2048)
    assert solved.train["sequences"] == len(seqs) and solved.train["left_out_too_long"] == 0
    assert solved.train["lr"] == 1e-4 and solved.train["epochs"] == 1 and solved.train["loss_on"] == "completion"
    assert len(solved.answers) == len(task.test) and len(solved.verdicts) == len(task.test)
    [verdict] = solved.verdicts
    assert verdict["correct"] is False and verdict["reason"].split(":")[0] in ("parse", "shape", "cells")
    assert weights_fingerprint(model) == before
    short = dataclasses.replace(tiny_cfg.train, max_length=40)
    assert ttt.solve(model, tokenizer, task, basic, tiny_cfg.lora, short).train["left_out_too_long"] == len(seqs)
    with pytest.raises(ValueError, match="over the model's 100"):
        ttt.solve(model, tokenizer, task, basic, tiny_cfg.lora, tiny_cfg.train, context=100)


def test_solve_from_the_command_line_writes_a_recipe_trains_and_answers(tmp_path, tiny_config, tasks):
    """`seal-agent solve` on one task file in ARC's layout (its test outputs included)
    and on the ARC Prize files with --solutions; the random tiny model's recipe is
    whatever it writes: parsed, or refused with the reason and answered untrained."""
    import json

    from click.testing import CliRunner

    from seal_agent.cli import main

    task = next(t for t in tasks if t.id == "5582e5ca")
    one = tmp_path / "task.json"
    one.write_text(json.dumps({"train": [{"input": p.input, "output": p.output} for p in task.train],
                               "test": [{"input": task.test[0], "output": task.solutions[0]}]}))
    r = CliRunner().invoke(main, ["--config", str(tiny_config), "--set", "train.epochs=1", "solve", str(one),
                                  "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    [rec] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rec["task"] == "task" and len(rec["answers"]) == 1 and len(rec["verdicts"]) == 1
    edit = rec["self_edit"]
    assert 1 <= edit["samples"] <= 3 and (edit["recipe"] is None) == (edit["refused"] is not None) == \
        (not rec["trained"])
    if not rec["trained"]:
        assert rec["train"]["sequences"] == 0
    assert rec["verdicts"][0]["reason"].split(":")[0] in ("parse", "shape", "cells", "correct")
    given = GOOD.replace('"use_repeat_augmentations": true', '"use_repeat_augmentations": false')
    r = CliRunner().invoke(main, ["--config", str(tiny_config), "--set", "train.epochs=1", "solve", str(one),
                                  "--recipe", given, "--json"], catch_exceptions=False)
    [rec] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rec["trained"] and rec["self_edit"]["given"] and rec["self_edit"]["recipe"]["epochs"] == 3
    assert rec["train"]["sequences"] == len(task.train) * (1 + len(augment.BASIC))
    r = CliRunner().invoke(main, ["--config", str(tiny_config), "solve", str(one), "--recipe", "{}"])
    assert r.exit_code == 1 and "the recipe given is refused: does not match the recipe schema" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"t1": {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]}}')
    r = CliRunner().invoke(main, ["--config", str(tiny_config), "solve", str(bad)])
    assert r.exit_code == 1 and "ARC task t1: rows of different lengths" in r.output
