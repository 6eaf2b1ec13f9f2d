"""What an API request must pass before any route sees it: the bearer token
(or, with no token set, a loopback Host), and a bounded body.

Pure ASGI, so a streamed answer goes through untouched. Refusals use OpenAI's
error shape, as every answer of the API does.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from typing import Any

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# host, or [v6 address], then an optional port
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:]+))(?::\d*)?")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def body_too_large(max_bytes: int) -> JSONResponse:
    return error_response(413, f"request body over {max_bytes:,} bytes (api.max_request_bytes): send less, "
                               "or raise the limit", code="request_too_large")


def loopback_host(host: str) -> bool:
    """Whether a bind address or a Host header names this machine's loopback
    interface: localhost, 127.0.0.0/8 or ::1 ([::1] in a header), with or without a port."""
    host = host.strip()
    try:
        return ipaddress.ip_address(host).is_loopback  # a bare address, as a bind address is written
    except ValueError:
        pass
    m = _HOST.fullmatch(host)
    if m is None:
        return False
    name = (m["v6"] or m["name"]).lower().removesuffix(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard:
    """With `token` set, every request must carry `Authorization: Bearer <token>`
    (any host name then: the token is the protection). Without one, the server
    is open to whatever can reach it, which a loopback bind limits to this
    machine; a web page could still reach it through DNS rebinding (its own
    host name resolving to 127.0.0.1), so only loopback names are answered.

    A body is bounded as it is read, so a chunked one (no Content-Length) is
    bounded too; a Content-Length over the limit is refused before reading."""

    def __init__(self, app: ASGIApp, *, token: str, max_request_bytes: int):
        # Inside this guard: starlette's limiter answers an over-long Content-Length
        # in plain text, which never gets that far; a body that grows past the
        # limit as it is read raises a 413 HTTPException, answered by the app's handler.
        self.app = RequestBodyLimitMiddleware(app, max_body_size=max_request_bytes)
        self.token = token.encode("utf-8")
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(Headers(scope=scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers) -> JSONResponse | None:
        if self.token:
            scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
            # headers arrive decoded as latin-1: back to their bytes, compared in constant time
            if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.encode("latin-1"), self.token):
                return error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <api.token>'",
                                      "authentication_error", code="invalid_api_key")
        else:
            host = headers.get("host")
            # no Host at all is an HTTP/1.0 client, never a browser (the rebinding threat)
            if host is not None and not loopback_host(host):
                return error_response(403, f"Host {host!r} is not a loopback name: without api.token this server "
                                           "answers only localhost, 127.0.0.1 or [::1]; use one of those, or set "
                                           "api.token", code="host_not_allowed")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return body_too_large(self.max_request_bytes)
        return None
