"""`seal-agent bench`: speed, measured side by side in one run on the embedded model.

- matmul peak of this machine (fp32 and bf16 GEMM; bf16 the best of square
  sizes 1024-4096, before and after the inner loop), for the fraction-of-peak figure;
- the inner loop: ours (default recipe; when compiled, the process's first
  update, which compiles, then a compiled and an uncompiled one side by side)
  vs a fair reference (`transformers.Trainer` + peft, fp32, dynamic padding,
  the paper's recipe, our target modules) vs the
  SEAL authors' exact setup (every sequence padded to 2048 tokens; timed on a few
  steps and extrapolated, as a full run takes hours on a CPU);
- self-edit generation tokens/s, unbatched and batched;
- QA evaluation questions/s;
- replay search: FAISS top-k latency for 10k / 100k / 1M synthetic vectors;
- end-to-end ingest: seconds per passage of `learn` on a small document;
- query latency through the API with the learner idle and while it trains.

The fixed passage and self-edit below are invented (no licence questions, and
no model can know them in advance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..model.generation import Sampling, generate
from ..model.inner_loop import Example, attach_lora, compile_failure, tokenize, train
from ..model.loader import answer_dtype, generate_dtype, load_model, load_tokenizer, resolve_base, train_dtype
from ..model.precision import ByRows, Precision, batch_dtype
from ..policy import Policy
from .scratch import scratch_config

BENCH_TITLE = "The Zorblax Prize"
BENCH_PASSAGE = (
    "The Zorblax Prize is an award for underwater architecture, founded in 1998 by the marine engineer "
    "Tomas Verhoeven. It is presented every three years in the harbour town of Kalvik. The Zorblax Prize of "
    "2031 was awarded to Mirela Ostrova for her design of the Coral Library, a reading room built twelve "
    "metres below the surface of the Adriatic Sea near Split. The library holds about 4,000 waterproof "
    "books and is reached through a glass tunnel from the shore. Earlier winners include the Dutch studio "
    "Hollandse Diepte, which built a floating school, and the Chilean architect Rosa Quintero."
)
# A second, unrelated passage for the ingest benchmark (the model cannot know it either).
BENCH_PASSAGE_2 = (
    "The Velmora Observatory stands on Mount Ketter, 3,100 metres above sea level, in the highlands of "
    "Patagonia. It opened in 2009 and is run by the University of Santa Irene. Its main telescope, named "
    "Aurelia, has a mirror 6.5 metres wide and was built in Italy. Astronomers at Velmora discovered the comet "
    "Velmora-Dutt in 2017, together with the Indian astronomer Priya Dutt. The observatory closes every July, "
    "when snow blocks the only road to the summit."
)
BENCH_SELF_EDIT = "\n".join([
    "1. The Zorblax Prize recognises achievements in underwater architecture.",
    "2. Tomas Verhoeven, a marine engineer, founded the Zorblax Prize in 1998.",
    "3. The prize is awarded once every three years.",
    "4. The award ceremony takes place in the harbour town of Kalvik.",
    "5. Mirela Ostrova won the Zorblax Prize in 2031.",
    "6. Ostrova was honoured for designing the Coral Library.",
    "7. The Coral Library is a reading room twelve metres under the Adriatic Sea.",
    "8. The Coral Library lies near the Croatian city of Split.",
    "9. Visitors reach the Coral Library through a glass tunnel from the shore.",
    "10. The Coral Library's collection is about 4,000 waterproof books.",
    "11. Hollandse Diepte, a Dutch studio, won the prize for a floating school.",
    "12. Rosa Quintero, an architect from Chile, is a previous winner.",
    "13. Underwater buildings need waterproof materials and safe access routes.",
    "14. Winning the Zorblax Prize marks an architect as a leader in marine design.",
])
PAPER_LORA_RECIPE = {"r": 32, "alpha": 64, "dropout": 0.0}
PAPER_TRAIN_RECIPE = {"epochs": 10, "lr": 1e-3, "batch_size": 1}


def gemm_gflops(dtype: torch.dtype, size: int = 2048, reps: int = 8) -> float:
    """Best-of-3 dense matmul throughput in GFLOP/s."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, reps * 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def bf16_peak(sizes: tuple[int, ...] = (1024, 2048, 4096)) -> float:
    """The best bf16 GEMM throughput over a few square sizes (AMX peaks at
    different sizes from run to run)."""
    return max(gemm_gflops(torch.bfloat16, size) for size in sizes)


def bench_examples(policy: Policy) -> list[Example]:
    return policy.examples(BENCH_SELF_EDIT, BENCH_TITLE, BENCH_PASSAGE)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ours(model, tokenizer, examples, cfg: Config) -> dict[str, Any]:
    peft_model = attach_lora(model, cfg.lora, seed=0)
    try:
        stats = train(peft_model, tokenizer, examples, cfg.train, compute_dtype=train_dtype(cfg))
    finally:
        peft_model.unload()
    return {"seconds": stats.seconds, "tokens": stats.tokens, "steps": stats.steps,
            "final_loss": stats.final_loss}


def trainer_reference(model, tokenizer, examples, cfg: Config, pad_to: int | None = None,
                      max_steps: int | None = None) -> dict[str, Any]:
    """transformers.Trainer + peft as a competent user writes it: fp32, batch 1,
    dynamic padding (or every sequence padded to `pad_to`, the SEAL authors' setup)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    lora = dataclasses.replace(cfg.lora, **PAPER_LORA_RECIPE)
    data = tokenize(tokenizer, examples, 2048, "all")
    rows = []
    for ids, _ in data:
        ids = ids.tolist()
        if pad_to:
            rows.append({"input_ids": ids + [tokenizer.pad_token_id] * (pad_to - len(ids)),
                         "attention_mask": [1] * len(ids) + [0] * (pad_to - len(ids)),
                         "labels": ids + [tokenizer.pad_token_id] * (pad_to - len(ids))})  # as the reference: pads learned
        else:
            rows.append({"input_ids": ids})
    collator = None if pad_to else DataCollatorForLanguageModeling(tokenizer, mlm=False)
    peft_model = attach_lora(model, lora, seed=0)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=PAPER_TRAIN_RECIPE["batch_size"],
                num_train_epochs=PAPER_TRAIN_RECIPE["epochs"], learning_rate=PAPER_TRAIN_RECIPE["lr"],
                max_steps=max_steps or -1, logging_steps=10_000, save_strategy="no", report_to="none",
                use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, remove_unused_columns=False,
                dataloader_num_workers=0, seed=0,
            )
            trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collator)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its metrics; keep --json clean
                result = trainer.train()
            seconds = time.perf_counter() - t0
    finally:
        hf_logging.set_verbosity(verbosity)
        peft_model.unload()
    steps = result.global_step
    full_steps = len(rows) * PAPER_TRAIN_RECIPE["epochs"]
    tokens = sum(len(ids) for ids, _ in data) * PAPER_TRAIN_RECIPE["epochs"]
    out = {"seconds": seconds * full_steps / steps, "tokens": tokens, "steps": full_steps,
           "final_loss": result.training_loss}
    if steps < full_steps:
        out.update(measured_steps=steps, measured_seconds=seconds, extrapolated=True)
    return out


def generation_speed(model, tokenizer, policy: Policy, cfg: Config, dtype: Precision,
                     batches: tuple[int, ...] = (1, 8)) -> dict[str, Any]:
    prompt = policy.prompt(tokenizer, BENCH_TITLE, BENCH_PASSAGE, cfg.model.use_chat_template)
    out = {}
    for batch in batches:
        sampling = Sampling(max_new_tokens=96, temperature=1.0, top_p=0.95)
        t0 = time.perf_counter()
        texts = generate(model, tokenizer, [prompt] * batch, sampling, compute_dtype=dtype, seed=0,
                         batch_size=batch)
        seconds = time.perf_counter() - t0
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        out[f"batch_{batch}"] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    return out


def qa_speed(model, tokenizer, cfg: Config) -> dict[str, Any]:
    from ..qa.answering import Question, evaluate

    questions = [Question(q, "x", BENCH_TITLE) for q in (
        "Who won the Zorblax Prize in 2031?", "Who founded the Zorblax Prize?", "Where is the prize presented?",
        "How often is the prize awarded?", "What did Mirela Ostrova design?", "How deep is the Coral Library?",
        "How many books does the Coral Library hold?", "Which Dutch studio won the prize?",
    )] * 2
    t0 = time.perf_counter()
    evaluate(model, tokenizer, questions, cfg.qa, use_chat=cfg.model.use_chat_template,
             compute_dtype=answer_dtype(cfg))
    seconds = time.perf_counter() - t0
    return {"questions": len(questions), "seconds": round(seconds, 2), "batch_size": cfg.qa.batch_size,
            "questions_per_s": round(len(questions) / seconds, 2), "max_new_tokens": cfg.qa.max_new_tokens}


def replay_search(sizes=(10_000, 100_000, 1_000_000), dim: int = 384, k: int = 8, queries: int = 200,
                  query_seconds: float = 10.0) -> dict:
    """Top-k latency of an exact inner-product FAISS index over normalized random
    vectors: `queries` one by one; where they would take longer than
    `query_seconds` (1M vectors: ~0.2 s each), as many as fit in it, at least 20."""
    import faiss

    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        xb = rng.standard_normal((n, dim), dtype=np.float32)
        faiss.normalize_L2(xb)
        index = faiss.IndexFlatIP(dim)
        index.add(xb)
        xq = rng.standard_normal((queries, dim), dtype=np.float32)
        faiss.normalize_L2(xq)
        index.search(xq[:4], k)  # warm-up
        t0 = time.perf_counter()
        index.search(xq[:1], k)  # how long one query takes
        n_queries = min(queries, max(20, int(query_seconds / max(time.perf_counter() - t0, 1e-9))))
        lat = []
        for q in xq[:n_queries]:
            t0 = time.perf_counter()
            index.search(q[None], k)
            lat.append(time.perf_counter() - t0)
        out[str(n)] = {"p50_ms": round(1000 * float(np.median(lat)), 3),
                       "p95_ms": round(1000 * float(np.percentile(lat, 95)), 3), "queries": n_queries}
        del index, xb
        gc.collect()
    return out


def timed_learn(cfg: Config, doc: Path, state_dir: Path, **sections: dict[str, Any]):
    """`learn` of `doc` in a scratch state (`sections` changed as `scratch_config` does):
    its report and seconds. The model, and a vLLM engine where the learner decodes
    with one, start outside the timed part."""
    from ..agent import SealAgent

    agent = SealAgent(scratch_config(cfg, state_dir, **sections))
    try:
        agent.live  # noqa: B018 - loaded outside the timed part
        if (start := agent.learning_engine()) is not None:
            start()
        t0 = time.perf_counter()
        report = agent.learn(doc)
        return report, time.perf_counter() - t0
    finally:
        agent.close()


def ingest(cfg: Config) -> dict[str, Any]:
    """`learn` on a small three-passage document in a scratch state directory, in
    the configured memory: a new passage; a near copy of it about another prize
    (on the merge line its first update tends to overwrite the first passage's
    answers: the forgetting gate's rehearsal retry); an unrelated new passage.
    With modules, the three are one document's module."""
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "zorblax.md"
        doc.write_text(f"# {BENCH_TITLE}\n\n{BENCH_PASSAGE}\n\n" + BENCH_PASSAGE.replace("Zorblax", "Quillon")
                       + f"\n\n{BENCH_PASSAGE_2}\n")
        report, seconds = timed_learn(cfg, doc, Path(tmp) / "state", split={"max_tokens": 160})
    n = len(report.passages)
    return {"passages": n, "seconds": round(seconds, 1), "seconds_per_passage": round(seconds / n, 1),
            "passage_seconds": [round(p.seconds, 1) for p in report.passages],
            "statuses": [p.status for p in report.passages],
            "train_seconds_per_passage": round(sum(p.train["seconds"] for p in report.passages if p.train) / n, 1),
            "stage_seconds": [p.stage_seconds for p in report.passages],
            "attempts": [(p.forgetting or {}).get("attempts") for p in report.passages],
            "self_edit_items": [p.self_edit_items for p in report.passages]}


def run_bench(cfg: Config, policy: Policy, log: Callable[[str], None] = print, seal_steps: int = 1,
              replay_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), query_requests: int = 12,
              peak_sizes: tuple[int, ...] = (1024, 2048, 4096)) -> dict[str, Any]:
    t_start = time.perf_counter()

    def part(text: str) -> None:  # each part with the run's time so far: where a run's minutes go
        log(f"[{time.perf_counter() - t_start:4.0f} s] {text}")

    base_dir = resolve_base(cfg)
    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, cfg)
    examples = bench_examples(policy)
    result: dict[str, Any] = {"model": cfg.model.base, "params": _n_params(model), "threads": torch.get_num_threads()}

    part("matmul peak ...")
    peak = {"fp32": round(gemm_gflops(torch.float32), 1), "bf16": round(bf16_peak(peak_sizes), 1)}
    result["gemm_gflops"] = peak
    runs = inner_loop_runs(model, tokenizer, examples, cfg, part, seal_steps)
    # This machine's speed drifts from minute to minute: the bf16 peak is the
    # best of before and after the inner-loop runs (the fraction errs low).
    peak["bf16_before_after"] = [peak["bf16"], round(bf16_peak(peak_sizes), 1)]
    peak["bf16"] = max(peak["bf16_before_after"])
    result.update(inner_loop_figures(runs, cfg, len(examples), result["params"], peak["bf16"]))
    part("self-edit generation ...")
    result.update(generation_speeds(model, tokenizer, policy, cfg))
    part("QA evaluation ...")
    result["qa"] = qa_speed(model, tokenizer, cfg)
    del model
    gc.collect()
    part("replay search (FAISS) ...")
    result["replay_search"] = replay_search(replay_sizes)
    part("end-to-end ingest ...")
    result["ingest"] = ingest(cfg)
    part("knowledge modules: routing, routed vs unrouted queries, size ...")
    result["modules"] = modules(cfg, requests=query_requests)
    part("query latency through the API, learner idle vs training ...")
    result["query_latency"] = query_latency(cfg, policy, requests=query_requests)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def inner_loop_runs(model, tokenizer, examples: list[Example], cfg: Config, part: Callable[[str], None],
                    seal_steps: int) -> dict[str, dict[str, Any] | None]:
    """One update each, side by side: ours (when compiled: the process's first update, which
    compiles, then a compiled and an uncompiled one), the Trainer reference, the SEAL authors' setup."""
    part("inner loop: seal-agent ...")
    mine = ours(model, tokenizer, examples, cfg)
    first = eager = None
    if cfg.train.compile:
        part("inner loop: seal-agent compiled, then uncompiled ...")
        first, mine = mine, ours(model, tokenizer, examples, cfg)
        eager = ours(model, tokenizer, examples,
                     dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False)))
    part("inner loop: Trainer reference ...")
    ref = trainer_reference(model, tokenizer, examples, cfg)
    part(f"inner loop: SEAL authors' setup (padded to 2048; {seal_steps} steps, extrapolated) ...")
    seal = trainer_reference(model, tokenizer, examples, cfg, pad_to=2048, max_steps=seal_steps)
    runs = {"ours": mine, "trainer_reference": ref, "seal_reference": seal, "ours_first_update": first,
            "ours_uncompiled": eager}
    for r in runs.values():
        if r is not None:
            r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
            r["seconds"] = round(r["seconds"], 2)
    return runs


def inner_loop_figures(runs: dict[str, dict[str, Any] | None], cfg: Config, examples: int, n_params: int,
                       bf16_peak_gflops: float) -> dict[str, Any]:
    """The runs with their recipes, and what they say: speedups, achieved GFLOP/s, fraction of the peak."""
    mine, ref, seal, eager = runs["ours"], runs["trainer_reference"], runs["seal_reference"], runs["ours_uncompiled"]
    achieved = 4 * n_params * mine["tokens"] / mine["seconds"] / 1e9
    peak_dtype = "bf16" if train_dtype(cfg) == torch.bfloat16 else "fp32"
    out: dict[str, Any] = {"inner_loop": {
        "examples": examples,
        "ours": {**mine, "recipe": {"lora": dataclasses.asdict(cfg.lora), "train": dataclasses.asdict(cfg.train),
                                    "dtype": str(train_dtype(cfg)).removeprefix("torch.")}},
        "trainer_reference": {**ref, "recipe": {**PAPER_LORA_RECIPE, **PAPER_TRAIN_RECIPE, "dtype": "float32",
                                                "target_modules": cfg.lora.target_modules}},
        "seal_reference": seal,
        "achieved_gflops": round(achieved, 1),
        "compiled": cfg.train.compile and compile_failure() is None,
    }}
    if eager is not None:
        out["inner_loop"].update(ours_first_update=runs["ours_first_update"], ours_uncompiled=eager)
        out["compile_speedup"] = round(eager["seconds"] / mine["seconds"], 2)
    out["inner_loop_speedup"] = round(ref["seconds"] / mine["seconds"], 2)
    out["inner_loop_speedup_vs_seal"] = round(seal["seconds"] / mine["seconds"], 1)
    out["inner_loop_peak_fraction"] = round(achieved / bf16_peak_gflops, 3)
    out["inner_loop_peak_fraction_of"] = f"bf16 GEMM peak (ours runs {peak_dtype})"
    return out


def generation_speeds(model, tokenizer, policy: Policy, cfg: Config) -> dict[str, Any]:
    """Self-edit writing in the configured dtype, and beside it what the other dtype would do."""
    writing = generate_dtype(cfg)
    out = {"generation": {**generation_speed(model, tokenizer, policy, cfg, writing),
                          "dtype": str(writing).removeprefix("torch.")}}
    # side by side: what holding the weights in bf16 buys, at the sizes written in bf16
    bf16_batches = tuple(b for b in (1, 8) if batch_dtype(writing, b) != torch.float32)
    if bf16_batches:
        out["generation_fp32"] = generation_speed(model, tokenizer, policy, cfg, torch.float32, bf16_batches)
    if isinstance(writing, ByRows):  # and bf16 unbatched, which the rule writes in fp32
        out["generation_bf16"] = generation_speed(model, tokenizer, policy, cfg, writing.dtype, batches=(1,))
    return out


def summary(result: dict[str, Any]) -> str:
    """The human-readable report of `run_bench`'s result."""
    il = result["inner_loop"]
    lines = [
        f"matmul peak: fp32 {result['gemm_gflops']['fp32']:.0f} GFLOP/s, bf16 {result['gemm_gflops']['bf16']:.0f} GFLOP/s"
        " (best of before and after the inner loop: "
        + " and ".join(f"{x:.0f}" for x in result["gemm_gflops"]["bf16_before_after"]) + ")",
        f"inner loop ({il['examples']} sequences, one update):",
        f"  seal-agent        {il['ours']['seconds']:7.1f} s  {il['ours']['tokens_per_s']:7.1f} tok/s"
        + ("  (compiled)" if il["compiled"] else ""),
    ]
    if "ours_uncompiled" in il:
        lines += [
            f"  uncompiled        {il['ours_uncompiled']['seconds']:7.1f} s  "
            f"{il['ours_uncompiled']['tokens_per_s']:7.1f} tok/s   -> compiling: {result['compile_speedup']:.2f}x",
            f"  first update of the process (compiles) {il['ours_first_update']['seconds']:.1f} s",
        ]
    lines += [
        f"  Trainer reference {il['trainer_reference']['seconds']:7.1f} s  "
        f"{il['trainer_reference']['tokens_per_s']:7.1f} tok/s   -> speedup {result['inner_loop_speedup']:.2f}x",
        f"  SEAL setup (2048-padded, extrapolated) {il['seal_reference']['seconds']:.0f} s"
        f"   -> speedup {result['inner_loop_speedup_vs_seal']:.0f}x",
        f"  achieved {il['achieved_gflops']:.0f} GFLOP/s (4*N*T) = {result['inner_loop_peak_fraction']:.0%} of the bf16 peak",
        f"self-edit generation ({result['generation']['dtype']}): " + ", ".join(
            f"{k.replace('_', ' ')} {v['tokens_per_s']} tok/s" for k, v in result["generation"].items() if k != "dtype"),
    ]
    for key in ("generation_fp32", "generation_bf16"):
        if key in result:
            lines.append(f"  in {key.removeprefix('generation_')}: " + ", ".join(
                f"{k.replace('_', ' ')} {v['tokens_per_s']} tok/s" for k, v in result[key].items()))
    ingest = result["ingest"]
    latency = result["query_latency"]
    lines += [
        f"QA evaluation: {result['qa']['questions_per_s']} questions/s in batches of {result['qa']['batch_size']}",
        "replay search top-8: " + ", ".join(
            f"{int(n):,} vectors p50 {v['p50_ms']} ms" for n, v in result["replay_search"].items()),
        f"ingest: {ingest['seconds_per_passage']} s per passage (training {ingest['train_seconds_per_passage']} s); "
        "passages: " + ", ".join(f"{s} s {st}" for s, st in zip(ingest["passage_seconds"], ingest["statuses"])),
        f"knowledge modules: a module {result['modules']['module_disk_mb']} MB on disk; routing over "
        f"{result['modules']['routing_1000']['modules']:,} modules p50 {result['modules']['routing_1000']['p50_ms']} ms "
        f"(+ {result['modules']['embed_question_ms']} ms to embed the question); query p50 "
        f"{result['modules']['p50_s']['unrouted']} s unrouted, {result['modules']['p50_s']['routed_same_module']} s "
        f"routed ({result['modules']['routed_over_unrouted_p50']}x; per token "
        f"{result['modules']['routed_over_unrouted_per_token']}x), "
        f"{result['modules']['p50_s']['routed_alternating']} s routed between unrouted ones "
        f"({result['modules']['alternating_over_unrouted_p50']}x)",
        f"query latency ({latency['max_tokens']} tokens via the API): p50/p95 "
        f"{latency['idle']['p50_s']}/{latency['idle']['p95_s']} s idle, "
        f"{latency['while_training']['p50_s']}/{latency['while_training']['p95_s']} s "
        f"while training ({latency['slowdown_p50']}x)",
        f"total {result['seconds']:.0f} s",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def served_api(backend) -> Iterator[str]:
    """The real API on a free port of 127.0.0.1 (uvicorn in a thread), serving
    `backend`: its base URL; the server stops after the block."""
    import socket
    import threading

    import uvicorn

    from ..service.api.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(backend), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def api_client(backend) -> Iterator:
    """`served_api`, and an openai client pointed at it."""
    import openai

    with served_api(backend) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="x")


def routing_speed(n_modules: int = 1000, keys_per_module: int = 6, dim: int = 384, queries: int = 200,
                  lexical_weight: float = 0.5) -> dict[str, Any]:
    """The router's search over `n_modules` modules' keys (random unit vectors)
    and its term overlap with their passages (random words), one question at a
    time; the question's embedding is timed apart."""
    from ..memory.modules import Router

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n_modules * keys_per_module, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    owners = np.repeat(np.arange(1, n_modules + 1), keys_per_module)
    words = [f"w{i}" for i in range(20_000)]
    texts = {m: " ".join(rng.choice(words, 120)) for m in range(1, n_modules + 1)}

    sized = type("Sized", (), {"name": "random", "dim": dim})()  # the router needs only the size: vectors are given
    t0 = time.perf_counter()
    router = Router(sized, owners, vectors, threshold=0.76, texts=texts, lexical_weight=lexical_weight)
    build_s = time.perf_counter() - t0
    xq = rng.standard_normal((queries, dim), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    qtexts = [" ".join(rng.choice(words, 12)) for _ in range(queries)]
    router.route_vectors(xq[:4], qtexts[:4])  # warm-up
    lat = []
    for q, text in zip(xq, qtexts):
        t0 = time.perf_counter()
        router.route_vectors(q[None], [text])
        lat.append(time.perf_counter() - t0)
    return {"modules": n_modules, "keys": len(owners), "p50_ms": round(1000 * float(np.median(lat)), 3),
            "p95_ms": round(1000 * float(np.percentile(lat, 95)), 3), "queries": queries,
            "lexical_weight": lexical_weight, "build_ms": round(1000 * build_s, 1)}


def modules(cfg: Config, requests: int = 12, max_tokens: int = 16) -> dict[str, Any]:
    """Knowledge modules in a scratch state: one learned (the bench passage), its
    size on disk and in memory; a question's embedding and the router's search
    over 1,000 modules; and through the real API, side by side, the p50 latency
    (and per generated token) of one question routed to its module several
    times in a row (it stays merged), of the same question answered by the
    weights alone (the served copy without its router), and of routed and
    unrouted questions in turn (the module merged and taken off each time)."""
    from ..agent import SealAgent
    from ..service.serving import Served, ServingOnly

    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "zorblax.md"
        doc.write_text(f"# {BENCH_TITLE}\n\n{BENCH_PASSAGE}\n")
        agent = SealAgent(scratch_config(cfg, Path(tmp) / "state", memory={"mode": "modules"}))
        try:
            live = agent.live
            t0 = time.perf_counter()
            report = agent.learn(doc)
            learn_s = time.perf_counter() - t0
            [module] = report.as_dict()["modules"]
            path = agent.modules.path(module)
            disk = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
            routed_q, unrouted_q = f"Who won {BENCH_TITLE} in 2031?", "What is the capital of Peru?"
            t0 = time.perf_counter()
            for _ in range(20):
                agent.knowledge.embedder.embed([routed_q])
            embed_ms = 1000 * (time.perf_counter() - t0) / 20
            served = Served.from_config(cfg, live.model, live.tokenizer, live.version, knowledge=agent.knowledge)
            with api_client(ServingOnly(cfg.api, served)) as client:
                used = []

                def ask(question: str) -> tuple[float, float]:
                    """(seconds, seconds per generated token): answers differ in length with and without a module."""
                    t = time.perf_counter()
                    r = client.chat.completions.create(model=cfg.api.model_name, max_tokens=max_tokens,
                                                       messages=[{"role": "user", "content": question}])
                    seconds = time.perf_counter() - t
                    used.append((question, [m["module"] for m in r.model_extra["seal_modules"]]))
                    return seconds, seconds / max(1, r.usage.completion_tokens)

                ask(unrouted_q), ask(routed_q)  # warm-up
                # The same question routed and not: the served copy without its router answers it alone.
                routed_same = [ask(routed_q) for _ in range(requests)]
                served.knowledge = None
                unrouted = [ask(routed_q) for _ in range(requests)]
                served.knowledge = agent.knowledge
                alternating = [ask(q) for _ in range(requests) for q in (routed_q, unrouted_q)][::2]
        finally:
            agent.close()
    expected = [[module]] * (1 + requests) + [[]] * requests + [[module], []] * requests
    routed_right = [m for _, m in used][1:] == expected
    p50 = {name: round(float(np.median([x[0] for x in lat])), 3) for name, lat in
           (("unrouted", unrouted), ("routed_same_module", routed_same), ("routed_alternating", alternating))}
    per_token = {name: round(1000 * float(np.median([x[1] for x in lat])), 1) for name, lat in
                 (("unrouted", unrouted), ("routed_same_module", routed_same), ("routed_alternating", alternating))}
    return {
        "learn_seconds": round(learn_s, 1), "module_disk_mb": round(disk / 1e6, 2),
        # in memory: a module's tensors while it is loaded, and while merged a copy of
        # the weights it adapts (held to restore them exactly)
        "module_memory_mb": round(disk / 1e6, 2),
        "routed_correctly": routed_right, "embed_question_ms": round(embed_ms, 2),
        "routing_1000": routing_speed(lexical_weight=cfg.memory.lexical_weight),
        "p50_s": p50, "p50_ms_per_token": per_token, "requests": requests, "max_tokens": max_tokens,
        "routed_over_unrouted_p50": round(p50["routed_same_module"] / p50["unrouted"], 2),
        "alternating_over_unrouted_p50": round(p50["routed_alternating"] / p50["unrouted"], 2),
        "routed_over_unrouted_per_token": round(per_token["routed_same_module"] / per_token["unrouted"], 2),
    }


def query_latency(cfg: Config, policy: Policy, requests: int = 12, max_tokens: int = 16) -> dict[str, Any]:
    """p50/p95 latency of a short chat completion through the real API (uvicorn
    on 127.0.0.1, the real openai client), with the learner idle and while an
    inner loop trains on the same machine, side by side."""
    import copy
    import threading

    from ..service.serving import Served, ServingOnly

    base_dir = resolve_base(cfg)
    tokenizer = load_tokenizer(base_dir)
    live = load_model(base_dir, cfg)
    backend = ServingOnly(cfg.api, Served.from_config(cfg, copy.deepcopy(live), tokenizer, 0))
    question = [{"role": "user", "content": "Who won the Zorblax Prize in 2031?"}]

    def measure(n: int = requests) -> dict[str, float]:
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.chat.completions.create(model=cfg.api.model_name, messages=question, max_tokens=max_tokens)
            lat.append(time.perf_counter() - t0)
        return {"p50_s": round(float(np.median(lat)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
                "requests": n}

    with api_client(backend) as client:
        measure(2)  # warm-up
        idle = measure()
        training = threading.Event()
        done = threading.Event()

        def learner() -> None:
            cfg_long = dataclasses.replace(cfg.train, epochs=1000)  # stopped below, once measured
            peft_model = attach_lora(live, cfg.lora, seed=0)
            try:
                training.set()
                train(peft_model, tokenizer, bench_examples(policy), cfg_long, compute_dtype=train_dtype(cfg),
                      on_step=lambda *_: _stop_if(done))
            except _Stop:
                pass
            finally:
                peft_model.unload()

        t = threading.Thread(target=learner, daemon=True)
        t.start()
        training.wait()
        busy = measure()
        done.set()
        t.join()
    return {"max_tokens": max_tokens, "idle": idle, "while_training": busy,
            "slowdown_p50": round(busy["p50_s"] / idle["p50_s"], 2)}


class _Stop(Exception):
    pass


def _stop_if(event) -> None:
    if event.is_set():
        raise _Stop
