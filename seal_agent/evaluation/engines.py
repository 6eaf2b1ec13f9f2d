"""`seal-agent bench --part engines`: the torch engine and vLLM side by side in one run.

In a scratch state, one document of `documents` invented passages is learned
as one knowledge module per passage (`memory.module_passages = 1`; one epoch:
serving a module costs the same however long it trained). Then, per engine:
- decoding throughput (greedy, tokens/s) at 1, 8 and 32 rows, with the weights
  alone and with a module (torch: merged in; vLLM: a LoRA per request);
- the API under load (uvicorn on 127.0.0.1, the real openai client): 1, 4 and
  16 concurrent clients, each a bounded loop of requests about a document of
  its own, so that with 16 clients 16 different modules are in use at once;
  requests/s and p50/p95 latency, and whether each answer used its module;
- ingest: seconds per passage of `learn` on a two-passage document with the
  default recipe, the self-edits, questions and checks decoded by that engine;
- and whether the two engines agree: each document's question answered with
  its module by both, the same answer and the same grade.
The torch engine is measured first, with vLLM not yet started, so the two
never share the cores.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..model.generation import Sampling, complete
from ..model.inner_loop import applied
from ..model.loader import answer_dtype
from ..qa.grading import grade
from .routing import share
from .scratch import scratch_config

# Invented festivals: no model knows them, and every one has names of its own to be routed by.
_NAMES = ["Orvanti", "Belcastro", "Quenmark", "Tazzuli", "Virelda", "Montoki", "Sarbeck", "Ulvaro",
          "Prenzia", "Kadoru", "Lisvane", "Heptor", "Zandrelle", "Corvadi", "Milbraith", "Ostrevan",
          "Falquist", "Rendazzo", "Yolvenna", "Trabosk", "Gundevar", "Ilsamere", "Wexbury", "Dromalta"]
_TOWNS = ["Kelport", "Ardmoor", "Vessaline", "Torrico", "Blaenhollow", "Sunderby", "Marrowgate", "Quelbridge",
          "Ostria", "Penhallow", "Drayford", "Lumeria", "Caskwell", "Brindisca", "Harlowen", "Feyridge",
          "Norvaic", "Estrello", "Galvoe", "Thornquay", "Ribbelsa", "Mossavel", "Crandor", "Yselmouth"]
_THINGS = ["lanterns", "kites", "bread", "violins", "boats", "masks", "cheese", "bells", "clocks", "rugs",
           "drums", "glass", "honey", "paper", "silver", "wool", "maps", "tea", "salt", "candles", "wine",
           "lace", "olives", "pottery"]


def festival(i: int) -> dict[str, Any]:
    """The i-th invented passage (SQuAD-shaped, with one question)."""
    name, town, thing = _NAMES[i], _TOWNS[i], _THINGS[i]
    year = 1850 + 7 * i
    title = f"The {name} Festival"
    context = (f"The {name} Festival is a celebration of {thing} held every spring in the town of {town}. "
               f"It was first held in {year}, when the merchant Anika {name[:4]}ova opened her workshop to the "
               f"public. Each year about {3 + i} thousand visitors come to {town} to see the {thing} made by "
               f"hand, and the festival ends with a parade across the old stone bridge of {town}.")
    return {"title": title, "context": context,
            "questions": [{"question": f"In which town is the {name} Festival of {thing} held?", "answer": town}]}


def _latencies(lat: list[float]) -> dict[str, float]:
    return {"p50_s": round(float(np.median(lat)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3)}


def decode_speed(decoder, tokenizer, prompts: list[str], rows: tuple[int, ...], max_tokens: int, dtype,
                 adapter: Path | None) -> dict[str, Any]:
    """Greedy tokens/s of `decoder` (a torch model, or a vLLM engine's view) at each row count."""
    out = {}
    sampling = Sampling(max_new_tokens=max_tokens)
    for n in rows:
        batch = [prompts[i % len(prompts)] for i in range(n)]
        t0 = time.perf_counter()
        if adapter is None:
            done = complete(decoder, tokenizer, batch, sampling, compute_dtype=dtype, batch_size=n)
        else:
            with applied(decoder, adapter) as with_module:
                done = complete(with_module, tokenizer, batch, sampling, compute_dtype=dtype, batch_size=n)
        seconds = time.perf_counter() - t0
        tokens = sum(c.tokens for c in done)
        out[f"rows_{n}"] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    return out


def api_load(client, cfg: Config, questions: list[tuple[str, int]], clients: tuple[int, ...], requests: int,
             max_tokens: int) -> dict[str, Any]:
    """Per client count: each client a loop of `requests` requests about its own
    document (client i asks question i), all at once; requests/s over the wall time."""
    def loop(i: int) -> list[tuple[float, bool]]:
        question, module = questions[i % len(questions)]
        timed = []
        for _ in range(requests):
            t0 = time.perf_counter()
            r = client.chat.completions.create(model=cfg.api.model_name, max_tokens=max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": question}])
            timed.append((time.perf_counter() - t0, [m["module"] for m in r.model_extra["seal_modules"]] == [module]))
        return timed

    out = {}
    for n in clients:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:  # a client's error is raised here, once all have stopped
            timed = [x for per_client in pool.map(loop, range(n)) for x in per_client]
        wall = time.perf_counter() - t0
        lat, right = [t for t, _ in timed], [ok for _, ok in timed]
        out[f"clients_{n}"] = {"requests": len(lat), "seconds": round(wall, 2),
                               "requests_per_s": round(len(lat) / wall, 2), **_latencies(lat),
                               "answered_with_its_module": share(right)}
    return out


def ingest_with(cfg: Config, engine: str, tmp: Path) -> dict[str, Any]:
    """`learn` of a two-passage document in a fresh scratch state, `engine` writing
    and answering (its start is outside the timed part)."""
    from .bench import BENCH_PASSAGE, BENCH_PASSAGE_2, BENCH_TITLE, timed_learn

    doc = tmp / f"ingest-{engine}.md"
    doc.write_text(f"# {BENCH_TITLE}\n\n{BENCH_PASSAGE}\n\n{BENCH_PASSAGE_2}\n")
    report, seconds = timed_learn(cfg, doc, tmp / f"ingest-{engine}", split={"max_tokens": 160},
                                  memory={"mode": "modules"}, engine={"generate": engine, "serve": engine})
    n = len(report.passages)
    return {"passages": n, "seconds_per_passage": round(seconds / n, 1),
            "stage_seconds": [p.stage_seconds for p in report.passages],
            "statuses": [p.status for p in report.passages]}


def engines(cfg: Config, *, documents: int = 16, rows: tuple[int, ...] = (1, 8, 32),
            clients: tuple[int, ...] = (1, 4, 16), requests: int = 4, max_tokens: int = 32, ingest: bool = True,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    from ..agent import SealAgent
    from ..service.serving import Served, ServingOnly
    from .bench import api_client

    if max(clients) > documents:
        raise ValueError("every client asks about a document of its own: clients must not exceed documents")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = tmp / "festivals.json"
        items = [festival(i) for i in range(documents)]
        data.write_text(json.dumps(items))
        agent = SealAgent(scratch_config(cfg, tmp / "state", memory={"mode": "modules", "module_passages": 1},
                                         train={"epochs": 1}, engine={"generate": "torch", "serve": "torch"}))
        try:
            log(f"engines: learning {documents} modules ...")
            report = agent.learn(data)
            live = agent.live
            modules = [p.module for p in report.passages]
            if None in modules or len(set(modules)) != documents:
                raise RuntimeError(f"expected {documents} modules, learned {modules}")
            served_probe = Served.from_config(agent.cfg, live.model, live.tokenizer, live.version,
                                              knowledge=agent.knowledge)
            asked = [it["questions"][0]["question"] for it in items]
            questions = list(zip(asked, modules))
            prompts = [served_probe.prompt_for([{"role": "user", "content": q}]) for q in asked]
            adapter = agent.modules.path(modules[0])
            dtype = answer_dtype(agent.cfg)
            run = {"documents": documents, "rows": list(rows), "clients": list(clients),
                   "requests_per_client": requests, "max_tokens": max_tokens}
            result: dict[str, Any] = {"engines": {}, "engines_run": run}

            def measure(name: str, decoder, serving) -> None:
                log(f"engines: {name}: decoding at {rows} rows, without and with a module ...")
                figures: dict[str, Any] = {
                    "decode": decode_speed(decoder, live.tokenizer, prompts, rows, max_tokens, dtype, None),
                    "decode_lora": decode_speed(decoder, live.tokenizer, prompts, rows, max_tokens, dtype, adapter),
                }
                answers = []  # each document's question, with its module: what a check grades
                for prompt, module in zip(prompts, modules):
                    with applied(decoder, agent.modules.path(module)) as with_module:
                        [c] = complete(with_module, live.tokenizer, [prompt], Sampling(max_new_tokens=max_tokens),
                                       compute_dtype=dtype)
                    answers.append(c.text)
                figures["answers"] = answers
                log(f"engines: {name}: the API with {clients} concurrent clients ...")
                served = Served.from_config(agent.cfg, serving, live.tokenizer, live.version,
                                            knowledge=agent.knowledge)
                try:
                    with api_client(ServingOnly(agent.cfg.api, served)) as client:
                        # warm-up: every module asked once (vLLM loads an adapter at its first request)
                        api_load(client, agent.cfg, questions, (len(questions),), 1, max_tokens)
                        figures["api"] = api_load(client, agent.cfg, questions, clients, requests, max_tokens)
                finally:
                    served.close()
                result["engines"][name] = figures

            measure("torch", live.model, live.model)
            log("engines: starting vLLM ...")
            t0 = time.perf_counter()
            engine = agent.vllm()
            run["vllm_start_seconds"] = round(time.perf_counter() - t0, 1)
            measure("vllm", engine.view(), engine)
        finally:
            agent.close()
        if ingest:
            for name in ("torch", "vllm"):
                log(f"engines: {name}: ingest ...")
                result["engines"][name]["ingest"] = ingest_with(cfg, name, tmp)
    torch_answers, vllm_answers = (result["engines"][e].pop("answers") for e in ("torch", "vllm"))
    golds = [it["questions"][0]["answer"] for it in items]
    result["engines_agree"] = {
        "questions": documents,
        "same_answer": share(a == b for a, b in zip(torch_answers, vllm_answers)),
        "same_grade": share(grade(a, g, cfg.qa) == grade(b, g, cfg.qa)
                            for a, b, g in zip(torch_answers, vllm_answers, golds)),
        "correct": {"torch": sum(grade(a, g, cfg.qa) for a, g in zip(torch_answers, golds)),
                    "vllm": sum(grade(b, g, cfg.qa) for b, g in zip(vllm_answers, golds))},
    }
    top = f"clients_{max(clients)}"
    t, v = result["engines"]["torch"]["api"][top], result["engines"]["vllm"]["api"][top]
    result[f"api_throughput_ratio_{max(clients)}"] = round(v["requests_per_s"] / t["requests_per_s"], 2)
    result[f"api_p95_ratio_{max(clients)}"] = round(v["p95_s"] / t["p95_s"], 2)
    return result


def summary(result: dict[str, Any]) -> str:
    run = result["engines_run"]
    head = (f"engines ({run['documents']} modules, {run['max_tokens']} tokens per answer; vLLM started in "
            f"{run['vllm_start_seconds']} s):")
    lines = [head]
    for name, figures in result["engines"].items():
        lines.append(f"  {name}:")
        for key, label in (("decode", "decode"), ("decode_lora", "decode + module")):
            lines.append(f"    {label:16} " + ", ".join(f"{k.removeprefix('rows_')} rows {v['tokens_per_s']} tok/s"
                                                       for k, v in figures[key].items()))
        for k, v in figures["api"].items():
            lines.append(f"    API {k.removeprefix('clients_'):>2} clients  {v['requests_per_s']} req/s, p50 "
                         f"{v['p50_s']} s, p95 {v['p95_s']} s, its module {v['answered_with_its_module']:.0%}")
        if "ingest" in figures:
            lines.append(f"    ingest {figures['ingest']['seconds_per_passage']} s per passage")
    agree = result["engines_agree"]
    lines.append(f"  the {agree['questions']} documents' questions, each with its module: the same answer "
                 f"{agree['same_answer']:.0%}, the same grade {agree['same_grade']:.0%} (correct: torch "
                 f"{agree['correct']['torch']}, vLLM {agree['correct']['vllm']})")
    top = max(run["clients"])
    lines.append(f"  with {top} clients: vLLM/torch throughput {result[f'api_throughput_ratio_{top}']}x, "
                 f"p95 {result[f'api_p95_ratio_{top}']}x")
    return "\n".join(lines)
