"""Chat and text completions: a request checked against the served model and
this server's limits, turned into a sampling, and answered as one JSON object
or as server-sent events (`Completions`, what the two routes hand requests to).

A stream that fails ends with an error event; one whose client leaves, or
whose server stops, is cancelled, so the model is never held by a generation
nobody reads.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ...config import ApiConfig
from ...model.generation import Sampling, TextStream
from ..serving import Served
from .guard import error_body
from .protocol import (
    ApiError,
    Chat,
    ChatRequest,
    CompletionRequest,
    Sampled,
    Shape,
    TextCompletion,
    refuse_unsupported,
    sse,
    usage,
)

log = logging.getLogger(__name__)


def sampling_for(req: Sampled, cfg: ApiConfig, n_prompt: int, context: int | None, prompt_param: str) -> Sampling:
    """The request's sampling within this server's limits and the model's context."""
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


def _events(shape: Shape, head: dict[str, Any], stream: TextStream, n_prompt: int,
            include_usage: bool) -> Iterator[str]:
    with_usage = {"usage": None} if include_usage else {}  # as OpenAI: null in every chunk but the last
    head = {**head, "object": shape.chunk_object}
    for choice in shape.opening:
        yield sse({**head, "choices": [choice], **with_usage})
    try:
        for piece in stream:
            yield sse({**head, "choices": [shape.delta(piece)], **with_usage})
    except Exception as e:
        log.exception("%s: the generation failed", head["id"])
        yield sse(error_body(f"the generation failed ({type(e).__name__}: {e}); the server log has the details",
                             "server_error"))
        return
    done = stream.completion
    yield sse({**head, "choices": [shape.delta("", done.finish_reason)], **with_usage})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(n_prompt, done.tokens)})
    yield "data: [DONE]\n\n"


class StreamedAnswer(StreamingResponse):
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


class Completions:
    """Completion requests, answered by `served` within the limits of `cfg`."""

    def __init__(self, served: Served, cfg: ApiConfig):
        self.served, self.cfg = served, cfg

    def chat(self, req: ChatRequest) -> dict[str, Any] | StreamedAnswer:
        self._check(req)
        for i, m in enumerate(req.messages):
            refuse_unsupported(m.model_extra, f"messages.{i}.")
        messages = [m.as_dict() for m in req.messages]
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"),
                    len(messages) - 1)

        def prompt(context: str) -> str:  # the routed passage, if any, goes before the question it was routed by
            if not context:
                return self.served.prompt_for(messages)
            with_context = [dict(m) for m in messages]
            with_context[last]["content"] = context + with_context[last]["content"]
            return self.served.prompt_for(with_context)

        return self._answer(Chat, req, prompt, messages[last]["content"])

    def text(self, req: CompletionRequest) -> dict[str, Any] | StreamedAnswer:
        self._check(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "this server completes one prompt per request", param="prompt")
        return self._answer(TextCompletion, req, lambda context: context + prompts[0], prompts[0])

    def _check(self, req: Sampled) -> None:
        name = self.cfg.model_name
        if req.model is not None and req.model != name:
            raise ApiError(404, f"The model '{req.model}' does not exist: this server serves '{name}'",
                           param="model", code="model_not_found")
        refuse_unsupported(req.model_extra)
        if req.stream and (req.n or 1) > 1:
            raise ApiError(400, "n > 1 is not supported with stream: leave out stream, or send n requests",
                           param="n")

    def _answer(self, shape: Shape, req: Sampled, prompt_with: Callable[[str], str],
                asked: str) -> dict[str, Any] | StreamedAnswer:
        """`asked`: the text the request is routed by (the last user message, or the prompt);
        `prompt_with(context)`: the prompt, with the routed passage (or "") put in."""
        served = self.served
        route = served.route(asked)
        prompt, n_prompt = served.prepare(prompt_with(served.passage_prefix(route)))
        sampling = sampling_for(req, self.cfg, n_prompt, served.context, shape.prompt_param)
        # seal_modules: the knowledge modules the answer was written with (an
        # extension OpenAI's clients keep as an extra field), so a user can see why.
        head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.cfg.model_name, "system_fingerprint": f"seal-v{served.current()[1]}",
                "seal_modules": served.used(route)}
        if req.stream:
            stream = served.stream(prompt, sampling, req.seed, route)
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamedAnswer(_events(shape, head, stream, n_prompt, include_usage), stream)
        done = served.complete(prompt, sampling, req.n or 1, req.seed, route)
        return {**head, "object": shape.object,
                "choices": [shape.choice(i, c.text, c.finish_reason) for i, c in enumerate(done)],
                "usage": usage(n_prompt, sum(c.tokens for c in done))}
