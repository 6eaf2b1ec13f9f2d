"""The evaluation harness on the tiny model: conditions, interval arithmetic, output files."""

import json

import pytest
from click.testing import CliRunner
from conftest import SQUAD_DEV

from seal_agent.cli import main
from seal_agent.documents import QA, Passage
from seal_agent.errors import SealError
from seal_agent.evaluation.ladder import ConditionResult, parse_conditions, wilson_interval


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_condition_result_rounding_and_ci():
    r = ConditionResult("base", correct=3, n=12, seconds=1.234)
    d = r.as_dict()
    assert d["accuracy"] == 0.25 and d["n"] == 12 and len(d["ci95"]) == 2 and d["ci95"][0] < 0.25 < d["ci95"][1]
    assert "judge_accuracy" not in d
    r.judge_correct = 6
    assert r.as_dict()["judge_accuracy"] == 0.5


def test_parse_conditions_checks_the_data():
    ps = [Passage("T", "text", [QA("q", "a")], {"gpt-4.1": ["x"]}), Passage("U", "t2", [QA("q", "a")], {})]
    assert parse_conditions("base, passage,self", ps) == ["base", "passage", "self"]
    with pytest.raises(SealError, match=r"passage\(s\) \[1\] carry no external self-edit 'gpt-4.1'"):
        parse_conditions("external:gpt-4.1", ps)
    with pytest.raises(SealError, match="unknown condition 'magic'"):
        parse_conditions("base,magic", ps)
    with pytest.raises(SealError, match="unknown condition 'in-context'"):
        parse_conditions("in-context", ps, cpt=True)
    with pytest.raises(SealError, match="twice"):
        parse_conditions("base,base", ps)


@pytest.fixture
def eval_file(tmp_path):
    items = json.loads(SQUAD_DEV.read_text())[:2]
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(items))
    return path, items


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_eval_squad_all_conditions_and_files(tiny_config, eval_file, tmp_path):
    path, items = eval_file
    out = tmp_path / "out"
    r = run("--config", tiny_config, "eval", "squad", "--data", path, "--n", "2", "--json", "--out", out,
            "--set", "train.epochs=1")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    n_q = sum(len(i["questions"]) for i in items)
    assert [x["condition"] for x in rows] == ["base", "passage", "self", "external:gpt-4.1", "in-context"]
    for x in rows:
        assert x["n"] == n_q and x["passages"] == 2 and 0 <= x["accuracy"] <= 1
        assert x["ci95"][0] <= x["accuracy"] <= x["ci95"][1] and x["seconds"] > 0
        trained = x["condition"] not in ("base", "in-context")
        assert (x["train_tokens"] > 0) == trained
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 5 * n_q
    assert {a["condition"] for a in answers} == {x["condition"] for x in rows}
    assert {"passage", "question", "gold", "prediction", "correct"} <= answers[0].keys()
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["passages"] == 2 and results["results"] == rows

    # Same seed, same answers.
    out2 = tmp_path / "out2"
    run("--config", tiny_config, "eval", "squad", "--data", path, "--n", "2", "--out", out2,
        "--set", "train.epochs=1", "--conditions", "self")
    again = [json.loads(line) for line in (out2 / "answers.jsonl").read_text().splitlines()]
    assert [a["prediction"] for a in again] == [a["prediction"] for a in answers if a["condition"] == "self"]


def test_eval_cpt_one_update_for_all_passages(tiny_config, eval_file, tmp_path):
    path, items = eval_file
    r = run("--config", tiny_config, "eval", "cpt", "--data", path, "--json", "--out", tmp_path / "cpt",
            "--conditions", "base,passage", "--set", "train.epochs=1")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    n_q = sum(len(i["questions"]) for i in items)
    assert [(x["condition"], x["n"], x["passages"]) for x in rows] == [("base", n_q, 2), ("passage", n_q, 2)]
    # one update over both passages: 1 epoch x 2 sequences (one per passage)
    assert rows[1]["train_tokens"] > 0


def test_eval_errors_are_clear(tiny_config, tmp_path, eval_file):
    path, _ = eval_file
    r = run("--config", tiny_config, "eval", "squad", "--data", tmp_path / "none.json")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    txt = tmp_path / "notes.txt"
    txt.write_text("plain text")
    r = run("--config", tiny_config, "eval", "squad", "--data", txt)
    assert r.exit_code == 1 and "SQuAD-style" in r.stderr
    r = run("--config", tiny_config, "eval", "squad", "--data", path, "--conditions", "external:claude")
    assert r.exit_code == 1 and "external self-edit 'claude'" in r.stderr


def test_in_context_prompt_carries_the_passage(tiny_model_dir):
    from transformers import AutoTokenizer

    from seal_agent.config import QAConfig
    from seal_agent.qa.answering import Question, question_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    q = Question("Who led them?", "Rollo", "Normans", "Rollo led the Norse raiders.")
    closed = question_prompt(tok, q, QAConfig(), use_chat=True)
    open_book = question_prompt(tok, q, QAConfig(), use_chat=True, in_context=True)
    assert "Rollo led" not in closed and "Topic: Normans\nWho led them?" in closed
    assert "Passage:\nNormans\nRollo led the Norse raiders.\n\nTopic: Normans\nWho led them?" in open_book


def test_eval_data_comes_from_the_config_not_a_path_in_the_code(tiny_config, eval_file, tmp_path):
    path, _ = eval_file
    r = run("--config", tiny_config, "eval", "squad")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "no evaluation data: pass --data FILE (SQuAD-style JSON) or set eval.data" in r.stderr
    r = run("--config", tiny_config, "--set", "eval.data=missing.json", "eval", "continual")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert f"{tmp_path / 'missing.json'} (eval.data) does not exist; pass --data FILE or set eval.data" in r.stderr
    r = run("--config", tiny_config, "--set", f"eval.data={path.name}", "eval", "cpt", "--conditions", "base",
            "--json", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "results.json").read_text())["data"] == str(path)


def test_continual_checks_its_self_edits_before_any_work(tiny_cfg, eval_file, tmp_path):
    from seal_agent.evaluation.continual import evaluate_continual

    path, _ = eval_file
    with pytest.raises(SealError, match="--self-edits must be 'self' or external:<name>, got 'magic'"):
        evaluate_continual(tiny_cfg, data=path, n=2, self_edits="magic", out_dir=tmp_path / "c")
    with pytest.raises(SealError, match=r"dev\.json: passage\(s\) \[0, 1\] carry no external self-edit 'claude' "
                                        r"\(the data has: gpt-4.1, seal-qwen2.5-7b-iter2\)"):
        evaluate_continual(tiny_cfg, data=path, n=2, self_edits="external:claude", out_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_policy_adapter_for_the_self_condition(tmp_path):
    from seal_agent.evaluation.ladder import policy_adapter_for

    class Versions:  # policy version 2 promoted
        def active(self):
            return 2

        def adapter_dir(self, v):
            return None if v == 0 else tmp_path / f"v{v}"

        def label(self, v):
            return "p" if v == 0 else f"p@v{v}"

    v, candidate = Versions(), tmp_path / "candidate"
    assert policy_adapter_for(v, None, None) == (tmp_path / "v2", "p@v2")
    assert policy_adapter_for(v, 0, None) == (None, "p")
    assert policy_adapter_for(v, 1, None) == (tmp_path / "v1", "p@v1")
    assert policy_adapter_for(v, None, candidate) == (candidate, str(candidate))
    with pytest.raises(SealError, match="give --policy-version or --policy-adapter, not both"):
        policy_adapter_for(v, 0, candidate)


def test_scratch_config_moves_the_state_and_keeps_the_base_conversion(tmp_path):
    from seal_agent.config import Config
    from seal_agent.evaluation.scratch import scratch_config

    cfg = Config(root=tmp_path)
    s = scratch_config(cfg, tmp_path / "scratch", replay={"gate": False}, split={"max_tokens": 160})
    assert s.state_dir == tmp_path / "scratch" and s.state_path("database") == tmp_path / "scratch" / "state" / "seal.db"
    assert s.state_path("models") == cfg.state_path("models")
    assert (s.replay.gate, s.split.max_tokens) == (False, 160) and (cfg.replay.gate, cfg.split.max_tokens) == (True, 400)
    assert s.train == cfg.train and s.split.min_tokens == cfg.split.min_tokens
