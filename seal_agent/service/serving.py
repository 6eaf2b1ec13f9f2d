"""Serving: the model that answers requests (`Served`), what the HTTP API
needs from whatever runs behind it (`ServingBackend`: the daemon implements
it), and a backend that only serves a model (`ServingOnly`).

`Served` holds its own copy of the live weights, replaced atomically between
requests when the learner commits a version, so answers keep flowing while an
update trains and never come from a half-trained model. With knowledge modules
(`memory.mode = "modules"`) it routes each request (its last user message, or
its prompt) through the served version's routing table, as `ask` does, and
answers with the module merged in; the module stays merged until a request
needs another one or none (most requests in a row are about one document), and
merging and restoring give the very same weights each time (`Merged`).

With vLLM serving (`engine.serve = "vllm"`) the model slot holds a `VllmEngine`
on the live weights instead: requests are not taken one at a time but handed
to the engine as they come (continuous batching), each with its module as a
per-request LoRA adapter, so rows about different documents share a batch. A
version with new weights swaps in a new engine; requests already running
finish on the old one, which shuts down once they have. The API gets a
backend, never the daemon (as vLLM's OpenAI server hands its routers a
handler, not the engine); errors here say what to change, not an HTTP status.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from jinja2 import TemplateError

from ..config import ApiConfig, Config
from ..engine.vllm import VllmEngine
from ..errors import SealError
from ..memory.knowledge import Knowledge
from ..memory.modules import Route
from ..model.generation import Completion, Sampling, TextStream, complete, has_chat_template, render_chat
from ..model.inner_loop import Merged
from ..model.loader import answer_dtype, context_length
from .queue import Job

NO_ROUTE = Route(None, -1.0)


class Unservable(SealError):
    """A request the model cannot answer as it is; `param` names the part to change."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class NotFound(SealError):
    """What a request names that does not exist (a document, a schedule)."""


class NotServed(SealError):
    """What this backend does not do (documents and jobs, behind a model served alone)."""


class Served:
    """The model that answers requests (a copy of the live weights) and its version."""

    def __init__(self, model, tokenizer, version: int, use_chat: bool = True, dtype: torch.dtype = torch.float32,
                 knowledge: Knowledge | None = None):
        self.model, self.tokenizer, self.version = model, tokenizer, version
        self.use_chat = use_chat
        self.dtype = dtype  # matmul dtype of its answers (model.answer_dtype)
        self.knowledge = knowledge  # None: nothing is routed
        # an engine's own max_model_len in place of the model's position table
        self.context = context_length(model, tokenizer, model.max_model_len if isinstance(model, VllmEngine) else None)
        if isinstance(model, VllmEngine):
            model.hold()  # up until this server swaps it out or closes
        self._swap = threading.Lock()
        self._generate = threading.Lock()  # one generation at a time: two would fight for the cores
        self._merged: tuple[object, int, Merged] | None = None  # (model, module, its merge) while merged

    @classmethod
    def from_config(cls, cfg: Config, model, tokenizer, version: int, knowledge: Knowledge | None = None) -> Served:
        """`model` served as the config says: chat template or not, the answering dtype."""
        return cls(model, tokenizer, version, use_chat=cfg.model.use_chat_template, dtype=answer_dtype(cfg),
                   knowledge=knowledge)

    def swap(self, model, version: int) -> None:
        """Serve `version` from now on: `model` holds its weights (the same object
        when only the routing table changed). An engine swapped out finishes the
        requests it has; modules no longer routed leave a vLLM engine."""
        if isinstance(model, VllmEngine) and model is not self.model:
            model.hold()
        with self._swap:
            old, old_version = self.model, self.version
            self.model, self.version = model, version
        if isinstance(old, VllmEngine):
            if old is not model:
                old.retire()
            elif self.knowledge is not None:
                for module in self.knowledge.dropped(old_version, version):
                    model.unload(self.knowledge.store.path(module))

    def close(self) -> None:
        """Let go of a vLLM engine (it shuts down once no one else holds it), or take
        off the torch model the module left merged in."""
        with self._swap:
            model = self.model
        if isinstance(model, VllmEngine):
            model.retire()
            return
        with self._generate:  # the torch engine: the module left merged in comes off
            if self._merged is not None:
                merge, self._merged = self._merged[2], None
                merge.discard()

    def current(self):
        with self._swap:
            return self.model, self.version

    def route(self, text: str) -> Route:
        """The module a request is answered with, on the served version's routing table."""
        if self.knowledge is None:
            return NO_ROUTE
        _model, version = self.current()
        [route] = self.knowledge.route(version, [text])
        return route

    def used(self, route: Route) -> list[dict[str, Any]]:
        return self.knowledge.used(route) if self.knowledge is not None else []

    def passage_prefix(self, route: Route) -> str:
        """The routed module's passage, put before the request (`memory.with_passage`), or ""."""
        return self.knowledge.passage_prefix(route) if self.knowledge is not None else ""

    def _module(self, route: Route) -> int | None:
        return self.knowledge.applies(route) if self.knowledge is not None else None

    def _apply(self, model, module: int | None) -> None:
        """`model` with `module` merged in (None: none); the generation lock is held."""
        if self._merged is not None:
            merged_on, current, merge = self._merged
            if merged_on is model and current == module:
                return
            self._merged = None
            merge.discard()  # the very same weight tensors back (on whichever model it was merged into)
        if module is not None:
            from peft import PeftModel

            path = self.knowledge.store.path(module)
            self._merged = (model, module, Merged(PeftModel.from_pretrained(model, str(path), is_trainable=False)))

    def prompt_for(self, messages: list[dict[str, str]]) -> str:
        if self.use_chat and has_chat_template(self.tokenizer):
            try:
                return render_chat(self.tokenizer, messages)
            except TemplateError as e:  # e.g. a template that wants user and assistant turns to alternate
                raise Unservable(f"the model's chat template refused these messages: {e}", "messages") from None
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def prepare(self, prompt: str) -> tuple[str, int]:
        """The prompt to generate from, and its length in tokens. An empty prompt
        starts from the tokenizer's start token, as OpenAI's completions do: a
        model cannot continue nothing."""
        n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n:
            return prompt, n
        start = self.tokenizer.bos_token or self.tokenizer.eos_token
        if start is None:
            raise Unservable("the prompt is empty and this model's tokenizer has no start token to begin from: "
                             "give some text", "prompt")
        return start, 1

    def _adapter(self, route: Route):
        module = self._module(route)
        return None if module is None else self.knowledge.store.path(module)

    def complete(self, prompt: str, sampling: Sampling, n: int = 1, seed: int | None = None,
                 route: Route = NO_ROUTE) -> list[Completion]:
        model, _version = self.current()
        if isinstance(model, VllmEngine):  # batched by the engine with whatever else is running
            return model.complete([prompt] * n, sampling, adapter=self._adapter(route), seed=seed)
        with self._generate:
            self._apply(model, self._module(route))
            return complete(model, self.tokenizer, [prompt] * n, sampling, seed=seed, compute_dtype=self.dtype,
                            batch_size=n)

    def stream(self, prompt: str, sampling: Sampling, seed: int | None = None, route: Route = NO_ROUTE) -> TextStream:
        model, _version = self.current()
        if isinstance(model, VllmEngine):
            return model.stream(prompt, sampling, adapter=self._adapter(route), seed=seed)
        return TextStream(model, self.tokenizer, prompt, sampling, lock=_Applying(self, model, self._module(route)),
                          compute_dtype=self.dtype, seed=seed)


class _Applying:
    """The generation lock of a stream, which applies its module once taken."""

    def __init__(self, served: Served, model, module: int | None):
        self.served, self.model, self.module = served, model, module

    def acquire(self, timeout: float = -1) -> bool:
        if not self.served._generate.acquire(timeout=timeout):
            return False
        try:
            self.served._apply(self.model, self.module)
        except BaseException:
            self.served._generate.release()
            raise
        return True

    def release(self) -> None:
        self.served._generate.release()


class ServingBackend(Protocol):
    """What the HTTP API reads and calls; nothing else of what runs behind it."""

    @property
    def api(self) -> ApiConfig: ...

    @property
    def served(self) -> Served: ...

    @property
    def started(self) -> float: ...  # Unix time, the `created` of /v1/models

    def submit(self, filename: str, data: bytes) -> Job:
        """A posted document, taken for learning (SealError: refused, saying why)."""
        ...

    def job(self, job_id: int) -> Job | None: ...

    def status(self) -> dict[str, Any]:
        """What `seal-agent status --json` prints."""
        ...

    @property
    def database(self) -> Path | None: ...  # the state database the page reads (None: nothing learned here)

    def set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        """A schedule paused or resumed: its row (name, trigger, paused, next_run)."""
        ...

    def check(self, document_id: int) -> Job:
        """A replay check of one document's QAs, queued for the learner."""
        ...


class ServingOnly:
    """A backend that serves a model and learns nothing (the benchmark's API
    latency): documents and status are refused as not implemented, and it knows no job."""

    def __init__(self, api: ApiConfig, served: Served):
        self.api, self.served = api, served
        self.started = time.time()

    def submit(self, filename: str, data: bytes) -> Job:
        raise NotServed("this server only serves a model: it learns no documents (`seal-agent run` does)")

    def job(self, job_id: int) -> Job | None:
        return None

    def status(self) -> dict[str, Any]:
        raise NotServed("this server only serves a model: it has no learning status (`seal-agent run` does)")

    database = None

    def set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        raise NotServed("this server only serves a model: it runs no schedules (`seal-agent run` does)")

    def check(self, document_id: int) -> Job:
        raise NotServed("this server only serves a model: it has no documents (`seal-agent run` does)")
