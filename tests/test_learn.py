"""The whole knowledge update on the tiny model: learn, duplicates, history,
rollback exactness, NaN abort, bad files, crash leftovers."""

import json
import sqlite3

import pytest
import torch
from conftest import SQUAD_DEV

from seal_agent.agent import SealAgent
from seal_agent.config import load_config
from seal_agent.errors import SealError
from seal_agent.memory.live import probe_logits, weights_fingerprint

NORMANS = "The Normans were descended from Norse raiders led by Rollo.\n\nThey settled in Normandy in the 10th century."
ENGLAND = "In 1066 William the Conqueror led the Normans to victory at the Battle of Hastings."


@pytest.fixture
def docs(tmp_path):
    a = tmp_path / "normans.md"
    a.write_text("# The Normans\n\n" + NORMANS)
    b = tmp_path / "england.txt"
    b.write_text(ENGLAND)
    return a, b


@pytest.fixture
def agent(tiny_config):
    a = SealAgent(load_config(tiny_config, ["policy.active='implications'"]))
    yield a
    a.close()


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_learn_makes_a_new_live_version_with_a_full_record(agent, docs):
    report = agent.learn(docs[0]).as_dict()
    assert report["status"] == "done" and report["learned"] == 1 and report["version"] == 1
    assert report["title"] == "The Normans"
    [p] = report["passage_reports"]
    assert p["train"]["steps"] == 2 * (p["self_edit_items"] + 1)  # 2 epochs x (items + passage)
    assert {"self-edit", "train", "commit"} <= p["stage_seconds"].keys()
    assert all(v >= 0 for v in p["stage_seconds"].values()) and sum(p["stage_seconds"].values()) <= p["seconds"] + 0.1
    manifest = agent.log.manifest(1)
    for key in ("version", "parent", "document", "passages", "self_edit", "lora", "train", "stats", "fingerprint"):
        assert key in manifest
    assert manifest["parent"] == 0 and manifest["lora"]["r"] == 32 and manifest["train"]["epochs"] == 2
    # the report counts the self-edit that was learned
    assert report["self_edit"]["chars"] == p["self_edit_chars"] == len(manifest["self_edit"]) > 0
    assert report["self_edit"]["items"] == p["self_edit_items"]
    assert (agent.log.path(1) / "adapter_model.safetensors").exists()
    hist = agent.history()
    assert [h["version"] for h in hist] == [0, 1] and [h["live"] for h in hist] == [False, True]
    assert hist[1]["documents"] == [str(docs[0].resolve())] and hist[1]["parent"] == 0
    db = sqlite3.connect(agent.cfg.state_path("database"))
    assert db.execute("SELECT text FROM self_edits").fetchone()[0] == manifest["self_edit"]
    assert db.execute("SELECT status FROM documents").fetchone()[0] == "done"
    kinds = [r[0] for r in db.execute("SELECT kind FROM events ORDER BY id")]
    assert kinds == ["init", "learn.accepted"]


def test_learning_changes_the_weights_and_answers_come_from_the_live_version(agent, docs):
    base = weights(agent.live.model)
    agent.learn(docs[0])
    after = weights(agent.live.model)
    changed = [k for k in base if not torch.equal(base[k], after[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # LoRA targets only
    assert not any("embed" in k or "norm" in k for k in changed)
    result = agent.ask("Who led the Norse raiders?", max_new_tokens=5)
    assert result["version"] == 1 and isinstance(result["answer"], str)


def test_same_passage_twice_is_a_noop(agent, docs, tmp_path):
    agent.learn(docs[0])
    copy = tmp_path / "copy.txt"
    copy.write_text("The Normans\n\n" + NORMANS.replace("\n\n", "\n\n  "))  # same passages, other whitespace
    report = agent.learn(docs[0]).as_dict()
    assert report["duplicates"] == 1 and report["learned"] == 0 and report["version"] == 1
    assert report["passage_reports"][0]["duplicate_of"] == 1
    assert len(agent.history()) == 2


def test_rollback_restores_a_version_exactly(tiny_config, docs):
    agent = SealAgent(load_config(tiny_config))
    agent.learn(docs[0])
    logits_v1 = probe_logits(agent.live.model, agent.live.tokenizer)
    weights_v1 = weights_fingerprint(agent.live.model)
    agent.learn(docs[1])
    assert agent.live.version == 2
    assert not torch.equal(probe_logits(agent.live.model, agent.live.tokenizer), logits_v1)
    agent.close()

    agent = SealAgent(load_config(tiny_config))  # a fresh process would do the same
    result = agent.rollback(1)
    assert result == {"from": 2, "version": 1, "verified": {"weights": True, "logits": True}}
    assert torch.equal(probe_logits(agent.live.model, agent.live.tokenizer), logits_v1)
    assert weights_fingerprint(agent.live.model) == weights_v1
    hist = {h["version"]: h for h in agent.history()}
    assert hist[1]["live"] and not hist[2]["live"]  # version 2 stays in the log

    # learning continues from version 1: the new version's parent is 1
    agent.learn(docs[1])
    assert agent.state.version(3).parent == 1
    assert agent.rollback(0)["verified"] == {"weights": True, "logits": True}
    agent.close()


def test_snapshots_rebuild_the_same_weights(tmp_path, tiny_model_dir, docs):
    from conftest import write_config

    cfg_path = write_config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "state",
                            "[adapter_log]\nsnapshot_every = 1\nkeep_snapshots = 1\n")
    agent = SealAgent(load_config(cfg_path))
    agent.learn(docs[0])
    agent.learn(docs[1])
    assert agent.log.snapshot_versions() == [2]  # the older one pruned
    fp = weights_fingerprint(agent.live.model)
    agent.live.load(2)
    assert weights_fingerprint(agent.live.model) == fp
    assert agent.live.load(1, verify=True) == {"weights": True, "logits": True}  # rebuilt from base
    agent.close()


def test_rollback_to_unknown_version(agent):
    with pytest.raises(SealError, match="no version 7"):
        agent.rollback(7)


def test_diverged_update_leaves_the_live_model_untouched(tiny_config, docs):
    agent = SealAgent(load_config(tiny_config, ["train.lr=inf"]))
    before = weights(agent.live.model)
    report = agent.learn(docs[0]).as_dict()
    assert report["status"] == "failed" and report["version"] == 0
    assert "abandoned" in report["passage_reports"][0]["error"]
    after = weights(agent.live.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert agent.log.versions() == []
    db = sqlite3.connect(agent.cfg.state_path("database"))
    assert db.execute("SELECT outcome FROM self_edits").fetchone()[0] == "diverged"
    assert db.execute("SELECT status FROM documents").fetchone()[0] == "failed"
    agent.close()


def test_uncommitted_adapter_is_moved_aside_not_served(tiny_config, docs):
    agent = SealAgent(load_config(tiny_config))
    agent.learn(docs[0])
    # Simulate a crash after the adapter was written but before the DB recorded it.
    import shutil
    shutil.copytree(agent.log.path(1), agent.log.path(2))
    agent.close()
    agent = SealAgent(load_config(tiny_config))
    assert agent.live.version == 1  # never served: the database says 1
    assert agent.log.versions() == [1, 2]  # a reader leaves the owner's folder alone
    agent.own()  # the owner repairs
    assert agent.log.versions() == [1]
    assert list((agent.log.root / "discarded").iterdir())
    report = agent.learn(docs[1]).as_dict()
    assert report["version"] == 2  # the number is reused for the real update
    agent.close()


def test_squad_document_reports_accuracy_before_and_after(agent, squad_file):
    report = agent.learn(squad_file).as_dict()
    assert report["kind"] == "squad" and report["passages"] == 2 and report["learned"] == 2
    items = json.loads(squad_file.read_text())
    n = sum(len(i["questions"]) for i in items)
    assert report["qa"]["n"] == n
    assert 0.0 <= report["qa"]["before"] <= 1.0 and 0.0 <= report["qa"]["after"] <= 1.0
    assert report["version"] == 2
    assert agent.log.manifest(2)["qa"]["n"] == len(items[1]["questions"])


def _squad(tmp_path, items, questions=True):
    path = tmp_path / "doc.json"
    keys = ("title", "context", "questions") if questions else ("title", "context")
    path.write_text(json.dumps([{k: it[k] for k in keys} for it in items]))
    return path


@pytest.mark.parametrize("write_batch, batches", [(2, [[0, 1], [2]]), (8, [[0, 1, 2]])])
def test_a_documents_self_edits_and_questions_are_written_in_batches(tiny_config, tmp_path, write_batch, batches):
    """Passages without questions: self-edits, then model-written QAs, each one
    batched call per `policy.write_batch` passages; every passage still gets its
    own self-edit, QAs and share of the writing time."""
    items = json.loads(SQUAD_DEV.read_text())[:3]
    agent = SealAgent(load_config(tiny_config, [f"policy.write_batch={write_batch}",
                                                "policy.active='implications'"]))
    events: dict[str, list] = {"self-edit": [], "questions": []}
    try:
        report = agent.learn(_squad(tmp_path, items, questions=False),
                             lambda stage, info: events[stage].append(info["indices"]) if stage in events else None)
        assert events == {"self-edit": batches, "questions": batches}
        assert report.as_dict()["learned"] == 3
        for p in report.passages:
            assert p.stage_seconds["self-edit"] > 0 and p.stage_seconds["questions"] > 0
            assert sum(p.stage_seconds.values()) <= p.seconds + 0.1
            assert p.qa_generated is not None and p.qa_generated["generated"] > 0
        rows = agent.state.query("SELECT passage_hash, outcome FROM self_edits ORDER BY id")
        assert [r["passage_hash"] for r in rows] == [p.hash for p in report.passages]
        assert {r["outcome"] for r in rows} == {"accepted"}
    finally:
        agent.close()


def test_a_passage_repeated_in_a_document_is_written_once(tiny_config, tmp_path):
    items = json.loads(SQUAD_DEV.read_text())[:2]
    agent = SealAgent(load_config(tiny_config, ["policy.active='implications'"]))
    written: list = []
    try:
        report = agent.learn(_squad(tmp_path, [items[0], items[1], items[0]]),
                             lambda stage, info: written.append(info["indices"]) if stage == "self-edit" else None)
        assert [p.status for p in report.passages] == ["learned", "learned", "duplicate"]
        assert written == [[0, 1]]
        assert len(agent.state.query("SELECT id FROM self_edits")) == 2
    finally:
        agent.close()


def test_the_gate_checks_exactly_the_weights_that_are_then_served(tiny_config, docs):
    """The forgetting check answers with the update merged into the weights, not
    beside them: the logits seen while checking are bit for bit those served."""
    agent = SealAgent(load_config(tiny_config, ["policy.active='implications'", "train.lr=1e-2"]))
    seen = []
    try:
        agent.learn(docs[0])

        def progress(stage, _info):
            if stage in ("replay", "qa-after"):
                seen.append(probe_logits(agent.live.model, agent.live.tokenizer))

        report = agent.learn(docs[1], progress)
        assert report.as_dict()["learned"] == 1 and len(seen) == 1
        assert torch.equal(seen[0], probe_logits(agent.live.model, agent.live.tokenizer))
    finally:
        agent.close()
