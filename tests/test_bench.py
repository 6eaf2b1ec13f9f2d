"""The benchmark harness runs end to end (on the tiny model; timings are not asserted)."""

import dataclasses

import pytest

from seal_agent.agent import policy_dir
from seal_agent.evaluation.bench import bench_examples, gemm_gflops, replay_search, run_bench, summary
from seal_agent.policy import load_active_policy


def assert_ratio(ratio: float, num_s: float, den_s: float, digits: int) -> None:
    """`ratio` is num_s / den_s, up to the rounding of both times (to 0.01 s) and of the ratio (to `digits`)."""
    slack = 0.5 * 10 ** -digits
    assert (num_s - 0.005) / (den_s + 0.005) - slack <= ratio <= (num_s + 0.005) / (den_s - 0.005) + slack, \
        (ratio, num_s, den_s)


def test_bench_reports_every_figure(tiny_cfg):
    policy = load_active_policy(policy_dir(tiny_cfg), tiny_cfg.policy.active)
    tiny_cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, compile=True))  # the default
    result = run_bench(tiny_cfg, policy, log=lambda m: None, seal_steps=1, replay_sizes=(2000,), query_requests=3,
                       peak_sizes=(256,))
    il = result["inner_loop"]
    assert il["examples"] == len(bench_examples(policy)) == 15
    for name in ("ours", "ours_first_update", "ours_uncompiled", "trainer_reference", "seal_reference"):
        assert il[name]["seconds"] > 0 and il[name]["tokens"] > 0
    assert il["compiled"] and il["ours"]["tokens"] == il["ours_uncompiled"]["tokens"]
    # each speedup is the ratio of the two times it compares, slower over ours
    seconds = {name: il[name]["seconds"] for name in ("ours", "ours_uncompiled", "trainer_reference", "seal_reference")}
    assert_ratio(result["compile_speedup"], seconds["ours_uncompiled"], seconds["ours"], 2)
    assert_ratio(result["inner_loop_speedup"], seconds["trainer_reference"], seconds["ours"], 2)
    assert_ratio(result["inner_loop_speedup_vs_seal"], seconds["seal_reference"], seconds["ours"], 1)
    # same data: per epoch both loops see the same number of real tokens
    assert il["ours"]["tokens"] * 10 == il["trainer_reference"]["tokens"] * tiny_cfg.train.epochs
    assert il["seal_reference"]["extrapolated"] and il["seal_reference"]["measured_steps"] == 1
    assert result["gemm_gflops"]["bf16"] == max(result["gemm_gflops"]["bf16_before_after"]) > 0
    # of the better bf16 peak, up to the rounding of the achieved rate (0.1 GFLOP/s) and of the fraction
    peak = result["gemm_gflops"]["bf16"]
    assert 0 < result["inner_loop_peak_fraction"]
    assert abs(result["inner_loop_peak_fraction"] - il["achieved_gflops"] / peak) <= 0.05 / peak + 0.0005
    assert result["gemm_gflops"]["fp32"] > 0
    assert {"batch_1", "batch_8"} <= set(result["generation"])
    assert result["qa"]["questions"] == 16 and result["qa"]["questions_per_s"] > 0
    assert set(result["replay_search"]) == {"2000"}
    ingest = result["ingest"]
    assert ingest["passages"] == 3 and ingest["seconds_per_passage"] > 0
    assert [("train" in st) for st in ingest["stage_seconds"]] == [True, True, True]
    assert len(ingest["passage_seconds"]) == len(ingest["statuses"]) == len(ingest["attempts"]) == 3
    m = result["modules"]
    assert m["routed_correctly"] and m["module_disk_mb"] > 0 and m["routing_1000"]["keys"] == 6000
    assert_ratio(m["routed_over_unrouted_p50"], m["p50_s"]["routed_same_module"], m["p50_s"]["unrouted"], 2)
    assert_ratio(m["alternating_over_unrouted_p50"], m["p50_s"]["routed_alternating"], m["p50_s"]["unrouted"], 2)
    q = result["query_latency"]
    assert q["idle"]["requests"] == q["while_training"]["requests"] == 3 and q["idle"]["p50_s"] > 0
    text = summary(result)  # what `seal-agent bench` prints
    for figure in ("compiling:", "speedup", "of the bf16 peak", "tok/s", "questions/s", "2,000 vectors",
                   "s per passage", "while training", "routing over 1,000 modules", "total"):
        assert figure in text, figure


def test_replay_search_and_gemm_measure_something():
    r = replay_search((500, 1000), dim=16, k=3, queries=5)
    assert set(r) == {"500", "1000"} and all(v["p50_ms"] >= 0 and v["queries"] == 5 for v in r.values())
    # queries that would take longer than query_seconds: fewer, but 20
    assert replay_search((500,), dim=16, k=3, queries=50, query_seconds=0.0)["500"]["queries"] == 20
    assert gemm_gflops(__import__("torch").float32, size=64, reps=2) > 0


def test_bench_engines_measures_both_engines_side_by_side(tmp_path, vllm_tiny_dir):
    from conftest import write_config

    from seal_agent.config import load_config
    from seal_agent.evaluation.engines import engines
    from seal_agent.evaluation.engines import summary as engines_summary

    cfg = load_config(write_config(tmp_path / "config.toml", vllm_tiny_dir, tmp_path / "state",
                                   engine="kv_cache_gib = 0.5\nmax_loras = 4\nmax_cpu_loras = 8\n"))
    r = engines(cfg, documents=3, rows=(1, 2), clients=(1, 3), requests=2, max_tokens=6, log=lambda m: None)
    assert set(r["engines"]) == {"torch", "vllm"}
    for name, figures in r["engines"].items():
        for key in ("decode", "decode_lora"):
            assert set(figures[key]) == {"rows_1", "rows_2"} and all(v["tokens"] > 0 for v in figures[key].values())
        assert set(figures["api"]) == {"clients_1", "clients_3"}
        for n, v in ((1, figures["api"]["clients_1"]), (3, figures["api"]["clients_3"])):
            assert v["requests"] == 2 * n and v["p50_s"] <= v["p95_s"]
            assert v["answered_with_its_module"] == 1.0, name  # 3 clients: 3 modules in use at once
        assert figures["ingest"]["statuses"] == ["learned", "learned"]
    t, v = (r["engines"][e]["api"]["clients_3"] for e in ("torch", "vllm"))
    assert r["api_throughput_ratio_3"] == round(v["requests_per_s"] / t["requests_per_s"], 2)
    assert r["api_p95_ratio_3"] == round(v["p95_s"] / t["p95_s"], 2)
    assert r["engines_agree"]["same_answer"] == r["engines_agree"]["same_grade"] == 1.0  # float32: token for token
    assert "vLLM/torch throughput" in engines_summary(r)
    with pytest.raises(ValueError, match="clients"):
        engines(cfg, documents=2, clients=(3,), log=lambda m: None)
