"""Knowledge modules (memory.mode = "modules"): one LoRA per document, routed by
retrieval, consolidated in bulk; on the tiny model, with the real loader, peft,
FAISS, SQLite, the CLI as a subprocess and the daemon with the openai client."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch
from conftest import DAEMON_SECTIONS, SQUAD_DEV, write_config
from test_daemon import Daemon, free_port

from seal_agent.agent import SealAgent
from seal_agent.config import load_config
from seal_agent.learning.consolidation import decide
from seal_agent.memory.live import fingerprints
from seal_agent.model.inner_loop import applied
from seal_agent.qa.answering import Question, questions_of
from seal_agent.service.daemon import memory_status

ROOT = Path(__file__).resolve().parent.parent
ITEMS = json.loads(SQUAD_DEV.read_text())
UNRELATED = "How long should sourdough bread dough rise before baking?"


def squad_doc(tmp_path: Path, i: int) -> Path:
    it = ITEMS[i]
    path = tmp_path / f"doc{i}.json"
    path.write_text(json.dumps([{k: it[k] for k in ("title", "context", "questions")}]))
    return path


def questions(i: int) -> list[Question]:
    from seal_agent.documents import QA

    it = ITEMS[i]
    return questions_of(it["title"], [QA(q["question"], q["answer"]) for q in it["questions"]])


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def config(tmp_path, tiny_model_dir) -> Path:
    return write_config(tmp_path / "config.toml", tiny_model_dir, tmp_path / "state", mode="modules")


@pytest.fixture
def agent(config):
    a = SealAgent(load_config(config))
    yield a
    a.close()


def probe(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The Normans gave their name to Normandy.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_a_module_never_changes_the_weights_or_another_module(agent, tmp_path):
    live = agent.live
    base = weights(live.model)
    plain = probe(live.model, live.tokenizer)
    r1 = agent.learn(squad_doc(tmp_path, 0)).as_dict()
    assert r1["modules"] == [1] and r1["learned"] == 1 and r1["rejected"] == 0
    files = {p.name: p.read_bytes() for p in agent.modules.path(1).iterdir()}
    with applied(live.model, agent.modules.path(1)) as m:
        with_first = probe(m, live.tokenizer)
    assert not torch.equal(with_first, plain)  # the module does change what the model says
    assert same(base, weights(live.model))  # ...and taking it off gives back the very same tensors

    r2 = agent.learn(squad_doc(tmp_path, 1)).as_dict()
    assert r2["modules"] == [2]
    assert same(base, weights(live.model))  # bit for bit: learning a document never touched the weights
    assert {p.name: p.read_bytes() for p in agent.modules.path(1).iterdir()} == files
    with applied(live.model, agent.modules.path(1)) as m:
        assert torch.equal(probe(m, live.tokenizer), with_first)  # module 1 answers as before
    with applied(live.model, agent.modules.path(2)) as m:
        assert not torch.equal(probe(m, live.tokenizer), with_first)
    rows = agent.history()
    assert [(r["kind"], r["routed"], r["module"]) for r in rows] == [("base", 0, None), ("module", 1, 1),
                                                                     ("module", 2, 2)]
    # the manifest says what the module is
    manifest = json.loads((agent.modules.path(2) / "manifest.json").read_text())
    assert manifest["module"] == 2 and manifest["trained_on"] == 1
    assert manifest["passages"][0]["title"] == ITEMS[1]["title"] and manifest["self_edits"]


def test_the_router_picks_a_documents_module_for_its_questions_and_none_for_others(agent, tmp_path):
    agent.learn(squad_doc(tmp_path, 0))
    agent.learn(squad_doc(tmp_path, 1))
    k, v = agent.knowledge, agent.live.version
    threshold = agent.cfg.memory.route_threshold
    for i, module in ((0, 1), (1, 2)):
        routes = k.route_questions(v, questions(i))
        assert [r.nearest for r in routes] == [module] * len(routes)  # each question finds its document
        # ...and its module is applied exactly when the score reaches the threshold
        assert [r.module for r in routes] == [module if r.score >= threshold else None for r in routes]
        assert any(r.module == module for r in routes)
        for r in routes:  # the score is the similarity plus the weighted share of terms found
            assert r.score == pytest.approx(r.similarity + agent.cfg.memory.lexical_weight * r.overlap)
    [unrelated] = k.route(v, [UNRELATED])
    assert unrelated.module is None and unrelated.nearest in (1, 2)
    assert unrelated.score < threshold
    # the threshold decides: above every score nothing is routed, below every one all is
    for threshold, expect in ((2.0, None), (-1.0, unrelated.nearest)):
        cfg = load_config(agent.cfg.root / "config.toml", [f"memory.route_threshold={threshold}"])
        other = SealAgent(cfg)
        try:
            assert other.knowledge.route(v, [UNRELATED])[0].module == expect
        finally:
            other.close()
    # the router's keys are the passages and their sentences, never the questions asked
    keys = [r["text"] for r in agent.state.query("SELECT text FROM module_keys WHERE module_id = 1")]
    assert keys[0] == f"{ITEMS[0]['title']}\n{ITEMS[0]['context']}" and len(keys) > 2
    assert not any(q["question"] in key for q in ITEMS[0]["questions"] for key in keys)


def test_ask_replay_check_and_the_answer_with_the_module_are_one_path(agent, tmp_path):
    from seal_agent.model.loader import answer_dtype
    from seal_agent.qa.answering import answer

    agent.learn(squad_doc(tmp_path, 0))
    q = f"Topic: {ITEMS[0]['title']}\n{ITEMS[0]['questions'][0]['question']}"
    got = agent.ask(q)
    assert [m["module"] for m in got["modules"]] == [1] and got["modules"][0]["title"] == ITEMS[0]["title"]
    live = agent.live
    with applied(live.model, agent.modules.path(1)) as m:
        [direct] = answer(m, live.tokenizer, [Question(q, "")], agent.cfg.qa, use_chat=True,
                          compute_dtype=answer_dtype(agent.cfg))
    assert got["answer"] == direct
    assert agent.ask(UNRELATED)["modules"] == []
    check = agent.replay_check()
    assert check["n"] == len(ITEMS[0]["questions"]) and check["version"] == 1


def test_no_document_is_refused_and_one_that_learned_nothing_is_flagged(agent, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("Zanzibar lighthouse keepers logged 4711 ships in 1911, mostly dhows from Oman. " * 3)
    for path in (squad_doc(tmp_path, 0), squad_doc(tmp_path, 1), note):
        report = agent.learn(path).as_dict()
        assert report["status"] == "done" and report["learned"] == 1 and report["rejected"] == 0
    # a random tiny model learns nothing measurable: learned anyway, and flagged, saying why
    reports = [json.loads(r["info"])["passage_reports"][0] for r in
               agent.state.query("SELECT info FROM documents ORDER BY id")]
    assert reports[0]["flagged"].startswith("learned nothing measurable")
    status = memory_status(agent, agent.state.live_version())
    assert status["routed_modules"] == 3 and len(status["flagged"]) == 3
    if not reports[2]["n_questions"]:  # no question written about it that the model could check
        assert reports[2]["flagged"].startswith("unchecked")
    # the same document again is a duplicate, not a second module
    again = agent.learn(squad_doc(tmp_path, 0)).as_dict()
    assert again["duplicates"] == 1 and again["modules"] == [] and memory_status(agent, 3)["routed_modules"] == 3


def test_consolidation_decides_by_the_answers():
    t, f = True, False
    module = {1: {10: t, 11: f}, 2: {20: t, 21: t}, 3: {}}
    alone = {1: {10: t, 11: t}, 2: {20: t, 21: f}, 3: {}}
    rechecked = {2: {20: t, 21: t}}
    v = decide(module, alone, rechecked, {30: t, 31: f}, {30: t, 31: f}, limit=0.0)
    # 1: the weights alone answer as well as its module (better): absorbed. 2: worse: kept.
    # 3: no QAs to show it: kept.
    assert v.absorbed == [1] and v.kept == [2, 3] and not v.refused
    # the held documents lose a known answer: refused, unless the limit allows it
    assert decide(module, alone, rechecked, {30: t, 31: t}, {30: f, 31: t}, limit=0.0).refused
    assert not decide(module, alone, rechecked, {30: t, 31: t}, {30: f, 31: t}, limit=0.5).refused
    # a kept module that loses an answer on the new weights: refused
    v = decide(module, alone, {2: {20: f, 21: t}}, {}, {}, limit=0.0)
    assert v.refused and v.worst_kept == 0.5
    # equal is absorbed; one answer fewer is not
    assert decide({1: {1: t, 2: f}}, {1: {1: f, 2: t}}, {}, {}, {}, 0.0).absorbed == [1]
    assert decide({1: {1: t, 2: f}}, {1: {1: f, 2: f}}, {}, {}, {}, 0.0).kept == [1]


def test_consolidation_goes_live_and_rollback_across_it_restores_answers_and_routing(agent, tmp_path):
    agent.learn(squad_doc(tmp_path, 0))
    agent.learn(squad_doc(tmp_path, 1))
    live = agent.live
    asked = [f"Topic: {ITEMS[i]['title']}\n{ITEMS[i]['questions'][0]['question']}" for i in (0, 1)] + [UNRELATED]
    at_2 = [agent.ask(q) for q in asked]
    fp_2 = fingerprints(live.model, live.tokenizer)
    result = agent.consolidate()
    assert result["decision"] == "consolidated" and result["version"] == 3
    # the tiny model answers nothing either way: the new weights answer as well, both absorbed
    assert sorted(result["absorbed"]) == [1, 2] and result["kept"] == []
    row = agent.state.version(3)
    assert row.stats["kind"] == "consolidation" and row.stats["routed"] == []
    assert (agent.log.path(3) / "adapter_config.json").exists()
    assert fingerprints(live.model, live.tokenizer) != fp_2  # new weights
    at_3 = [agent.ask(q) for q in asked]
    assert all(a["modules"] == [] for a in at_3)  # absorbed modules are no longer routed
    assert agent.modules.path(1).exists()  # ...and stay on disk

    back = agent.rollback(2)
    assert back["verified"] == {"weights": True, "logits": True}
    assert fingerprints(agent.live.model, live.tokenizer) == fp_2
    assert [agent.ask(q) for q in asked] == at_2  # same answers, same modules
    agent.rollback(3)
    assert [agent.ask(q) for q in asked] == at_3
    assert "consolidation" in {r["kind"] for r in agent.history()}


def test_consolidation_retrains_the_modules_it_keeps_on_the_new_weights(tmp_path, tiny_model_dir):
    """A document only its module answers is kept; its module, trained on the old
    weights, is trained again on the new ones and routed under a new id."""
    from seal_agent.qa.grading import normalize_answer

    def fresh(name: str, *extra: str) -> SealAgent:
        cfg = write_config(tmp_path / f"{name}.toml", tiny_model_dir, tmp_path / name, mode="modules")
        return SealAgent(load_config(cfg, ["memory.max_forgetting=1.0", *extra]))

    asked = ITEMS[0]["questions"][0]["question"]
    probe_agent = fresh("probe")
    try:  # what document 0's module answers (training is seeded by the passage: the same module)
        probe_agent.learn(squad_doc(tmp_path, 0))
        said = probe_agent.ask(f"Topic: {ITEMS[0]['title']}\n{asked}")["answer"]
    finally:
        probe_agent.close()
    assert normalize_answer(said)
    doc = tmp_path / "only-its-module.json"
    doc.write_text(json.dumps([{"title": ITEMS[0]["title"], "context": ITEMS[0]["context"],
                                "questions": [{"question": asked, "answer": said}]}]))
    for retrain in (False, True):
        agent = fresh(f"s{retrain}", f"memory.retrain_kept={str(retrain).lower()}")
        try:
            [learned] = agent.learn(doc).passages
            assert learned.qa_after == 1.0  # its module answers it...
            result = agent.consolidate()
            assert result["kept"] == [1] and result["absorbed"] == []  # ...and the new weights alone do not
            assert result["decision"] == "consolidated" and result["version"] == 2
            row = agent.state.version(2)
            if not retrain:  # kept as it is
                assert result["retrained"] == {} and row.stats["routed"] == [1]
                assert [m.id for m in agent.modules.all()] == [1]
                continue
            assert result["retrained"] == {1: 2} and row.stats["routed"] == [2]
            new = agent.modules.get(2)
            assert new.trained_on == 2 and new.stats["retrained_from"] == 1
            assert new.passage_hashes == agent.modules.get(1).passage_hashes
            keys = "SELECT text, embedding FROM module_keys WHERE module_id = ? ORDER BY id"
            assert agent.state.query(keys, (2,)) and [tuple(r) for r in agent.state.query(keys, (2,))] == \
                [tuple(r) for r in agent.state.query(keys, (1,))]
            manifest = json.loads((agent.modules.path(2) / "manifest.json").read_text())
            assert manifest["retrained_from"] == 1 and manifest["trained_on"] == 2
            question = f"Topic: {ITEMS[0]['title']}\n{asked}"
            assert [m["module"] for m in agent.ask(question)["modules"]] == [2]
            agent.rollback(1)  # the old weights route to the old module again
            assert [m["module"] for m in agent.ask(question)["modules"]] == [1]
            assert agent.ask(question)["answer"] == said
        finally:
            agent.close()


def test_consolidation_yields_to_a_waiting_document_and_changes_nothing(agent, tmp_path):
    agent.learn(squad_doc(tmp_path, 0))
    before = weights(agent.live.model)
    result = agent.consolidate(should_stop=lambda: True)
    assert result["decision"] == "yielded" and agent.state.live_version() == 1
    assert same(before, weights(agent.live.model)) and agent.log.versions() == []


def test_consolidate_is_refused_on_the_merge_line(tiny_config):
    r = subprocess.run([sys.executable, "-m", "seal_agent", "--config", str(tiny_config), "consolidate"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and 'memory.mode = "modules"' in r.stderr and "Traceback" not in r.stderr


def _run_until_killed(args: list[str], config: Path, started) -> None:
    """Run the CLI and kill -9 it once `started(its stderr)` holds and a moment has passed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = config.parent / f"killed-{time.monotonic_ns()}.log"
    proc = subprocess.Popen([sys.executable, "-m", "seal_agent", "--config", str(config), *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 120
    while not started(log.read_text()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the command ended before it could be killed"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_during_module_training_and_consolidation_loses_nothing(config, tmp_path):
    doc0, doc1 = squad_doc(tmp_path, 0), squad_doc(tmp_path, 1)
    agent = SealAgent(load_config(config))
    agent.learn(doc0)
    fp_1 = fingerprints(agent.live.model, agent.live.tokenizer)
    agent.close()
    db = tmp_path / "state" / "state" / "seal.db"

    def edits() -> int:
        import sqlite3

        with sqlite3.connect(db) as c:
            return c.execute("SELECT COUNT(*) FROM self_edits").fetchone()[0]

    # killed while training its module: the self-edit is written, training runs long
    _run_until_killed(["--set", "train.epochs=5000", "learn", str(doc1)], config, lambda _: edits() == 2)
    agent = SealAgent(load_config(config))
    agent.own()  # the next owner repairs what the crash left
    try:
        assert agent.state.live_version() == 1 and [m.id for m in agent.modules.all()] == [1]
        assert agent.live.load(1, verify=True) == {"weights": True, "logits": True}
        assert agent.ask(f"Topic: {ITEMS[0]['title']}\n{ITEMS[0]['questions'][0]['question']}")["modules"][0][
            "module"] == 1
        assert agent.learn(doc1).as_dict()["modules"] == [2]  # learned in full the next time
    finally:
        agent.close()

    # killed while consolidating: nothing of it goes live
    _run_until_killed(["--set", "memory.consolidate_epochs=5000", "consolidate"], config,
                      lambda log: "training new weights" in log)
    agent = SealAgent(load_config(config))
    agent.own()
    try:
        assert agent.state.live_version() == 2 and agent.state.max_version() == 2
        assert agent.log.versions() == []  # no half-written consolidation left in the log
        assert fingerprints(agent.live.model, agent.live.tokenizer) == fp_1  # the weights, as before
        assert agent.knowledge.route_questions(2, questions(1))[0].module == 2
        assert agent.consolidate()["decision"] == "consolidated"  # and it can be run again
    finally:
        agent.close()


def test_a_module_directory_the_database_never_recorded_is_moved_aside(agent, tmp_path):
    agent.learn(squad_doc(tmp_path, 0))
    import shutil

    shutil.copytree(agent.modules.path(1), agent.modules.path(2))  # as if killed between rename and commit
    other = SealAgent(load_config(agent.cfg.root / "config.toml"))
    agent.close()
    try:
        other.own()
        assert other.modules.log.versions() == [1]
        assert list((other.modules.log.root / "discarded").iterdir())
        assert [m.id for m in other.modules.all()] == [1]
    finally:
        other.close()


@pytest.fixture
def daemon_config(tmp_path, tiny_model_dir):
    return write_config(tmp_path / "config.toml", tiny_model_dir, tmp_path / "state", DAEMON_SECTIONS,
                        mode="modules")


def test_the_api_says_which_modules_an_answer_used(daemon_config, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = Daemon(daemon_config, free_port(), "--inbox", str(inbox))
    try:
        d.wait_up()
        squad_doc(inbox, 0)
        d.wait_for(lambda: d.status()["queue"]["done"] == 1, what="the document learned")
        s = d.status()
        assert s["live_version"] == 1 and s["memory"]["routed_modules"] == 1 and s["memory"]["mode"] == "modules"
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="none")
        asked = f"Topic: {ITEMS[0]['title']}\n{ITEMS[0]['questions'][0]['question']}"
        r = client.chat.completions.create(model="seal-agent", max_tokens=4,
                                           messages=[{"role": "user", "content": asked}])
        used = r.model_extra["seal_modules"]
        assert [m["module"] for m in used] == [1] and used[0]["title"] == ITEMS[0]["title"]
        r = client.chat.completions.create(model="seal-agent", max_tokens=4,
                                           messages=[{"role": "user", "content": UNRELATED}])
        assert r.model_extra["seal_modules"] == []
        chunks = list(client.completions.create(model="seal-agent", prompt=asked, max_tokens=3, stream=True))
        assert [m["module"] for m in chunks[0].model_extra["seal_modules"]] == [1]
        # routed and unrouted in turn: the module is merged and taken off again each time, exactly
        answers = [client.completions.create(model="seal-agent", prompt=p, max_tokens=4).choices[0].text
                   for p in (asked, UNRELATED, asked, UNRELATED)]
        assert answers[0] == answers[2] and answers[1] == answers[3]
    finally:
        assert d.stop() == 0, d.log.read_text()


def test_eval_continual_on_modules_reports_what_the_issue_asks(config, tmp_path):
    from seal_agent.evaluation.continual import evaluate_continual
    from seal_agent.evaluation.routing import evaluate_routing

    data = tmp_path / "dev.json"
    data.write_text(json.dumps(ITEMS[:5]))
    result, files = evaluate_continual(load_config(config), data=data, n=3, every=2, unlearned=2, consolidate=True,
                                       ppl_data=data, ppl_n=2, self_edits="external:gpt-4.1", out_dir=tmp_path / "c")
    assert result["mode"] == "modules" and result["refused"] == 0 and result["accepted"] == 3
    m = result["matrix"]
    # checkpoints after steps 2 and 3 (the last); after step 1 only the passage just learned
    assert [len(row) for row in m] == [3, 1, 2, 3] and None not in m[2] + m[3]
    assert [c["step"] for c in result["curve"]] == [2, 3]
    assert result["final_mean"] == result["summary"]["final_mean"]
    assert result["unlearned_questions"] == sum(len(ITEMS[i]["questions"]) for i in (3, 4))
    # the trained modules' router decides as `eval routing` does on the same passages, untrained
    alone = evaluate_routing(load_config(config), data=data, n=3, unlearned=2)
    for k in ("router_recall_at_1", "router_applied_right_module", "unlearned_no_module"):
        assert result[k] == alone[k], k
    assert result["router_recall_at_1"] == 1.0 and 0.0 < result["router_applied_right_module"] <= 1.0
    # modules never change the weights: the final perplexity is the base's; a consolidation's is not
    ppl = result["perplexity"]
    assert ppl["final"] == ppl["base"] and ppl["consolidated"] != ppl["base"]
    assert result["consolidation"]["decision"] == "consolidated"
    assert all(files[k].stat().st_size > 1000 for k in ("heatmap", "retention"))


def test_what_a_routed_question_is_answered_with_is_the_memory_config(agent, tmp_path):
    """apply_modules and with_passage decide, for a routed question: the module
    merged in, the module's passage in the prompt (plain RAG), both, or neither."""
    import dataclasses

    from seal_agent.model.loader import answer_dtype
    from seal_agent.qa.answering import answer

    agent.learn(squad_doc(tmp_path, 0))
    live, k, mem = agent.live, agent.knowledge, agent.cfg.memory
    qs = [q for q, r in zip(questions(0), k.route_questions(live.version, questions(0))) if r.module == 1]
    assert qs and k.passage(1) == ITEMS[0]["context"]
    in_context = [dataclasses.replace(q, context=k.passage(1)) for q in qs]

    def direct(model, asked, with_passage):
        return answer(model, live.tokenizer, asked, agent.cfg.qa, use_chat=agent.cfg.model.use_chat_template,
                      compute_dtype=answer_dtype(agent.cfg), in_context=with_passage, max_new_tokens=8)

    with applied(live.model, agent.modules.path(1)) as m:
        expect = {(True, False): direct(m, qs, False), (True, True): direct(m, in_context, True)}
    expect |= {(False, False): direct(live.model, qs, False), (False, True): direct(live.model, in_context, True)}
    assert len({tuple(v) for v in expect.values()}) == 4  # the four ways answer differently here
    try:
        for (apply_modules, with_passage), want in expect.items():
            mem.apply_modules, mem.with_passage = apply_modules, with_passage
            got = k.answer(live.model, live.tokenizer, live.version, qs, max_new_tokens=8)
            assert [a.text for a in got] == want, (apply_modules, with_passage)
            assert all(a.route.module == 1 for a in got)
            assert (k.used(got[0].route)[0]["merged"], k.used(got[0].route)[0]["passage_in_prompt"]) == \
                (apply_modules, with_passage)
        # the API puts the passage before the question it routed by: the same answer as a
        # request that carries the passage itself, answered without with_passage
        from seal_agent.evaluation.bench import api_client
        from seal_agent.service.serving import Served, ServingOnly

        mem.apply_modules = True
        served = Served.from_config(agent.cfg, live.model, live.tokenizer, live.version, knowledge=k)
        asked = f"Topic: {ITEMS[0]['title']}\n{ITEMS[0]['questions'][0]['question']}"
        with api_client(ServingOnly(agent.cfg.api, served)) as client:
            def chat(content):
                r = client.chat.completions.create(model=agent.cfg.api.model_name, max_tokens=6, temperature=0,
                                                   messages=[{"role": "user", "content": content}])
                return r.choices[0].message.content, r.model_extra["seal_modules"]

            mem.with_passage = True
            prefix = k.passage_prefix(k.route(live.version, [asked])[0])
            assert ITEMS[0]["context"] in prefix
            with_passage, used = chat(asked)
            mem.with_passage = False
            plain, _ = chat(asked)
            carried, used_carried = chat(prefix + asked)
        assert [u["module"] for u in used] == [u["module"] for u in used_carried] == [1]
        assert used[0]["passage_in_prompt"] and not used_carried[0]["passage_in_prompt"]
        assert with_passage == carried and with_passage != plain
    finally:
        mem.apply_modules, mem.with_passage = True, False
