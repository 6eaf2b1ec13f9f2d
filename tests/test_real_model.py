"""End to end on the real embedded SmolLM2-135M-Instruct (slow: about a minute each on 2 cores).

These prove that learning happens: after `seal-agent learn` on a SQuAD passage
the model answers its questions, without the passage in context, better than
before (on average over seeds), and `ask` serves the new version.
"""

import json

import pytest
from click.testing import CliRunner
from conftest import ROOT, SQUAD_DEV

from seal_agent.agent import SealAgent
from seal_agent.cli import main
from seal_agent.config import load_config
from seal_agent.qa.grading import contains

pytestmark = pytest.mark.slow

# "European Union law": the untrained model answers none of its 4 questions.
PASSAGE = 1
# A 135M model's own self-edits are noisy: what one seed (its self-edit and its
# LoRA update) learns varies from none to half of the questions (BENCHMARKS.md),
# so the claim is on the mean over seeds.
SEEDS = (0, 1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """One dequantized copy of the embedded model for all real-model tests."""
    return tmp_path_factory.mktemp("models")


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_learning_a_squad_passage_raises_no_context_accuracy(tmp_path, models_dir):
    item = json.loads(SQUAD_DEV.read_text())[PASSAGE]
    data = {k: item[k] for k in ("title", "context", "questions")}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    qas = {}
    for seed in SEEDS:
        common = ["--state-dir", tmp_path / f"state-{seed}", "--set", f"paths.models='{models_dir}'",
                  "--set", f"model.seed={seed}"]
        report = json.loads(cli("learn", path, "--json", *common).stdout)
        assert report["learned"] == 1 and report["version"] == 1
        qas[seed] = qa = report["qa"]
        assert qa["n"] == len(data["questions"]) and qa["before"] == 0.0, qa
        [p] = report["passage_reports"]
        assert p["train"]["epoch_losses"][-1] < 0.5 * p["train"]["epoch_losses"][0]
    before, after = (sum(qa[side] for qa in qas.values()) / len(SEEDS) for side in ("before", "after"))
    assert after > before, qas

    # The served model is the new version and answers as the learner measured it (the first seed's run).
    seed = SEEDS[0]
    state = tmp_path / f"state-{seed}"
    common = ["--state-dir", state, "--set", f"paths.models='{models_dir}'", "--set", f"model.seed={seed}"]
    agent = SealAgent(load_config(None, [f"paths.models='{models_dir}'"], state))
    answers = [agent.ask(f"Topic: {data['title']}\n{q['question']}") for q in data["questions"]]
    agent.close()
    assert all(a["version"] == 1 for a in answers)
    correct = sum(contains(a["answer"], q["answer"]) for a, q in zip(answers, data["questions"]))
    assert correct / len(answers) == pytest.approx(qas[seed]["after"]), answers

    # Learning it again is a no-op that says so.
    again = json.loads(cli("learn", path, "--json", *common).stdout)
    assert again["duplicates"] == 1 and again["version"] == 1

    # Rolling back to the base model restores the base model's answers.
    cli("rollback", "0", *common)
    agent = SealAgent(load_config(None, [f"paths.models='{models_dir}'"], state))
    base_answers = [agent.ask(f"Topic: {data['title']}\n{q['question']}") for q in data["questions"]]
    agent.close()
    assert all(a["version"] == 0 for a in base_answers)
    assert sum(contains(a["answer"], q["answer"]) for a, q in zip(base_answers, data["questions"])) == 0


def test_a_plain_document_gets_grounded_model_written_questions(tmp_path, models_dir):
    """No questions in the file: the real model writes some; every kept answer
    is in the passage and the kept QAs are in the replay bank."""
    doc = ROOT / "tests" / "data" / "normans.md"
    common = ["--state-dir", tmp_path / "state", "--set", f"paths.models='{models_dir}'"]
    report = json.loads(cli("learn", doc, "--json", *common).stdout)
    [p] = report["passage_reports"]
    gen = p["qa_generated"]
    assert p["status"] == "learned" and gen["generated"] >= gen["grounded"] >= gen["kept"] >= 2, gen
    assert p["qa_source"] == "generated" and p["checked"]
    stats = json.loads(cli("replay", "stats", "--json", *common).stdout)
    assert stats["qas"] == gen["kept"] and stats["by_source"] == {"generated": gen["kept"]}
    text = " ".join(doc.read_text().split()).lower()
    hits = [json.loads(x) for x in cli("replay", "search", "Normans", "-k", "20", "--json", *common).stdout.splitlines()]
    assert len(hits) == gen["kept"] and all(h["answer"].lower() in text for h in hits), hits


def test_three_passages_learned_in_sequence_are_each_still_answered_after_the_third(tmp_path, models_dir):
    """Knowledge modules (the default memory): what the merge line forgets
    (BENCHMARKS.md, "Retention") stays, because no document's module touches
    another's. GPT-4.1's self-edits from the data, so that each passage is learned."""
    from seal_agent.qa.answering import questions_of

    items = json.loads(SQUAD_DEV.read_text())
    # Immune system, Normans, Ctenophora: passages whose every question the router
    # routes to its own module, so that what is tested is retention (the router's
    # misses are measured, in BENCHMARKS.md, not here).
    chosen = (5, 6, 9)
    cfg = load_config(None, [f"paths.models='{models_dir}'", "memory.mode='modules'"], tmp_path / "state")
    agent = SealAgent(cfg)
    try:
        live = agent.live
        learner = agent.learner(external="gpt-4.1")
        asked = {}
        for i in chosen:
            it = items[i]
            path = tmp_path / f"p{i}.json"
            path.write_text(json.dumps([{k: it[k] for k in ("title", "context", "questions", "external_self_edits")}]))
            from seal_agent.documents import QA

            asked[i] = questions_of(it["title"], [QA(q["question"], q["answer"]) for q in it["questions"]])
        base = {i: agent.knowledge.evaluate(live.model, live.tokenizer, 0, asked[i])[0] for i in chosen}
        just = {}
        for i in chosen:
            report = learner.learn_file(tmp_path / f"p{i}.json")
            assert report.passages[0].status == "learned"
            just[i] = report.passages[0].qa_after
        after = {i: agent.knowledge.evaluate(live.model, live.tokenizer, live.version, asked[i]) for i in chosen}
    finally:
        agent.close()
    for i in chosen:
        scored, routes = after[i]
        accuracy = sum(s.correct for s in scored) / len(scored)
        base_accuracy = sum(s.correct for s in base[i]) / len(base[i])
        assert accuracy > base_accuracy, (i, accuracy, base_accuracy, just[i])
        assert accuracy == pytest.approx(just[i]), (i, accuracy, just[i])  # nothing of it was lost
        assert all(r.module == chosen.index(i) + 1 for r in routes), routes


def test_smollm2_learns_and_answers_through_vllm_as_through_torch(tmp_path, models_dir):
    """engine = vllm on the real model: a module learned (its checks answered by
    vLLM, the module a per-request LoRA) raises its questions' accuracy, and the
    torch engine, the module merged in, gives the very same answers."""
    item = json.loads(SQUAD_DEV.read_text())[PASSAGE]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps([{k: item[k] for k in ("title", "context", "questions", "external_self_edits")}]))
    cfg = load_config(overrides=[f"paths.models='{models_dir}'", 'engine.generate="vllm"', 'engine.serve="vllm"'],
                      state_dir=tmp_path / "state")
    agent = SealAgent(cfg)
    try:
        agent.own()
        report = agent.learner("gpt-4.1").learn_file(path).as_dict()  # the paper's strongest self-edits
        assert report["learned"] == 1 and report["qa"]["after"] > report["qa"]["before"], report["qa"]
        from seal_agent.documents import QA
        from seal_agent.qa.answering import questions_of

        live = agent.live
        questions = questions_of(item["title"], [QA(q["question"], q["answer"]) for q in item["questions"]])
        by_vllm, routes = agent.knowledge.evaluate(agent.decoder("serve"), live.tokenizer, live.version, questions)
        by_torch, _ = agent.knowledge.evaluate(live.model, live.tokenizer, live.version, questions)
        assert any(r.module is not None for r in routes)
        assert [s.prediction for s in by_vllm] == [s.prediction for s in by_torch]
    finally:
        agent.close()
