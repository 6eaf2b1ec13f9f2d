"""The ARC domain end to end on the tiny model: constrained recipes, ReSTEM on
ARC tasks, `eval arc`, and ARC tasks learned through `learn` and the daemon's
inbox as skill modules.

Most tests use tasks whose demonstrations all have the same 1x1 output: the
tiny random model solves one after test-time training at a high learning rate
and never without it, so whether a recipe solves a task is a real outcome
that a reversed comparison or an ignored reward would change."""

import json
import random

import pytest
from click.testing import CliRunner
from conftest import DAEMON_SECTIONS, ROOT, SHARED_DATA, write_config

from seal_agent.arc import recipe, ttt
from seal_agent.arc.grids import Pair, Task, check, grid, is_task_file
from seal_agent.cli import main

POLICIES = ROOT / "policies"

FAST = ('{"data_generation": {"use_basic_augmentations": false, "use_size_augmentations": false, '
        '"use_chain_augmentations": false, "use_repeat_augmentations": false}, '
        '"training": {"strategy": "train_using_output_tokens", "learning_rate": 0.01, "num_train_epochs": 10}}')
SLOW = FAST.replace('"learning_rate": 0.01', '"learning_rate": 0.0001').replace('"num_train_epochs": 10',
                                                                                  '"num_train_epochs": 2')


def constant_task(task_id: str, colour: int, seed: int, demos: int = 4, answer: int | None = None) -> Task:
    """Every demonstration's output is the 1x1 grid `colour`; the test output is `answer`
    (default: the same), which the demonstrations alone do not say."""
    rng = random.Random(seed)
    inputs = [grid([[rng.randrange(10) for _ in range(2)] for _ in range(2)]) for _ in range(demos + 1)]
    return Task(task_id, tuple(Pair(g, grid([[colour]])) for g in inputs[:demos]), (inputs[demos],),
                (grid([[colour if answer is None else answer]]),))


def task_file(path, tasks: list[Task], with_outputs: bool = True):
    """An ARC Prize challenges file (one task: ARC's own layout)."""
    def one(t: Task) -> dict:
        test = [{"input": g, **({"output": s} if with_outputs else {})} for g, s in zip(t.test, t.solutions)]
        return {"train": [{"input": p.input, "output": p.output} for p in t.train], "test": test}

    data = one(tasks[0]) if len(tasks) == 1 else {t.id: one(t) for t in tasks}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def arc_config(tmp_path, arc_tiny_dir):
    return write_config(tmp_path / "config.toml", arc_tiny_dir, tmp_path / "state",
                        extra="[arc]\nbudget_s = 120\n[restem]\nheldout_fraction = 0.34\nheldout_contexts = 2\n")


def run(config, *args, code: int = 0):
    r = CliRunner().invoke(main, ["--config", str(config), *args], catch_exceptions=False)
    assert r.exit_code == code, r.output
    return r


def json_lines(r) -> list[dict]:
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


# -- constrained recipes --------------------------------------------------------

def test_constrained_decoding_makes_every_sample_a_recipe_in_range(arc_tiny_dir, tiny_cfg):
    """The random model writes no recipe free, and only recipes when decoding is held to the schema."""
    import dataclasses

    from seal_agent.arc.writing import load_recipe_policy, sample_recipes
    from seal_agent.config import load_config
    from seal_agent.model.loader import load_model, load_tokenizer

    cfg = load_config(None)
    model, tok = load_model(arc_tiny_dir, cfg), load_tokenizer(arc_tiny_dir)
    policy = load_recipe_policy(POLICIES / "arc-recipe.toml")
    assert policy.constrained
    task = constant_task("c", 7, 0)
    held = sample_recipes(model, tok, policy, task, 6, seed=3)
    parsed = [recipe.parse(t) for t in held]
    assert all(p.recipe is not None for p in parsed), [p.reason for p in parsed]
    assert all(1e-5 <= p.recipe.lr <= 1e-2 and 1 <= p.recipe.epochs <= 10 and not p.recipe.notes for p in parsed)
    free = dataclasses.replace(policy, sampling=dataclasses.replace(policy.sampling, json_schema=None))
    assert not free.constrained
    assert all(recipe.parse(t).recipe is None for t in sample_recipes(model, tok, free, task, 6, seed=3))


def test_a_policy_says_whether_it_is_constrained(tmp_path):
    from seal_agent.arc.writing import load_recipe_policy
    from seal_agent.errors import PolicyError

    text = (POLICIES / "arc-recipe.toml").read_text()
    bad = tmp_path / "p.toml"
    bad.write_text(text.replace("constrained = true", 'constrained = "yes"'))
    with pytest.raises(PolicyError, match="sampling.constrained must be true or false"):
        load_recipe_policy(bad)
    off = tmp_path / "off.toml"
    off.write_text(text.replace("constrained = true", "constrained = false"))
    assert not load_recipe_policy(off).constrained


def test_a_task_of_30x30_grids_is_refused_for_the_context_saying_how_many_tokens(tmp_path, arc_config):
    """ARC's largest grids: three 30x30 demonstrations cannot fit 2,048 tokens; solve
    says so per task and goes on to the next, which it answers."""
    big = grid([[(r * 7 + c) % 10 for c in range(30)] for r in range(30)])
    huge = Task("huge", tuple(Pair(big, big) for _ in range(3)), (big,), (big,))
    data = task_file(tmp_path / "tasks.json", [huge, constant_task("small", 4, 0)])
    first, second = json_lines(run(arc_config, "solve", str(data), "--recipe", SLOW, "--json"))
    assert first["task"] == "huge" and "30x30 test input's prompt takes" in first["refused"]
    assert "over the model's 2048" in first["refused"] and first["solved"] is False
    assert second["task"] == "small" and "refused" not in second and second["trained"]


# -- the reward's view of a task ------------------------------------------------

def test_a_recipe_that_trains_enough_solves_the_held_out_demonstration(arc_tiny_dir, tiny_cfg):
    """The fixture the decisions below rest on: a high learning rate solves a constant
    task's held-out demonstration, a low one and no training do not; the test output,
    which differs, is never what is checked."""
    from seal_agent.model.loader import load_model, load_tokenizer

    model, tok = load_model(arc_tiny_dir, tiny_cfg), load_tokenizer(arc_tiny_dir)
    task = constant_task("c", 7, 1, answer=3)
    held = ttt.held_out(task)
    assert held.train == task.train[:-1] and held.test == (task.train[-1].input,)
    assert held.solutions == (grid([[7]]),) and grid([[3]]) not in held.solutions
    outcome = {}
    for name, text in (("fast", FAST), ("slow", SLOW), ("none", None)):
        r = recipe.parse(text).recipe if text else None
        with ttt.adapted(model, tok, held, r, tiny_cfg.lora, tiny_cfg.train) as (m, _):
            [answer] = ttt.answer(m, tok, held)
        outcome[name] = check(answer, held.solutions[0]).correct
    assert outcome == {"fast": True, "slow": False, "none": False}
    with pytest.raises(ValueError, match="one demonstration, none left to hold out"):
        ttt.held_out(constant_task("one", 1, 0, demos=1))


def test_training_past_its_budget_is_stopped_and_leaves_the_model_as_it_was(arc_tiny_dir, tiny_cfg):
    from seal_agent.memory.live import weights_fingerprint
    from seal_agent.model.loader import load_model, load_tokenizer

    model, tok = load_model(arc_tiny_dir, tiny_cfg), load_tokenizer(arc_tiny_dir)
    before = weights_fingerprint(model)
    with pytest.raises(ttt.OverBudget, match="passed its 1e-06 s budget at step 1 of"):
        ttt.solve(model, tok, constant_task("c", 7, 1), recipe.parse(FAST).recipe, tiny_cfg.lora,
                  tiny_cfg.train, budget_s=1e-6)
    assert weights_fingerprint(model) == before


def test_voting_takes_the_most_common_grid_and_the_plain_answer_on_a_tie():
    a, b, c = grid([[1]]), grid([[2]]), grid([[3]])
    assert ttt.majority({"plain": a, "rotate90": b, "rotate180": b, "flip_updown": None}) == b
    assert ttt.majority({"plain": a, "rotate90": b, "rotate180": a, "transpose": b}) == a  # a tie: plain's
    assert ttt.majority({"plain": None, "rotate90": c, "rotate180": b}) == c  # a tie without plain: the first
    assert ttt.majority({"plain": None, "rotate90": None}) is None


def test_voting_answers_every_view_and_maps_each_back(arc_tiny_dir, tiny_cfg):
    """On a task the trained model solves, every view's answer (a 1x1 grid, the same
    under any rotation) is mapped back and the vote is that grid."""
    from seal_agent.arc import augment
    from seal_agent.model.loader import load_model, load_tokenizer

    model, tok = load_model(arc_tiny_dir, tiny_cfg), load_tokenizer(arc_tiny_dir)
    task = constant_task("c", 7, 1)
    solved = ttt.solve(model, tok, task, recipe.parse(FAST).recipe, tiny_cfg.lora, tiny_cfg.train, voting=True)
    [poll] = solved.votes
    assert set(poll) == {"plain", *(a.name for a in augment.BASIC)}
    assert solved.answers == ["7"] and solved.solved
    assert sum(g == [[7]] for g in poll.values()) > len(poll) / 2
    plain = ttt.solve(model, tok, task, recipe.parse(FAST).recipe, tiny_cfg.lora, tiny_cfg.train)
    assert plain.votes is None


# -- ReSTEM on ARC --------------------------------------------------------------

def test_a_restem_round_on_arc_tasks_rewards_recipes_that_solve_the_held_out_demonstration(
        tmp_path, arc_config, arc_tiny_dir):
    """`restem --domain arc` through the same loop as knowledge: each reward is whether
    the sample's recipe, trained on all but the last demonstration, solves that one
    (recomputed here); a winner per task is its best improving sample; the round is a
    line of its own (arc-recipe), the knowledge policy's line untouched."""
    from seal_agent.arc.grids import load_tasks
    from seal_agent.config import load_config
    from seal_agent.model.loader import load_model, load_tokenizer
    from seal_agent.restem.arc import context_id

    # the test outputs differ from every demonstration's: a reward that looked at them would be 0
    tasks = [constant_task(f"const{c}", c, c, answer=(c + 1) % 10) for c in (1, 4, 6, 7, 8, 9)]
    data = task_file(tmp_path / "tasks.json", tasks)
    r = run(arc_config, "restem", "--domain", "arc", "--data", str(data), "--contexts", "3", "--samples", "3",
            "--json")
    [rec] = json_lines(r)
    assert rec["domain"] == "arc" and rec["policy"] == "arc-recipe" and rec["pool"] == 6
    assert rec["refused_contexts"] == []
    assert len(rec["contexts"]) == 3 and len(rec["rewards"]) == 9
    assert not {c["id"] for c in rec["contexts"]} & set(rec["heldout_contexts"] and
                                                       [c["id"] for c in rec["heldout_contexts"]])
    cfg = load_config(arc_config)
    model, tok = load_model(arc_tiny_dir, cfg), load_tokenizer(arc_tiny_dir)
    by_id = {context_id(t): t for t in load_tasks(data)}
    seed = cfg.model.seed + rec["round"]
    for row, sample in zip(rec["rewards"], rec["samples"]):
        assert (row["context"], row["sample"]) == (sample["context"], sample["sample"])
        assert row["before"] == 0.0  # no constant task is solved in context
        parsed = recipe.parse(sample["text"])
        held = ttt.held_out(by_id[row["context"]])
        with ttt.adapted(model, tok, held, parsed.recipe, cfg.lora, cfg.train, seed=seed * 1000) as (m, _):
            [answer] = ttt.answer(m, tok, held)
        assert row["after"] == [float(check(answer, held.solutions[0]).correct)]
        assert row["reward"] == row["gain"] == row["after"][0] - row["before"]
    for ctx in rec["contexts"]:
        rows = [r for r in rec["rewards"] if r["context"] == ctx["id"]]
        best = max(rows, key=lambda r: r["reward"])
        winner = [w for w in rec["winners"] if w["context"] == ctx["id"]]
        assert winner == ([{"context": ctx["id"], "sample": best["sample"], "reward": best["reward"]}]
                          if best["reward"] > 0 else [])
    assert rec["winners"], "no recipe solved a task: the fixture no longer tests the decision"
    assert rec["sft"]["pairs"] == len(rec["winners"])
    h = rec["heldout"]
    assert (rec["decision"] == "promoted") == (h["new"] > h["old"] + h["margin"])
    arc_line = json_lines(run(arc_config, "policy", "list", "--domain", "arc", "--json"))
    assert [v["version"] for v in arc_line] == ([0, 1] if rec["decision"] == "promoted" else [0])
    assert [v["version"] for v in json_lines(run(arc_config, "policy", "list", "--json"))] == [0]


def test_restem_on_arc_refuses_what_cannot_be_a_context_and_bad_domains(tmp_path, arc_config):
    tasks = [constant_task("one", 1, 0, demos=1), constant_task("two", 2, 0, demos=2)]
    data = task_file(tmp_path / "tasks.json", tasks)
    [rec] = json_lines(run(arc_config, "restem", "--domain", "arc", "--data", str(data), "--samples", "1",
                           "--json"))
    assert rec["pool"] == 1 and [c["task"] for c in rec["refused_contexts"]] == ["one"]
    assert "none left to hold out" in rec["refused_contexts"][0]["reason"]
    r = run(arc_config, "restem", "--domain", "chess", code=2)
    assert "Invalid value for '--domain'" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"t": {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]}}')
    r = run(arc_config, "restem", "--domain", "arc", "--data", str(bad), code=1)
    assert "ReSTEM's ARC data" in r.output and "rows of different lengths" in r.output


# -- eval arc ---------------------------------------------------------------------

def test_eval_arc_runs_the_ladder_and_the_oracle_takes_the_best_of_its_grid(tmp_path, arc_config):
    tasks = [constant_task("a", 5, 2), constant_task("b", 8, 3)]
    data = task_file(tmp_path / "tasks.json", tasks, with_outputs=False)
    sols = tmp_path / "solutions.json"
    sols.write_text(json.dumps({t.id: list(t.solutions) for t in tasks}))
    out = tmp_path / "out"
    r = run(arc_config, "eval", "arc", "--data", str(data), "--solutions", str(sols), "--out", str(out),
            "--json")
    rows = {row["condition"]: row for row in json_lines(r)}
    assert list(rows) == ["icl", "ttt-self", "ttt-oracle", "seal"]
    for row in rows.values():
        assert row["n"] == 2 and row["success_rate"] == row["solved"] / 2 and row["seconds"] > 0
        assert row["solved"] + sum(row["failures"].values()) == 2
        assert [t["task"] for t in row["tasks"]] == ["a", "b"]
    assert rows["icl"]["solved"] == 0 and all(t["self_edit"] is None for t in rows["icl"]["tasks"])
    # the grid's lr 3e-3, 5 epochs recipe solves a constant task; best of the grid: solved
    for t in rows["ttt-oracle"]["tasks"]:
        assert len(t["oracle"]) == 3 and t["solved"] == any(o["solved"] for o in t["oracle"])
    assert rows["ttt-oracle"]["solved"] == 2
    assert rows["ttt-self"]["policy"] == "arc-recipe" and "no promoted ARC policy version" in rows["seal"]["note"]
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["a", "b"] and len(results["results"]) == 4 and (out / "chart.png").stat().st_size
    r = run(arc_config, "eval", "arc", "--data", str(data), "--solutions", str(sols), "--conditions", "icl,x",
            code=1)
    assert "unknown ARC condition(s) x" in r.output
    r = run(arc_config, "eval", "arc", "--data", str(data), code=1)
    assert "no solutions for a, b: pass --solutions FILE" in r.output
    r = run(arc_config, "eval", "arc", "--data", str(data), "--solutions", str(sols), "--tasks", "zz", code=1)
    assert "no task zz" in r.output


# -- ARC tasks learned as skill modules -----------------------------------------

def test_learning_an_arc_file_solves_it_and_keeps_skill_modules_not_knowledge(tmp_path, arc_config):
    """`learn` on an ARC file: each task solved, its adapter kept as s000N (a PEFT
    adapter that loads), its record in the skills table, the knowledge weights and
    version unchanged; an ARC file is told apart from a SQuAD-style one."""
    from peft import PeftModel

    from seal_agent.agent import SealAgent
    from seal_agent.config import load_config
    from seal_agent.memory.live import weights_fingerprint

    data = task_file(tmp_path / "two.json", [constant_task("p", 3, 4), constant_task("q", 6, 5)])
    assert is_task_file(data) and not is_task_file(SHARED_DATA / "squad" / "eval_dev.json")
    cfg = load_config(arc_config)
    agent = SealAgent(cfg)
    live = agent.live
    version, before = live.version, weights_fingerprint(live.model)
    report = agent.learn(data).as_dict()
    assert report["kind"] == "arc" and report["tasks"] == 2 and report["status"] == "done"
    assert report["checked"] == 2 and report["solved"] == sum(r["solved"] for r in report["results"])
    skills = agent.skills.all()
    assert [s.task.id for s in skills] == ["q", "p"] and [s.id for s in skills] == [2, 1]
    for s, r in zip(skills[::-1], report["results"]):
        assert s.record["self_edit"] == json.loads(json.dumps(r["self_edit"])) and s.adapter == r["trained"]
        if s.adapter:
            PeftModel.from_pretrained(live.model, str(agent.skills.path(s.id))).unload()
            assert agent.skills.log.manifest(s.id)["task"] == s.task.id
    assert live.version == version and weights_fingerprint(live.model) == before
    assert agent.state.document(report["document_id"])["kind"] == "arc"
    # the tasks the daemon solved are ReSTEM's ARC contexts too, newest first
    rec = agent.restem(domain="arc", data=[data], samples=1)
    assert rec["pool"] == 2 and rec["policy"] == "arc-recipe"  # the file's tasks are the inbox's: once each
    agent.close()


def test_an_arc_task_dropped_into_the_inbox_is_solved_and_a_broken_one_rejected(tmp_path, arc_tiny_dir):
    """The real daemon: a task file in the inbox is solved and kept as a skill module,
    moved to done/, and the live version stays 0; a task file with a broken grid is
    rejected with the reason, like any unreadable document."""
    from test_daemon import Daemon, free_port, jobs

    config = write_config(tmp_path / "config.toml", arc_tiny_dir, tmp_path / "state", extra=DAEMON_SECTIONS)
    inbox = tmp_path / "inbox"
    d = Daemon(config, free_port(), "--inbox", str(inbox))
    try:
        d.wait_up()
        task_file(inbox / "task.json", [constant_task("t", 2, 6)])
        (inbox / "broken.json").write_text('{"train": [{"input": [[1, 2], [3]], "output": [[1]]}], '
                                           '"test": [{"input": [[1]]}]}')
        d.wait_for(lambda: (inbox / "done" / "task.json").exists(), what="task.json in done/")
        d.wait_for(lambda: (inbox / "rejected" / "broken.json.reason.txt").exists(), what="broken.json rejected")
        assert "rows of different lengths" in (inbox / "rejected" / "broken.json.reason.txt").read_text()
        rows = {j["name"]: j for j in jobs(tmp_path / "state")}
        assert rows["task.json"]["state"] == "done" and rows["broken.json"]["state"] == "rejected"
        result = json.loads(rows["task.json"]["result"])
        assert result["kind"] == "arc" and result["skills"] == [1] and result["results"][0]["task"] == "task"
        assert d.status()["live_version"] == 0
    finally:
        assert d.stop() == 0
