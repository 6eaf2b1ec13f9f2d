"""What goes over the wire: the request bodies (pydantic models, refusing what
this server does not implement), the answers' OpenAI shapes (chat.completion,
text_completion, their stream chunks), and `ApiError`, an error said in
OpenAI's shape with its HTTP status.

A parameter this server does not implement is refused, never silently
ignored, unless it asks for nothing (its default) or changes nothing in what
is generated (`user`, ...).
"""

from __future__ import annotations

import base64
import json
import reprlib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

MAX_CHOICES = 8  # the largest n: that many completions are written as one batch


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


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


def refuse_unsupported(extra: dict[str, Any] | None, where: str = "") -> None:
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
    model_config = ConfigDict(extra="allow")  # checked by refuse_unsupported
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # developer is OpenAI's newer name for the system message
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampled(BaseModel):
    """What chat and text completions share: the model asked for and how to sample."""
    model_config = ConfigDict(extra="allow")  # checked by refuse_unsupported
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


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampled):
    prompt: Text | list[Text]


class DocumentRequest(BaseModel):
    filename: Text = Field(min_length=1, max_length=255)
    content: Text | None = None
    content_base64: Text | None = None

    def data(self) -> bytes:
        """The document's bytes: the text as UTF-8, or the base64 decoded."""
        if (self.content is None) == (self.content_base64 is None):
            raise ApiError(400, "give exactly one of content (text) or content_base64 (bytes)", param="content")
        if self.content is not None:
            return self.content.encode("utf-8")
        try:
            return base64.b64decode(self.content_base64 or "", validate=True)
        except ValueError:
            raise ApiError(400, "content_base64 is not valid base64", param="content_base64") from None


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paused: StrictBool


# Field names, to tell them from the union members pydantic also puts in an error's location.
_FIELDS = {name for m in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions, DocumentRequest,
                                   PauseRequest)
           for name in m.model_fields} | {"job_id"}


def invalid(errors: list[dict[str, Any]]) -> ApiError:
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


# -- answers -------------------------------------------------------------

class Chat:
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


class TextCompletion:
    """Answers as text_completion objects."""
    id_prefix, object, chunk_object, prompt_param = "cmpl", "text_completion", "text_completion", "prompt"
    opening = ()

    @staticmethod
    def choice(index: int, text: str, finish: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def delta(text: str, finish: str | None = None) -> dict[str, Any]:
        return TextCompletion.choice(0, text, finish)


Shape = type[Chat | TextCompletion]


def usage(n_prompt: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
