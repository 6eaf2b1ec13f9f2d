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
Every answer is JSON (or server-sent events of JSON); errors use OpenAI's
shape: {"error": {"message", "type", "param", "code"}}. A parameter this server
does not implement is refused, never silently ignored, unless it asks for
nothing (its default) or changes nothing in what is generated (`user`, ...).
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import reprlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.types import Receive, Scope, Send

from ...config import ApiConfig
from ...errors import SealError
from ...model.generation import Completion, Sampling, TextStream, complete, has_chat_template, render_chat
from .guard import Guard, body_too_large, error_body, error_response

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)

MAX_CHOICES = 8  # the largest n: that many completions are written as one batch


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _context(model, tokenizer) -> int | None:
    """Tokens the model attends to, prompt and completion together: its position
    table, or its tokenizer's limit where smaller (a tokenizer without one says 1e30)."""
    limits = (getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
    return min((n for n in limits if isinstance(n, int) and 0 < n < 10**8), default=None)


class Served:
    """The model that answers requests (a copy of the live weights) and its version."""

    def __init__(self, model, tokenizer, version: int, use_chat: bool = True, dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer, self.version = model, tokenizer, version
        self.use_chat = use_chat
        self.dtype = dtype  # matmul dtype of its answers (model.answer_dtype)
        self.context = _context(model, tokenizer)
        self._swap = threading.Lock()
        self._generate = threading.Lock()  # one generation at a time: two would fight for the cores

    def swap(self, model, version: int) -> None:
        with self._swap:
            self.model, self.version = model, version

    def current(self):
        with self._swap:
            return self.model, self.version

    def prompt_for(self, messages: list[dict[str, str]]) -> str:
        if self.use_chat and has_chat_template(self.tokenizer):
            try:
                return render_chat(self.tokenizer, messages)
            except TemplateError as e:  # e.g. a template that wants user and assistant turns to alternate
                raise ApiError(400, f"the model's chat template refused these messages: {e}",
                               param="messages") from None
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
            raise ApiError(400, "the prompt is empty and this model's tokenizer has no start token to begin "
                                "from: give some text", param="prompt")
        return start, 1

    def complete(self, prompt: str, sampling: Sampling, n: int = 1, seed: int | None = None) -> list[Completion]:
        model, _version = self.current()
        with self._generate:
            return complete(model, self.tokenizer, [prompt] * n, sampling, seed=seed, compute_dtype=self.dtype,
                            batch_size=n)

    def stream(self, prompt: str, sampling: Sampling, seed: int | None = None) -> TextStream:
        model, _version = self.current()
        return TextStream(model, self.tokenizer, prompt, sampling, lock=self._generate, compute_dtype=self.dtype,
                          seed=seed)


# -- request bodies ------------------------------------------------------

# OpenAI parameters this server does not implement, accepted at the value that asks for nothing...
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
    "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "best_of": (1,), "tools": ([],), "functions": ([],),
    "tool_choice": ("none", "auto"), "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
    "modalities": (["text"],),
}
# ...and those that change nothing in what is generated, accepted as they come.
_IGNORED = {"user", "name", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "safety_identifier"}


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    # False == 0 in Python, but logprobs=0 still asks for the chosen token's logprob
    return any(value == d and isinstance(value, bool) == isinstance(d, bool) for d in defaults)


def _refuse_unsupported(extra: dict[str, Any] | None, where: str = "") -> None:
    """Fields a request model did not declare: accepted where they ask for nothing, else a 400 naming them."""
    for name, value in (extra or {}).items():
        if value is None or name in _IGNORED or _is_default(value, _DEFAULT_ONLY.get(name, ())):
            continue
        what = "is not supported by this server" if name in _DEFAULT_ONLY else "is not a parameter this server knows"
        raise ApiError(400, f"{where}{name}={reprlib.repr(value)} {what}: leave it out", param=f"{where}{name}",
                       code="unsupported_parameter")


def _unicode(text: str) -> str:
    # JSON's \ud800 escapes can spell half a character, which no tokenizer, file name or UTF-8 answer can hold
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not Unicode text: a lone surrogate {text[e.start]!r} at {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by _refuse_unsupported
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # developer is OpenAI's newer name for the system message
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by _refuse_unsupported
    model: Text | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stop: Text | list[Text] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # what torch.manual_seed takes


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampled):
    prompt: Text | list[Text]


class DocumentRequest(BaseModel):
    filename: Text = Field(min_length=1, max_length=255)
    content: Text | None = None
    content_base64: Text | None = None


# Field names, to tell them from the union members pydantic also puts in an error's location.
_FIELDS = {name for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions, DocumentRequest)
           for name in m.model_fields} | {"job_id"}


def _invalid(errors: list[dict[str, Any]]) -> ApiError:
    """Pydantic's most specific error, said as OpenAI says one: the field's path as `param`."""
    if not errors:
        return ApiError(400, "invalid request")
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'malformed')} "
                             f"(at position {loc[-1]})")
    path = ".".join(str(x) for x in loc[1:] if isinstance(x, int) or x in _FIELDS)
    if not path:
        return ApiError(400, f"the body must be a JSON object, sent with Content-Type: application/json "
                             f"({error.get('msg', 'invalid')})")
    return ApiError(400, f"{path}: {error.get('msg', 'invalid')}", param=path)


def _sampling(req: _Sampled, cfg: ApiConfig, n_prompt: int, context: int | None, prompt_param: str) -> Sampling:
    asked = req.max_completion_tokens or req.max_tokens
    n = asked or cfg.default_max_tokens
    if n > cfg.max_tokens:
        raise ApiError(400, f"max_tokens {n} is over this server's limit of {cfg.max_tokens}", param="max_tokens")
    if context is not None:
        if asked is None:  # as many as fit, up to the default
            n = min(n, context - n_prompt)
        if n < 1 or n_prompt + n > context:
            want = asked or cfg.default_max_tokens
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{n_prompt + want} tokens ({n_prompt} in the {prompt_param}, {want} in the "
                                f"completion). Please reduce the length of the {prompt_param} or completion.",
                           param=prompt_param, code="context_length_exceeded")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4:
        raise ApiError(400, "at most 4 stop sequences", param="stop")
    return Sampling(max_new_tokens=n, temperature=req.temperature or 0.0,
                    top_p=1.0 if req.top_p is None else req.top_p, stop=stop)


# -- answers -------------------------------------------------------------

class _Chat:
    """Answers as chat.completion objects."""
    id_prefix, object, chunk_object, prompt_param = "chatcmpl", "chat.completion", "chat.completion.chunk", "messages"
    opening = ({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},)

    @staticmethod
    def choice(index: int, text: str, finish: str) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    @staticmethod
    def delta(text: str, finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}


class _Completion:
    """Answers as text_completion objects."""
    id_prefix, object, chunk_object, prompt_param = "cmpl", "text_completion", "text_completion", "prompt"
    opening = ()

    @staticmethod
    def choice(index: int, text: str, finish: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def delta(text: str, finish: str | None = None) -> dict[str, Any]:
        return _Completion.choice(0, text, finish)


Shape = type[_Chat | _Completion]


def _usage(n_prompt: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _events(shape: Shape, head: dict[str, Any], stream: TextStream, n_prompt: int,
            include_usage: bool) -> Iterator[str]:
    usage = {"usage": None} if include_usage else {}  # as OpenAI: null in every chunk but the last
    head = {**head, "object": shape.chunk_object}
    for choice in shape.opening:
        yield _sse({**head, "choices": [choice], **usage})
    try:
        for piece in stream:
            yield _sse({**head, "choices": [shape.delta(piece)], **usage})
    except Exception as e:
        log.exception("%s: the generation failed", head["id"])
        yield _sse(error_body(f"the generation failed ({type(e).__name__}: {e}); the server log has the details",
                              "server_error"))
        return
    done = stream.completion
    yield _sse({**head, "choices": [shape.delta("", done.finish_reason)], **usage})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(n_prompt, done.tokens)})
    yield "data: [DONE]\n\n"


class _StreamedAnswer(StreamingResponse):
    """Server-sent events of one generation, which ends with the response: when
    the client goes away or the server stops, the generation is cancelled
    rather than left writing to max_tokens with the model held."""

    def __init__(self, events: Iterator[str], stream: TextStream):
        super().__init__(events, media_type="text/event-stream")
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_or_cancel():
            try:
                message = await receive()
            except BaseException:  # cancelled: the server is stopping
                self.stream.cancel()
                raise
            if message["type"] == "http.disconnect":
                self.stream.cancel()
            return message

        try:
            await super().__call__(scope, receive_or_cancel, send)
        finally:
            self.stream.cancel()


# -- the app -------------------------------------------------------------

def build_app(daemon: Daemon) -> FastAPI:
    cfg = daemon.cfg.api
    app = FastAPI(title="seal-agent", docs_url=None, redoc_url=None, openapi_url=None,
                  middleware=[Middleware(Guard, token=cfg.token, max_request_bytes=cfg.max_request_bytes)])
    served = daemon.served

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(SealError)
    async def _seal_error(_request: Request, e: SealError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, e: RequestValidationError) -> JSONResponse:
        return await _api_error(_request, _invalid(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 413:  # a body that grew past the limit as it was read (see Guard)
            return body_too_large(cfg.max_request_bytes)
        if isinstance(e.__cause__, ValueError | RecursionError):  # FastAPI's "error parsing the body"
            return error_response(400, f"the body is not valid JSON: {e.__cause__}")
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error_response(500, "internal error: the server log has the details", "server_error")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:  # on the event loop: alive even with every worker thread busy
        return {"status": "ok", "version": served.current()[1]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(daemon.started),
                                            "owned_by": "seal-agent", "version": served.current()[1]}]}

    def check(req: _Sampled) -> None:
        if req.model is not None and req.model != cfg.model_name:
            raise ApiError(404, f"The model '{req.model}' does not exist: this server serves '{cfg.model_name}'",
                           param="model", code="model_not_found")
        _refuse_unsupported(req.model_extra)
        if req.stream and (req.n or 1) > 1:
            raise ApiError(400, "n > 1 is not supported with stream: leave out stream, or send n requests",
                           param="n")

    def answer(shape: Shape, req: _Sampled, prompt: str):
        prompt, n_prompt = served.prepare(prompt)
        sampling = _sampling(req, cfg, n_prompt, served.context, shape.prompt_param)
        head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": cfg.model_name, "system_fingerprint": f"seal-v{served.current()[1]}"}
        if req.stream:
            stream = served.stream(prompt, sampling, req.seed)
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return _StreamedAnswer(_events(shape, head, stream, n_prompt, include_usage), stream)
        done = served.complete(prompt, sampling, req.n or 1, req.seed)
        return {**head, "object": shape.object,
                "choices": [shape.choice(i, c.text, c.finish_reason) for i, c in enumerate(done)],
                "usage": _usage(n_prompt, sum(c.tokens for c in done))}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        check(req)
        for i, m in enumerate(req.messages):
            _refuse_unsupported(m.model_extra, f"messages.{i}.")
        return answer(_Chat, req, served.prompt_for([m.as_dict() for m in req.messages]))

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        check(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "this server completes one prompt per request", param="prompt")
        return answer(_Completion, req, prompts[0])

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
        try:
            job = daemon.submit(req.filename, data)
        except OSError as e:
            if e.errno not in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                raise
            # the inbox's file system refused the name itself (over 255 bytes, bytes it cannot hold)
            raise ApiError(400, f"cannot store a file named {req.filename!r} in the inbox ({e.strerror}): "
                                "use a shorter plain name", param="filename") from None
        return {"id": job.id, "object": "job", "state": job.state, "name": job.name, "error": job.error}

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: int) -> dict[str, Any]:
        # ids are SQLite integers (64-bit): a larger one names no job
        j = daemon.queue.get(job_id) if 0 < job_id < 2**63 else None
        if j is None:
            raise ApiError(404, f"no job {job_id}", code="not_found")
        return {"object": "job", **j.as_dict()}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return daemon.status()

    return app
