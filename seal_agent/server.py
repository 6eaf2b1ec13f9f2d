"""The query API: OpenAI-compatible endpoints served by the live model, plus documents, jobs, status.

    GET  /healthz                 liveness and the served version
    GET  /v1/models               the one model, named `api.model_name`
    POST /v1/chat/completions     messages -> answer (stream: server-sent events)
    POST /v1/completions          prompt -> completion (stream too)
    POST /v1/documents            {"filename", "content" | "content_base64"} -> a learning job
    GET  /v1/jobs/{id}            a job's state and result
    GET  /v1/status               what `seal-agent status --json` prints

Requests are answered by `Served`: its own copy of the live weights, replaced
atomically between requests when the learner commits a version, so answers
keep flowing while an update trains and never come from a half-trained model.
Errors use OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ApiConfig
from .errors import SealError
from .model.generation import Sampling, first_stop, generate, generate_kwargs, render_chat
from .model.precision import computing_in

if TYPE_CHECKING:
    from .daemon import Daemon


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Served:
    """The model that answers requests (a copy of the live weights) and its version."""

    def __init__(self, model, tokenizer, version: int, use_chat: bool = True, dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer, self.version = model, tokenizer, version
        self.use_chat = use_chat
        self.dtype = dtype  # matmul dtype of its answers (model.answer_dtype)
        self._swap = threading.Lock()
        self._generate = threading.Lock()  # one generation at a time: two would fight for the cores

    def swap(self, model, version: int) -> None:
        with self._swap:
            self.model, self.version = model, version

    def current(self):
        with self._swap:
            return self.model, self.version

    def prompt_for(self, messages: list[dict[str, str]]) -> str:
        if self.use_chat and getattr(self.tokenizer, "chat_template", None):
            return render_chat(self.tokenizer, messages)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def complete(self, prompt: str, sampling: Sampling, seed: int | None = None) -> tuple[str, int, int, str]:
        """(text, prompt tokens, completion tokens, finish reason)."""
        model, _version = self.current()
        with self._generate:
            [text] = generate(model, self.tokenizer, [prompt], sampling, seed=seed, compute_dtype=self.dtype)
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_out = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        finish = "length" if n_out >= sampling.max_new_tokens else "stop"
        return text, n_prompt, n_out, finish

    def stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        """Text pieces as they are generated."""
        from transformers import TextIteratorStreamer

        model, _version = self.current()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        kwargs = {**generate_kwargs(self.tokenizer, sampling), "streamer": streamer}

        def run() -> None:
            with self._generate, torch.inference_mode(), computing_in(model, self.dtype):
                model.generate(**enc, **kwargs)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        emitted = ""
        for piece in streamer:
            text = emitted + piece
            cut = first_stop(text, sampling.stop)
            if cut >= 0:
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                break
            emitted = text
            if piece:
                yield piece
        thread.join()


# -- request bodies ------------------------------------------------------

class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampled):
    prompt: str | list[str]


class DocumentRequest(BaseModel):
    filename: str = Field(min_length=1, max_length=255)
    content: str | None = None
    content_base64: str | None = None


def _sampling(req: _Sampled, cfg: ApiConfig) -> Sampling:
    n = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
    if n > cfg.max_tokens:
        raise ApiError(400, f"max_tokens {n} is over this server's limit of {cfg.max_tokens}", param="max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4:
        raise ApiError(400, "at most 4 stop sequences", param="stop")
    return Sampling(max_new_tokens=n, temperature=req.temperature, top_p=req.top_p, stop=stop)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- the app -------------------------------------------------------------

def build_app(daemon: Daemon) -> FastAPI:
    cfg = daemon.cfg.api
    app = FastAPI(title="seal-agent", docs_url=None, redoc_url=None, openapi_url=None)
    served = daemon.served

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(SealError)
    async def _seal_error(_request: Request, e: SealError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if cfg.token and request.headers.get("authorization", "") != f"Bearer {cfg.token}":
            return JSONResponse(error_body("missing or wrong bearer token", "authentication_error",
                                           code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_request_bytes:
            return JSONResponse(error_body(f"request body over {cfg.max_request_bytes:,} bytes",
                                           "invalid_request_error"), status_code=413)
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": served.current()[1]}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(daemon.started),
                                            "owned_by": "seal-agent", "version": served.current()[1]}]}

    def _respond(kind: str, prompt: str, sampling: Sampling, stream: bool, seed: int | None):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        version = served.current()[1]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if stream:
            def events() -> Iterator[str]:
                if kind == "chat":
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": cfg.model_name, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                                       "finish_reason": None}]})
                for piece in served.stream(prompt, sampling):
                    if kind == "chat":
                        choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": cfg.model_name, "choices": [choice]})
                    else:
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": cfg.model_name,
                                    "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
                end = ({"index": 0, "delta": {}, "finish_reason": "stop"} if kind == "chat"
                       else {"index": 0, "text": "", "finish_reason": "stop"})
                yield _sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                            "created": created, "model": cfg.model_name, "choices": [end]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, n_in, n_out, finish = served.complete(prompt, sampling, seed)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if kind == "chat" else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": rid, "object": obj, "created": created, "model": cfg.model_name,
                "system_fingerprint": f"seal-v{version}", "choices": [choice],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        sampling = _sampling(req, cfg)
        prompt = served.prompt_for([{"role": m.role, "content": m.text()} for m in req.messages])
        return _respond("chat", prompt, sampling, req.stream, req.seed)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        sampling = _sampling(req, cfg)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "this server completes one prompt per request", param="prompt")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        return _respond("completion", prompt, sampling, req.stream, req.seed)

    @app.post("/v1/documents", status_code=202)
    def documents(req: DocumentRequest) -> dict[str, Any]:
        if (req.content is None) == (req.content_base64 is None):
            raise ApiError(400, "give exactly one of content (text) or content_base64 (bytes)", param="content")
        if req.content is not None:
            data = req.content.encode("utf-8")
        else:
            try:
                data = base64.b64decode(req.content_base64 or "", validate=True)
            except ValueError:
                raise ApiError(400, "content_base64 is not valid base64", param="content_base64") from None
        job = daemon.submit(req.filename, data)
        return {"id": job.id, "object": "job", "state": job.state, "name": job.name, "error": job.error}

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: int) -> dict[str, Any]:
        j = daemon.queue.get(job_id)
        if j is None:
            raise ApiError(404, f"no job {job_id}", code="not_found")
        return {"object": "job", **j.as_dict()}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return daemon.status()

    return app
