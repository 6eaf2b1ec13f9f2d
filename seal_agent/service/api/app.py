"""The query API's routes: OpenAI-compatible endpoints served by the live model, plus documents, jobs, status.

    GET  /healthz                 liveness and the served version
    GET  /v1/models               the one model, named `api.model_name`
    POST /v1/chat/completions     messages -> answer (stream: server-sent events)
    POST /v1/completions          prompt -> completion (stream too)
    POST /v1/documents            {"filename", "content" | "content_base64"} -> a learning job
    POST /v1/documents/{id}/check a replay check of one document's QAs -> a job
    GET  /v1/jobs/{id}            a job's state and result
    GET  /v1/status               what `seal-agent status --json` prints
    GET  /v1/schedules            the schedules, their next runs, paused or not
    POST /v1/schedules/{name}     {"paused": true | false} -> the schedule
    GET  /, /documents/{id}, /memory, /login: the page (page/routes.py)

The app is built over a `ServingBackend` (serving.py), never the daemon; each
route only translates HTTP to a call of the backend or of `Completions`.
Every answer is JSON (or server-sent events of JSON); errors use OpenAI's
shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import errno
import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from ...config import ApiConfig
from ...errors import SealError
from ..serving import NotFound, NotServed, ServingBackend, Unservable
from .completions import Completions
from .guard import Guard, body_too_large, csrf_token, error_response
from .page.routes import add_page
from .protocol import ApiError, ChatRequest, CompletionRequest, DocumentRequest, PauseRequest, invalid

log = logging.getLogger(__name__)


def _answer_errors(app: FastAPI, cfg: ApiConfig) -> None:
    """Every failure answered in OpenAI's error shape, the unexpected ones as a 500."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(Unservable)
    async def _unservable(_request: Request, e: Unservable) -> JSONResponse:
        return error_response(400, str(e), param=e.param)

    @app.exception_handler(NotFound)
    async def _not_found(_request: Request, e: NotFound) -> JSONResponse:
        return error_response(404, str(e), code="not_found")

    @app.exception_handler(NotServed)
    async def _not_served(_request: Request, e: NotServed) -> JSONResponse:
        return error_response(501, str(e), code="not_implemented")

    @app.exception_handler(SealError)
    async def _seal_error(_request: Request, e: SealError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, e: RequestValidationError) -> JSONResponse:
        return await _api_error(_request, invalid(list(e.errors())))

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


def build_app(backend: ServingBackend) -> FastAPI:
    cfg = backend.api
    # the page's anti-forgery token: from the API token (the same across restarts), else this server's own secret
    csrf = csrf_token(cfg.token.encode("utf-8") if cfg.token else secrets.token_bytes(32))
    app = FastAPI(title="seal-agent", docs_url=None, redoc_url=None, openapi_url=None,
                  middleware=[Middleware(Guard, token=cfg.token, max_request_bytes=cfg.max_request_bytes,
                                         csrf=csrf)])
    _answer_errors(app, cfg)
    served = backend.served
    completions = Completions(served, cfg)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:  # on the event loop: alive even with every worker thread busy
        return {"status": "ok", "version": served.current()[1]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(backend.started),
                                            "owned_by": "seal-agent", "version": served.current()[1]}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        return completions.chat(req)

    @app.post("/v1/completions")
    def complete(req: CompletionRequest):
        return completions.text(req)

    @app.post("/v1/documents", status_code=202)
    def documents(req: DocumentRequest) -> dict[str, Any]:
        data = req.data()
        try:
            job = backend.submit(req.filename, data)
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
        j = backend.job(job_id) if 0 < job_id < 2**63 else None
        if j is None:
            raise ApiError(404, f"no job {job_id}", code="not_found")
        return {"object": "job", **j.as_dict()}

    @app.post("/v1/documents/{doc_id}/check", status_code=202)
    def check(doc_id: int) -> dict[str, Any]:
        if not 0 < doc_id < 2**63:
            raise ApiError(404, f"no document {doc_id}", code="not_found")
        j = backend.check(doc_id)
        return {"id": j.id, "object": "job", "state": j.state, "name": j.name, "error": j.error}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return backend.status()

    @app.get("/v1/schedules")
    def schedules() -> dict[str, Any]:
        return {"object": "list", "data": backend.status()["schedules"]}

    @app.post("/v1/schedules/{name}")
    def pause(name: str, req: PauseRequest) -> dict[str, Any]:
        return {"object": "schedule", **backend.set_paused(name, req.paused)}

    add_page(app, backend, csrf)
    return app
