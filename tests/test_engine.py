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


@pytest.fixture(scope="session")
def engine(vllm_tiny_dir, tokenizer):
    e = VllmEngine(vllm_tiny_dir, tokenizer, EngineConfig(max_lora_rank=16, max_loras=4, max_cpu_loras=4,
                                                          kv_cache_gib=0.5, drain_s=5))
    yield e
    e.close()


@pytest.fixture(scope="session")
def adapters(vllm_tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: random_adapter(vllm_tiny_dir, root / name, r, seed)
            for name, r, seed in (("a", 16, 1), ("b", 8, 2), ("too-big", 32, 3))}


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
    alone = {name: engine.complete(PROMPTS[:2], sampling, adapter=adapters[name] if name else None)
             for name in ("", "a", "b")}
    assert len({tuple(c.text for c in v) for v in alone.values()}) == 3
    results: dict[str, list] = {}

    def ask(name: str) -> None:
        results[name] = engine.complete(PROMPTS[:2], sampling, adapter=adapters[name] if name else None)

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("", "a", "b") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_sampling_is_seeded_per_row(engine):
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    first = engine.complete(["Hello"] * 3, sampling, seed=3)
    assert engine.complete(["Hello"] * 3, sampling, seed=3) == first
    assert len({c.text for c in first}) == 3  # copies of one prompt are different draws
    assert engine.complete(["Hello"] * 3, sampling, seed=4) != first


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


def test_a_replaced_engine_finishes_its_requests_then_shuts_down(vllm_tiny_dir, tokenizer, engine):
    other = VllmEngine(vllm_tiny_dir, tokenizer, EngineConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=2,
                                                              kv_cache_gib=0.25, drain_s=30))
    stream = other.stream("Hello there", Sampling(max_new_tokens=64))
    pieces = iter(stream)
    first = next(pieces)  # a request in flight on `other`
    other.retire()  # its holder lets go (a newer version's engine took over)
    assert not other._closed
    rest = list(pieces)  # the request in flight finishes on it
    assert stream.completion.tokens == 64 and (first + "".join(rest)).strip() == stream.completion.text
    assert other._closed  # shut down as soon as it had nothing left
    with pytest.raises(EngineGone):
        other.complete(["Hello"], Sampling(max_new_tokens=2))


def test_an_engine_that_cannot_start_says_so_in_one_line_naming_the_fallback(tmp_path, tokenizer):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture", "architectures": ["Nope"]}')
    with pytest.raises(EngineUnavailable) as e:
        VllmEngine(bad, tokenizer, EngineConfig())
    message = str(e.value)
    assert "\n" not in message and 'model.engine = "torch"' in message and "not-a-model" in message


def test_vllm_config_is_checked_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="lora.r .* over engine.max_lora_rank"):
        load_config(overrides=['model.engine="vllm"', "lora.r=128"], state_dir=tmp_path)
    with pytest.raises(ConfigError, match="restem.lora_r"):
        load_config(overrides=['engine.generate="vllm"', "restem.lora_r=80"], state_dir=tmp_path)
    load_config(overrides=["lora.r=128"], state_dir=tmp_path)  # the torch engine has no such limit
    with pytest.raises(ConfigError, match="model.engine"):
        load_config(overrides=['model.engine="tensorrt"'], state_dir=tmp_path)


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

    engine = '\n[engine]\nserve = "vllm"\ngenerate = "vllm"\nkv_cache_gib = 0.5\nmax_loras = 4\nmax_cpu_loras = 8\n'
    config = write_config(tmp_path / "config.toml", vllm_tiny_dir, tmp_path / "state", DAEMON_SECTIONS + engine,
                          mode="modules")
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
