"""ReSTEM: one refresh end to end on the tiny random model (real peft, real
SQLite, real adapters on disk), the held-out split, promotion and rollback."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SHARED_DATA, write_config

from seal_agent.cli import main
from seal_agent.restem import loop as restem

TRAIN_POOL = SHARED_DATA / "squad" / "train_pool.json"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def pool_file(tmp_path) -> Path:
    """Twelve real SQuAD passages of the training pool (never the evaluation set)."""
    items = json.loads(TRAIN_POOL.read_text())[:12]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(items))
    return path


def restem_config(tmp_path, tiny_model_dir, extra: str, **kwargs) -> Path:
    return write_config(tmp_path / "config.toml", tiny_model_dir, tmp_path / "state", **kwargs, extra=f"""
[restem]
contexts = 2
samples = 2
max_questions = 2
heldout_fraction = 0.25
heldout_contexts = 1
epochs = 4
lr = 1e-2
{extra}
""")


def test_select_holds_out_a_fixed_slice_and_prefers_unused_then_recent():
    class C:
        def __init__(self, i, recency=0):
            self.id, self.title, self.recency = f"ctx{i}", f"t{i}", recency

    pool = [C(i, recency=i % 3) for i in range(200)]
    held = {c.id for c in pool if restem.is_heldout(c.id, 0.2)}
    assert 20 < len(held) < 60  # about a fifth
    train, heldout = restem.select(pool, {}, 10, 5, 0.2)
    assert len(train) == 10 and len(heldout) == 5
    assert not {c.id for c in train} & held and {c.id for c in heldout} <= held
    assert all(c.recency == 2 for c in train)  # never used: newest first
    uses = {c.id: 1 for c in train}
    train2, heldout2 = restem.select(pool, uses, 10, 5, 0.2)
    assert not {c.id for c in train2} & {c.id for c in train}  # used ones go to the back
    assert [c.id for c in heldout2] == [c.id for c in heldout]  # the same test set every round
    assert restem.select(pool, {}, 10, 5, 0.0)[1] == []


# -- the decisions at their edges (exact binary fractions: no rounding decides) --

@pytest.mark.parametrize("margin", [0.125, 0.0, -0.125])
def test_promotion_needs_the_new_policy_to_beat_the_old_by_more_than_the_margin(margin):
    old, step = 0.25, 2 ** -10
    bar = old + margin  # exact
    assert restem.promotion(old, bar + step, margin)[0] == "promoted"
    assert restem.promotion(old, bar, margin)[0] == "kept"  # equal is not better
    assert restem.promotion(old, bar - step, margin)[0] == "kept"


def test_promotion_weighs_the_margin_and_says_why():
    # Better than the old policy, but not by the margin: kept.
    decision, reason = restem.promotion(0.25, 0.375 - 2 ** -10, 0.125)
    assert decision == "kept" and reason == ("held-out gain +0.374 does not beat the current policy's "
                                             "+0.250 by more than 0.125")
    # Worse than the old policy, but within a negative margin: promoted.
    decision, reason = restem.promotion(0.25, 0.25 - 2 ** -4, -0.125)
    assert decision == "promoted" and reason == "held-out gain +0.188 beats +0.250 by more than -0.125"


def _rows(*rewards):
    return [{"context": "c", "sample": i, "reward": r} for i, r in enumerate(rewards)]


def test_best_of_k_takes_the_highest_reward_above_the_threshold():
    assert restem.best_of_k(_rows(0.1, 0.4, 0.25), 0.0)["sample"] == 1
    assert restem.best_of_k(_rows(0.4, 0.1, 0.25), 0.0)["sample"] == 0
    assert restem.best_of_k(_rows(0.1, 0.25, 0.4), 0.2)["sample"] == 2
    # Below the threshold a reward never wins, however it ranks.
    assert restem.best_of_k(_rows(-0.5, -0.2, -0.375), -0.25)["sample"] == 1
    assert restem.best_of_k(_rows(0.1, 0.25, 0.4), 0.5) is None
    assert restem.best_of_k(_rows(0.25, 0.25), 0.25) is None  # equal to it is not above it
    assert restem.best_of_k(_rows(0.25, 0.25 + 2 ** -10), 0.25)["sample"] == 1
    assert restem.best_of_k(_rows(None, 0.125, None), 0.0)["sample"] == 1  # an unmeasured sample never wins
    assert restem.best_of_k(_rows(None, None), -1.0) is None
    assert restem.best_of_k([], 0.0) is None


def test_best_of_k_breaks_ties_by_taking_the_first():
    assert restem.best_of_k(_rows(0.125, 0.5, 0.5), 0.0)["sample"] == 1
    assert restem.best_of_k(_rows(0.5, 0.125, 0.5), 0.0)["sample"] == 0


def test_refresh_end_to_end_promotes_a_version(tmp_path, tiny_model_dir, pool_file):
    # Every sample "wins" and any new policy is promoted, so the whole path runs on a
    # random model whose accuracy gains are noise; the decision rules have their own tests.
    cfg = restem_config(tmp_path, tiny_model_dir, "min_reward = -2.0\npromote_margin = -3.0\nreward = \"both\"")
    r = run("--config", cfg, "restem", "--data", pool_file, "--json")
    assert r.exit_code == 0, r.output
    [rec] = jsonl(r.stdout)
    assert rec["decision"] == "promoted" and rec["policy_version"] == 1 and rec["parent_policy_version"] == 0
    assert len(rec["contexts"]) == 2 and len(rec["samples"]) == 4 and len(rec["rewards"]) == 4
    for row in rec["rewards"]:
        assert row["before"] is not None and len(row["after"]) == 1 and row["seconds_train"] > 0
        assert row["reward"] == row["gain"] and 0 <= row["proxy"] <= 1
    assert len(rec["winners"]) == 2 and rec["sft"]["pairs"] == 2
    assert rec["sft"]["epoch_losses"][-1] < rec["sft"]["epoch_losses"][0]  # the policy learned its winners
    assert rec["proxy_agreement"]["contexts"] == 2
    held = rec["heldout"]
    assert set(held) >= {"old", "new", "contexts"} and len(held["old_gains"]) == 1
    trained = {c["id"] for c in rec["contexts"]} | {w["context"] for w in rec["winners"]}
    assert not trained & set(held["contexts"])
    assert {"sample", "reward", "sft", "heldout", "candidates"} <= rec["stage_seconds"].keys()
    st = rec["stage_seconds"]  # the jobs are a part of the reward and held-out stages
    assert 0 < st["candidates"] <= st["reward"] + st["heldout"] + 0.05
    assert rec["seconds"] > 0 and rec["seconds_per_candidate"] > 0

    adapter = tmp_path / "state" / "adapters" / "policy" / "implications" / "v0001"
    assert (adapter / "adapter_model.safetensors").exists()
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["parent"] == 0 and manifest["round"] == rec["round"] and manifest["winners"] == 2

    rows = jsonl(run("--config", cfg, "policy", "list", "--json").stdout)
    assert [(x["version"], x["active"]) for x in rows] == [(0, False), (1, True)]
    shown = jsonl(run("--config", cfg, "policy", "show", "1").stdout)[0]
    assert shown["heldout"]["new"] == held["new"]

    # A second round continues from version 1, on contexts not used yet, with the same test set.
    r = run("--config", cfg, "restem", "--data", pool_file, "--json")
    [rec2] = jsonl(r.stdout)
    assert rec2["parent_policy_version"] == 1 and rec2["policy_version"] == 2
    assert rec2["sft"]["continued_from_adapter"] is True
    assert not {c["id"] for c in rec2["contexts"]} & {c["id"] for c in rec["contexts"]}
    assert rec2["heldout"]["contexts"] == held["contexts"]
    assert not {c["id"] for c in rec2["contexts"]} & set(held["contexts"])

    r = run("--config", cfg, "policy", "rollback", "1", "--json")
    assert jsonl(r.stdout)[0] == {"policy": "implications", "from": 2, "version": 1}
    assert [x["version"] for x in jsonl(run("--config", cfg, "policy", "list", "--json").stdout)
            if x["active"]] == [1]
    r = run("--config", cfg, "policy", "rollback", "7")
    assert r.exit_code != 0 and "no policy version 7" in r.output

    # Learning writes its self-edits with the promoted policy, and says so.
    note = tmp_path / "note.txt"
    note.write_text("The Zorblax Prize was founded by Tomas Verhoeven in 1998 in Kalvik.")
    assert run("--config", cfg, "learn", note).exit_code == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "state" / "state" / "seal.db") as db:
        assert db.execute("SELECT policy FROM self_edits").fetchall() == [("implications@v1",)]
        events = [k for (k,) in db.execute("SELECT kind FROM events WHERE kind LIKE 'policy.%' OR kind = 'restem.round'")]
        decisions = db.execute("SELECT decision, policy_version FROM restem_rounds ORDER BY id").fetchall()
    assert events == ["policy.promote", "restem.round", "policy.promote", "restem.round", "policy.rollback"]
    assert decisions == [("promoted", 1), ("promoted", 2)]


def test_a_rejected_promotion_keeps_the_policy_version(tmp_path, tiny_model_dir, pool_file):
    cfg = restem_config(tmp_path, tiny_model_dir, "min_reward = -2.0\npromote_margin = 5.0")
    r = run("--config", cfg, "restem", "--data", pool_file, "--contexts", "1", "--samples", "1")
    assert r.exit_code == 0, r.output
    assert "decision: kept" in r.output and "policy version 0" in r.output
    [rec] = jsonl(run("--config", cfg, "restem", "--data", pool_file, "--contexts", "1", "--samples", "1",
                      "--json").stdout)
    assert rec["decision"] == "kept" and rec["policy_version"] == 0 and "does not beat" in rec["reason"]
    assert rec["sft"] is not None and rec["heldout"] is not None  # it was trained and tested, then refused
    assert not (tmp_path / "state" / "adapters" / "policy" / "implications" / "v0001").exists()
    kept = Path(rec["candidate_dir"])  # the refused candidate stays inspectable, outside the version line
    assert (kept / "adapter_model.safetensors").exists() and "does not beat" in (kept / "REJECTED.txt").read_text()
    assert [x["version"] for x in jsonl(run("--config", cfg, "policy", "list", "--json").stdout)] == [0]


def test_no_winner_means_no_training_and_bad_input_is_refused(tmp_path, tiny_model_dir, pool_file):
    # A random model's gains are never above 1: nothing wins, nothing is trained.
    cfg = restem_config(tmp_path, tiny_model_dir, "min_reward = 1.0")
    [rec] = jsonl(run("--config", cfg, "restem", "--data", pool_file, "--contexts", "1", "--samples", "1",
                      "--json").stdout)
    assert rec["winners"] == [] and rec["sft"] is None and rec["decision"] == "kept"
    assert "nothing to learn from" in rec["reason"]
    r = run("--config", cfg, "restem", "--data", tmp_path / "missing.json")
    assert r.exit_code != 0 and "does not exist" in r.output
    r = run("--config", cfg, "restem", "--samples", "0")
    assert r.exit_code != 0 and "samples must be at least 1" in r.output
    r = run("--config", cfg, "--set", "restem.reward=judge", "restem")
    assert r.exit_code != 0 and "restem.reward" in r.output


def test_proxy_reward_needs_no_training_and_yield_stops_early(tmp_path, tiny_model_dir, pool_file):
    from seal_agent.agent import SealAgent
    from seal_agent.config import load_config

    cfg = load_config(restem_config(tmp_path, tiny_model_dir, 'reward = "proxy"\nmin_reward = -1.0'))
    agent = SealAgent(cfg)
    try:
        rec = agent.restem(data=[pool_file], samples=1, contexts=1)
        [row] = rec["rewards"]
        assert row["gain"] is None and row["seconds_train"] is None and row["reward"] == row["proxy"]
        stopped = agent.restem(data=[pool_file], should_stop=lambda: True)
        assert stopped["stopped_early"].startswith("stopped after 0 of 2") and stopped["contexts"] == []
        assert stopped["decision"] == "kept"
    finally:
        agent.close()


def test_knowledge_proxy_scores_answer_coverage_and_grounding(tiny_cfg, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    from seal_agent.agent import policy_dir
    from seal_agent.policy import load_active_policy
    from seal_agent.qa.answering import Question
    from seal_agent.restem.knowledge import KnowledgeContext, KnowledgeDomain

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    domain = KnowledgeDomain(tiny_cfg, tok, load_active_policy(policy_dir(tiny_cfg), "implications"))
    ctx = KnowledgeContext("h", "Zorblax", "Tomas Verhoeven founded the Zorblax Prize in 1998 in Kalvik.",
                           (Question("Who founded it?", "Tomas Verhoeven", "Zorblax"),
                            Question("When?", "1998", "Zorblax")), "test")
    assert domain.proxy(ctx, "1. Tomas Verhoeven founded the prize.\n2. It began in 1998.") == 1.0
    assert domain.proxy(ctx, "1. Tomas Verhoeven founded the prize.\n2. It moved to Paris.") == 0.5 * 0.5
    assert domain.proxy(ctx, "") == 0.0


def test_retention_aware_reward_subtracts_the_forgetting_penalty(tmp_path, tiny_model_dir, pool_file, squad_file):
    from seal_agent.agent import SealAgent
    from seal_agent.config import load_config

    # f1 >= 0 grades every answer right, so the replay QAs are "known" before the update.
    cfg = load_config(restem_config(tmp_path, tiny_model_dir, "retention_penalty = 0.5\nreplay_k = 3"),
                      overrides=["qa.grader=f1", "qa.f1_threshold=0.0"])
    agent = SealAgent(cfg)
    try:
        assert agent.learn(squad_file).as_dict()["learned"] == 2  # the replay bank now has QAs
        rec = agent.restem(data=[pool_file], samples=2, contexts=2)
        # the bank's learned passages come first (newest), the file's after
        assert any(c["id"] in {p for p in agent.state.learned_passages(agent.live.version)} for c in rec["contexts"])
        for row in rec["rewards"]:
            assert row["forgetting"] is not None and 0.0 <= row["forgetting"] <= 1.0
            assert row["reward"] == pytest.approx(row["gain"] - 0.5 * row["forgetting"], abs=1e-3)
    finally:
        agent.close()


# -- the loop is domain-generic: a second domain, written here -----------------

class LikelihoodDomain:
    """Contexts are texts; a self-edit is text the policy writes about the title;
    applying it trains on it plus the text; the score is the model's mean
    log-likelihood per token of the text. Small enough to check the loop's bookkeeping exactly."""

    name = "likelihood"

    def __init__(self, tokenizer, cfg):
        self.tok, self.cfg = tokenizer, cfg

    def prompt(self, ctx):
        return f"Write about {ctx.title}:\n"

    def sample(self, model, ctx, k, seed):
        from seal_agent.model.generation import Sampling, generate

        return generate(model, self.tok, [self.prompt(ctx)] * k, Sampling(max_new_tokens=8, temperature=1.0),
                        seed=seed, batch_size=k)

    def parse(self, ctx, completion):
        from seal_agent.model.inner_loop import Example

        return [Example("", f"{completion}\n{ctx.text}")]

    def apply(self, model, update, seed):
        import contextlib

        from seal_agent.model.inner_loop import train_adapter

        @contextlib.contextmanager
        def applied():
            candidate, _ = train_adapter(model, self.tok, update, self.cfg.lora, self.cfg.train, seed=seed)
            try:
                yield candidate
            finally:
                candidate.unload()

        return applied()

    def score(self, model, ctx):
        import torch

        ids = self.tok(ctx.text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return -float(model(input_ids=ids, labels=ids).loss)

    def forgetting(self, model, candidate, ctx):
        return None

    def proxy(self, ctx, completion):
        return 0.0

    def describe(self, ctx, completion):
        return {"chars": len(completion)}


def test_the_loop_runs_any_domain_and_measures_gains_against_the_untouched_model(tmp_path, tiny_model_dir, tiny_cfg):
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seal_agent.memory.live import weights_fingerprint

    @dataclasses.dataclass(frozen=True)
    class Text:
        id: str
        title: str
        text: str
        recency: int = 0

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    domain = LikelihoodDomain(tok, tiny_cfg)
    texts = [Text(f"t{i}", f"topic {i}", f"Fact {i}: the zorblax number of topic {i} is {i * 7}.") for i in range(3)]
    tiny_cfg.restem.min_reward, tiny_cfg.restem.promote_margin, tiny_cfg.restem.samples = -1.0, -1.0, 2
    settings = restem.Settings(restem=tiny_cfg.restem, lora=tiny_cfg.lora, train=tiny_cfg.train)
    clean = {t.id: domain.score(model, t) for t in texts}
    fingerprint = weights_fingerprint(model)

    rnd = restem.refresh(domain, model, tok, texts[:2], texts[2:], settings, None, tmp_path)

    assert weights_fingerprint(model) == fingerprint  # every update was taken off again
    for row in rnd.rewards:
        assert row["before"] == pytest.approx(clean[row["context"]], abs=1e-4)
        assert row["gain"] > 0  # training on the text raises its likelihood
    assert rnd.heldout["before"] == [pytest.approx(clean["t2"], abs=1e-4)]
    assert rnd.heldout["old_gains"][0] > 0 and rnd.heldout["new_gains"][0] > 0
    assert rnd.decision == "promoted" and (rnd.candidate / "adapter_model.safetensors").exists()
    # The round decides with its pure rules, on its own measurements (the candidate's gains as `new`).
    held = rnd.heldout
    assert (rnd.decision, rnd.reason) == restem.promotion(sum(held["old_gains"]) / len(held["old_gains"]),
                                                          sum(held["new_gains"]) / len(held["new_gains"]),
                                                          tiny_cfg.restem.promote_margin)
    for w in rnd.winners:
        best = restem.best_of_k([r for r in rnd.rewards if r["context"] == w["context"]], -1.0)
        assert (w["sample"], w["reward"]) == (best["sample"], best["reward"])
    with pytest.raises(ValueError, match="held-out"):
        restem.refresh(domain, model, tok, texts[:2], texts[1:2], settings, None, tmp_path)
