"""The replay QA bank (real FAISS, real SQLite, real MiniLM embeddings) and the
forgetting gate on the tiny model."""

import json
import sqlite3

import faiss
import numpy as np
import pytest
import torch

from seal_agent.agent import SealAgent
from seal_agent.config import load_config
from seal_agent.memory.embedding import MiniLMEmbedder
from seal_agent.memory.forgetting import Check, passes
from seal_agent.memory.replay import NewQA, ReplayBank
from seal_agent.memory.state import State
from seal_agent.model.loader import answer_dtype
from seal_agent.qa.answering import Question, evaluate
from seal_agent.qa.writing import answer_spans, clean_question, cloze, usable

FACTS = {
    "h-normans": ("Normans", [("Who led the Norse raiders who became the Normans?", "Rollo"),
                              ("In which region of France did the Normans settle?", "Normandy")]),
    "h-kidney": ("Kidney", [("Which organ filters blood to make urine?", "the kidney"),
                            ("What do nephrons filter?", "blood plasma")]),
    "h-python": ("Python", [("Who created the Python programming language?", "Guido van Rossum")]),
}


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder()


def fill(bank: ReplayBank, version: int = 0) -> dict[str, list[int]]:
    ids = {}
    for h, (title, pairs) in FACTS.items():
        qas = [NewQA(q, a, "gold") for q, a in pairs]
        ids[h] = bank.add(qas, bank.embed(title, qas), passage_hash=h, title=title, document_id=None,
                          version=version)
    bank.sync()
    return ids


def test_bank_persists_finds_nearest_and_rebuilds_a_lost_or_corrupt_index(tmp_path, embedder):
    state = State(tmp_path / "seal.db")
    index_path = tmp_path / "replay.faiss"
    bank = ReplayBank(state, embedder, index_path)
    ids = fill(bank)
    assert embedder.dim == 384 and bank.index.ntotal == 5 and index_path.exists()
    [(hit, score)] = bank.search("Rollo and his Vikings settled in northern France", 1)
    assert hit.passage_hash == "h-normans" and 0 < score <= 1
    # restricted to allowed ids
    [(hit, _)] = bank.search("Rollo and his Vikings", 1, allowed=ids["h-kidney"])
    assert hit.passage_hash == "h-kidney"
    # adding the same QA again re-dates it instead of duplicating it
    again = bank.add([NewQA(*FACTS["h-python"][1][0], "gold")], bank.embed("Python", [NewQA(*FACTS["h-python"][1][0], "gold")]),
                     passage_hash="h-python", title="Python", document_id=None, version=3)
    assert again == ids["h-python"] and bank.get(again)[0].version == 3
    state.close()

    # a restart reads the saved index
    state = State(tmp_path / "seal.db")
    bank = ReplayBank(state, embedder, index_path)
    assert bank.index.ntotal == 5
    # lost index: rebuilt from SQLite, same answers
    index_path.unlink()
    bank = ReplayBank(state, embedder, index_path)
    assert bank.index.ntotal == 5 and index_path.exists()
    assert bank.search("kidney urine", 1)[0][0].passage_hash == "h-kidney"
    # corrupt index: rebuilt
    index_path.write_bytes(b"not a faiss index")
    bank = ReplayBank(state, embedder, index_path)
    assert bank.index.ntotal == 5
    # stale index (a crash after the database commit, before the index write): rebuilt
    stale = faiss.IndexIDMap2(faiss.IndexFlatIP(384))
    stale.add_with_ids(np.zeros((1, 384), dtype=np.float32), np.array([1], dtype=np.int64))
    faiss.write_index(stale, str(index_path))
    bank = ReplayBank(state, embedder, index_path)
    assert sorted(faiss.vector_to_array(bank.index.id_map).tolist()) == [1, 2, 3, 4, 5]


def test_base_model_embedder_fallback(tmp_path, tiny_cfg):
    from seal_agent.memory.embedding import load_embedder

    tiny_cfg.replay.embedder = "base-model"
    emb = load_embedder(tiny_cfg)
    assert emb.dim == 64  # the tiny model's hidden size
    vectors = emb.embed(["Rollo led the Normans.", "Kidneys filter blood."])
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    bank = ReplayBank(State(tmp_path / "seal.db"), emb, tmp_path / "replay.faiss")
    fill(bank)
    assert bank.index.ntotal == 5 and len(bank.search("Rollo", 3)) == 3


def test_replay_sample_nearest_plus_random_only_on_the_live_line(tmp_path, embedder):
    state = State(tmp_path / "seal.db")
    bank = ReplayBank(state, embedder, tmp_path / "replay.faiss")
    fill(bank, version=1)
    nearest, others = bank.replay_sample("Vikings led by Rollo settled in France", [0, 1], k=2, m=1,
                                         exclude_passage="h-python")
    assert {q.passage_hash for q in nearest} == {"h-normans"}
    assert len(others) == 1 and others[0].passage_hash == "h-kidney"
    # versions off the live line (undone by a rollback) are not replayed
    assert bank.replay_sample("Rollo", [0], k=2, m=2, exclude_passage="x") == ([], [])
    stats = bank.stats([0, 1])
    assert stats["qas"] == 5 and stats["passages"] == 3 and stats["active_qas"] == 5
    assert stats["by_source"] == {"gold": 5}


def test_answers_come_from_the_passage_and_questions_must_not_give_them_away():
    passage = ("The Normans descend from Norse raiders led by Rollo. In 911 they settled in Normandy. "
               "The Treaty of Saint-Clair-sur-Epte gave them land. It was signed by Charles the Simple.")
    spans = answer_spans(passage, title="Normans", limit=10)
    answers = [a for a, _ in spans]
    # dates, names, numbers, one sentence at a time (round robin); the title and "The"/"It" skipped
    assert answers[:4] == ["Norse", "Normandy", "Treaty of Saint-Clair-sur-Epte", "Charles the Simple"]
    assert "Rollo" in answers and "911" in answers and "Normans" not in answers
    assert all(a.lower() not in ("the", "it", "in") for a in answers)
    assert all(a in passage for a in answers)
    assert all(a in sentence and sentence in passage for a, sentence in spans)  # each with its own sentence
    assert spans[0] == ("Norse", "The Normans descend from Norse raiders led by Rollo.")
    assert answer_spans("no names or numbers here.") == []
    assert answer_spans("Through the years they grew.") == []  # a capitalized first word is not a name
    assert answer_spans("It ended in the 10th century.") == [("10th", "It ended in the 10th century.")]
    assert cloze("In 911 they settled in Normandy.", "911") == "In ___ they settled in Normandy."
    assert usable('Fill in the blank (Normans): "In ___ they settled in Normandy."', "911")
    assert clean_question("Question: Who led the raiders?\nAnswer: Rollo") == "Who led the raiders?"
    assert clean_question("\n\n  **Q1:** When did they settle?") == "When did they settle?"
    assert usable("Who led the Norse raiders?", "Rollo")
    assert not usable("Was Rollo the leader?", "Rollo")  # gives the answer away
    assert not usable("Rollo led them", "Norse")  # not a question
    assert not usable("Who?", "Rollo")  # too short


def test_gate_arithmetic():
    c = Check(replay_ids=[1, 2, 3, 4], before={1: True, 2: True, 3: False, 4: True},
              after={1: True, 2: False, 3: True, 4: True})
    assert c.flipped == [2] and c.recovered == [3] and c.lost_fraction == pytest.approx(1 / 3)
    assert c.accuracy(c.before) == c.accuracy(c.after) == 0.75
    assert not passes(c, 0.0) and passes(c, 0.34)
    assert passes(Check([], {}, {}), 0.0)


# -- the gate on the tiny model -------------------------------------------

A_TEXT = "The Normans were descended from Norse raiders led by Rollo. They settled in Normandy."
B_TEXT = "In 1066 William the Conqueror led the Normans to victory at the Battle of Hastings."


def _agent(tiny_config, *sets):
    return SealAgent(load_config(tiny_config, ["replay.random_m=4", "replay.nearest_k=4", *sets]))


def _known_facts(agent, passage_hash: str, title: str) -> list[int]:
    """QAs the live model answers correctly (gold = its own answer), as if it had
    learned them with the passage `passage_hash`."""
    live = agent.live
    questions = [Question(q, "", title) for q in ("Who led the Norse raiders?", "Where did the Normans settle?",
                                                  "Who was Rollo?", "What is Normandy?")]
    answers = [s.prediction for s in evaluate(live.model, live.tokenizer, questions, agent.cfg.qa,
                                              use_chat=True, compute_dtype=answer_dtype(agent.cfg))]
    qas = [NewQA(q.question, a, "gold") for q, a in zip(questions, answers) if a.strip()]
    assert qas, "the tiny model should answer something"
    ids = agent.bank.add(qas, agent.bank.embed(title, qas), passage_hash=passage_hash, title=title,
                         document_id=None, version=live.version)
    agent.bank.sync()
    return ids


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def two_docs(tmp_path):
    a, b = tmp_path / "normans.txt", tmp_path / "hastings.txt"
    a.write_text(A_TEXT)
    b.write_text(B_TEXT)
    return a, b


def test_gate_accepts_a_harmless_update_and_caches_correctness(tiny_config, two_docs):
    agent = _agent(tiny_config, "train.lr=1e-9")
    try:
        first = agent.learn(two_docs[0]).as_dict()
        assert first["learned"] == 1
        h = first["passage_reports"][0]["hash"]
        ids = _known_facts(agent, h, "normans")
        report = agent.learn(two_docs[1]).as_dict()
        f = report["forgetting"]
        assert report["learned"] == 1 and f["decision"] == "accepted" and f["attempts"] == 1
        assert f["replay_n"] == len(ids) and f["before"] == 1.0 and f["after"] == 1.0 and f["flipped"] == []
        # both sides are cached per version
        assert agent.bank.cached(1, ids) == dict.fromkeys(ids, True)
        assert agent.bank.cached(2, ids) == dict.fromkeys(ids, True)
        events = [e["kind"] for e in agent.events()]
        assert "learn.check" in events
    finally:
        agent.close()


@pytest.mark.parametrize("rehearse_first", [True, False])
def test_the_first_attempt_rehearses_the_neighbours_unless_told_not_to(tiny_config, two_docs, rehearse_first):
    agent = _agent(tiny_config, "train.lr=1e-9", f"replay.rehearse_first={str(rehearse_first).lower()}")
    try:
        agent.learn(two_docs[0])
        h = agent.state.query("SELECT hash FROM passages")[0]["hash"]
        _known_facts(agent, h, "normans")
        examples: list[int] = []

        def progress(stage, info):
            if stage == "train":
                examples.append(info["examples"])

        report = agent.learn(two_docs[1], progress=progress).as_dict()
        [p] = report["passage_reports"]
        assert report["forgetting"]["attempts"] == 1 and report["learned"] == 1
        # the Normans passage (behind the nearest replay QAs) is rehearsed from the start, or not at all
        assert (p["train"]["rehearsal_examples"] > 0) == rehearse_first
        assert examples == [p["self_edit_items"] + 1 + p["train"]["rehearsal_examples"]]
    finally:
        agent.close()


@pytest.mark.parametrize("rehearse_first,allowed", [(False, 2), (True, 2), (True, 1)])
def test_gate_rejects_a_harmful_update_after_rehearsal_and_leaves_the_model_untouched(tiny_config, two_docs,
                                                                                      rehearse_first, allowed):
    """The first attempt forgets; a second rehearses the Normans passage behind
    the forgotten QAs and still forgets. Where the first attempt rehearsed that
    passage already (`rehearse_first`), a retry would train on the same
    examples with another seed: none is made, the update is rejected at once.
    With one attempt allowed (the default), it is rejected after the first."""
    agent = _agent(tiny_config, f"replay.rehearse_first={str(rehearse_first).lower()}", f"replay.attempts={allowed}")
    try:
        agent.learn(two_docs[0])
        h = agent.state.query("SELECT hash FROM passages")[0]["hash"]
        ids = _known_facts(agent, h, "normans")
        before = weights(agent.live.model)
        version = agent.live.version
        agent.cfg.train.lr = 0.5  # absurd: wrecks the tiny model (but stays finite)
        report = agent.learn(two_docs[1]).as_dict()
        [p] = report["passage_reports"]
        f = report["forgetting"]
        assert p["status"] == "rejected-forgetting" and report["status"] == "rejected-forgetting"
        attempts = 1 if rehearse_first else 2
        same = rehearse_first and allowed == 2  # a retry was allowed but would have repeated the examples
        assert f["decision"] == "rejected" and f["attempts"] == attempts and f["flipped"]
        assert f["before"] == 1.0 and f["after"] < 1.0 and f["replay_n"] == len(ids)
        assert p["train"]["rehearsal_examples"] > 0  # the last attempt rehearsed the Normans passage
        assert ("same examples" in p["error"]) == same
        # the live model is bit-for-bit what it was; no version was made
        assert agent.live.version == version == agent.state.live_version()
        after = weights(agent.live.model)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert agent.state.max_version() == version
        db = sqlite3.connect(agent.cfg.state_path("database"))
        assert db.execute("SELECT status FROM documents ORDER BY id DESC").fetchone()[0] == "rejected-forgetting"
        status, info = db.execute("SELECT status, info FROM passages ORDER BY rowid DESC").fetchone()
        assert status == "rejected-forgetting" and json.loads(info)["forgetting"]["decision"] == "rejected"
        assert db.execute("SELECT outcome FROM self_edits ORDER BY id DESC").fetchone()[0] == "rejected-forgetting"
        kinds = [r[0] for r in db.execute("SELECT kind FROM events ORDER BY id")]
        assert kinds[-1 - attempts:] == ["learn.check"] * attempts + ["learn.rejected"]
        last_check = db.execute("SELECT message FROM events WHERE kind = 'learn.check' ORDER BY id DESC").fetchone()[0]
        assert last_check.endswith("rehearse the same examples again)" if same else ": rejected")
        # a rejected passage is not "already learned": it can be tried again
        agent.cfg.train.lr = 1e-9
        again = agent.learn(two_docs[1]).as_dict()
        assert again["learned"] == 1 and again["forgetting"]["decision"] == "accepted"
    finally:
        agent.close()


def test_gate_off_accepts_and_reports(tiny_config, two_docs):
    agent = _agent(tiny_config, "replay.gate=false")
    try:
        agent.learn(two_docs[0])
        h = agent.state.query("SELECT hash FROM passages")[0]["hash"]
        _known_facts(agent, h, "normans")
        agent.cfg.train.lr = 0.5
        report = agent.learn(two_docs[1]).as_dict()
        assert report["learned"] == 1 and report["forgetting"]["decision"] == "accepted"
        assert report["forgetting"]["flipped"] and report["forgetting"]["attempts"] == 1
    finally:
        agent.close()


def test_replay_cli_and_learn_json_forgetting(tiny_config, squad_file):
    from click.testing import CliRunner

    from seal_agent.cli import main

    def run(*args):
        return CliRunner().invoke(main, ["--config", str(tiny_config), *map(str, args)], catch_exceptions=False)

    r = run("learn", squad_file, "--json")
    assert r.exit_code == 0, r.output
    [doc] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    gold = json.loads(squad_file.read_text())
    n0, n1 = (len(item["questions"]) for item in gold)
    first, second = doc["passage_reports"]
    assert first["qa_source"] == second["qa_source"] == "gold"
    # the first passage had nothing to replay; the second replayed the first's questions
    assert first["forgetting"]["replay_n"] == 0 and second["forgetting"]["replay_n"] == min(n0, 8)
    f = doc["forgetting"]
    assert {"replay_n", "before", "after", "flipped", "attempts", "decision"} <= f.keys()
    # the random tiny model answered none of the replayed QAs before the update, so
    # there was nothing to forget: the gate accepts, and both passages are learned
    assert f["replay_n"] == min(n0, 8) and f["before"] == 0.0 and f["flipped"] == []
    assert f["decision"] == second["forgetting"]["decision"] == "accepted"
    assert [p["status"] for p in doc["passage_reports"]] == ["learned", "learned"]

    r = run("replay", "stats", "--json")
    [stats] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    learned = sum(p["status"] == "learned" for p in doc["passage_reports"])
    assert stats["qas"] == (n0 + n1 if learned == 2 else n0) and stats["documents"] == 1
    assert stats["index_vectors"] == stats["qas"]

    r = run("replay", "search", gold[0]["questions"][0]["question"], "-k", "1", "--json")
    [hit] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert hit["question"] == gold[0]["questions"][0]["question"] and hit["source"] == "gold"

    r = run("replay", "check", "--json")
    [check] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert check["n"] == stats["active_qas"] and 0 <= check["accuracy"] <= 1
    assert check["documents"][0]["n"] == check["n"]
    r = run("replay", "stats")
    assert r.exit_code == 0 and "QAs" in r.stdout
    # the scheduled task, run here (no daemon): same check, recorded as an event
    r = run("schedule", "run", "replay_check", "--json")
    [task] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert task["n"] == check["n"] and task["accuracy"] == check["accuracy"]
    assert run("schedule", "run", "nope").exit_code == 1
    # every decision is an event in history
    r = run("history", "--events", "20", "--json")
    kinds = [json.loads(x)["kind"] for x in r.stdout.splitlines() if x.startswith("{")]
    assert kinds.count("learn.check") >= 1 and kinds.count("learn.accepted") == learned
    assert kinds[-1] == "replay.check"
    assert "learn.check" in run("history", "--events", "5").stdout
    r = run("replay", "search", " ")
    assert r.exit_code == 1 and "empty" in r.output


def test_eval_continual_writes_matrix_and_heatmap(tiny_config, squad_file, tmp_path):
    from click.testing import CliRunner

    from seal_agent.cli import main

    out = tmp_path / "cont"
    r = CliRunner().invoke(main, ["--config", str(tiny_config), "eval", "continual", "--data", str(squad_file),
                                  "--n", "2", "--gate", "off", "--out", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    [res] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    m = res["matrix"]
    assert len(m) == 3 and len(m[0]) == 2 and len(m[1]) == 1 and len(m[2]) == 2  # base row, then lower triangle
    assert res["gate"] is False and res["accepted"] == 2 and len(res["steps"]) == 2
    assert (out / "heatmap-gate-off.png").stat().st_size > 1000 and (out / "continual-gate-off.json").exists()
    # the run had its own state: the configured one was not touched
    assert not (tmp_path / "state" / "state" / "seal.db").exists()
    # the same directory is not reused
    r = CliRunner().invoke(main, ["--config", str(tiny_config), "eval", "continual", "--data", str(squad_file),
                                  "--n", "2", "--gate", "off", "--out", str(out)])
    assert r.exit_code == 1 and "already holds a run" in r.output


def test_retention_summary_arithmetic():
    from seal_agent.evaluation.continual import summarize

    m = [[0.0, 0.1, 0.2], [0.5], [0.3, 0.6], [0.2, 0.4, 0.7]]
    s = summarize(m)
    assert s["just_learned_mean"] == pytest.approx((0.5 + 0.6 + 0.7) / 3, abs=1e-4)
    assert s["forgetting"] == pytest.approx(((0.5 - 0.2) + (0.6 - 0.4)) / 2, abs=1e-4)
    assert s["earlier_final_mean"] == pytest.approx(0.3, abs=1e-4)


def test_an_interrupted_check_leaves_no_adapter_on_the_live_model(tiny_config, two_docs):
    """Ctrl-C while the candidate is being checked: the candidate is taken off again."""
    agent = _agent(tiny_config)
    try:
        agent.learn(two_docs[0])
        h = agent.state.query("SELECT hash FROM passages")[0]["hash"]
        _known_facts(agent, h, "normans")
        before = weights(agent.live.model)

        def interrupt(stage, _info):
            if stage == "replay":
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            agent.learn(two_docs[1], interrupt)
        after = weights(agent.live.model)
        assert type(agent.live.model).__name__ == "LlamaForCausalLM"
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert agent.state.max_version() == agent.live.version == 1
        # and the next document learns normally
        assert agent.learn(two_docs[1]).as_dict()["status"] in ("done", "rejected-forgetting")
    finally:
        agent.close()
