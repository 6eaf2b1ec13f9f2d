"""What a request must pass before any route sees it: the bearer token (or the
page's login cookie; with no token set, a loopback Host), no cross-site origin
on a request that changes anything, and a bounded body.

Pure ASGI, so a streamed answer goes through untouched. Refusals use OpenAI's
error shape, as every answer of the API does; a page asked for without the
token is sent to the login form instead.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from typing import Any
from urllib.parse import quote, urlparse

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "seal_login"  # the login form's cookie (`login_value`), HttpOnly, SameSite=Strict
CSRF_HEADER = "x-seal-csrf"  # what the page's scripts send with every request that changes something
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
OPEN_PATHS = ("/login", "/logout", "/page/static/")  # answered without the token: the form, its style sheet
PAGE_PATHS = ("/", "/documents/", "/memory")  # the page: without the token, the login form

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


def csrf_token(secret: bytes) -> str:
    """The page's anti-forgery token: derived from the API token (or the server's
    own random secret), so only a page this server rendered knows it."""
    return hmac.new(secret, b"seal-agent page", hashlib.sha256).hexdigest()


def login_value(token: str) -> str:
    """What the login cookie holds: derived from the token, so the browser keeps
    proof of it rather than the token itself (and a value any cookie can carry)."""
    return hmac.new(token.encode("utf-8"), b"seal-agent login", hashlib.sha256).hexdigest()


def cross_site(headers: Headers) -> str | None:
    """Why a browser's request comes from another site (None: it does not): its
    Sec-Fetch-Site, or an Origin other than the Host it was sent to. Clients that
    are not browsers (curl, the openai client) send neither, and are no such risk."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {site}"
    origin = headers.get("origin")
    if origin is not None:
        netloc = urlparse(origin).netloc
        if origin == "null" or not netloc or netloc.lower() != (headers.get("host") or "").lower():
            return f"Origin {origin!r} is not this server ({headers.get('host')!r})"
    return None


def is_page(path: str) -> bool:
    return path == "/" or path.startswith(PAGE_PATHS[1:])


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
    or the login form's cookie (any host name then: the token is the protection);
    a request with the cookie that changes something must also carry the page's
    `csrf` token in a header. Without one, the server
    is open to whatever can reach it, which a loopback bind limits to this
    machine; a web page could still reach it through DNS rebinding (its own
    host name resolving to 127.0.0.1), so only loopback names are answered.

    A body is bounded as it is read, so a chunked one (no Content-Length) is
    bounded too; a Content-Length over the limit is refused before reading."""

    def __init__(self, app: ASGIApp, *, token: str, max_request_bytes: int, csrf: str):
        # Inside this guard: starlette's limiter answers an over-long Content-Length
        # in plain text, which never gets that far; a body that grows past the
        # limit as it is read raises a 413 HTTPException, answered by the app's handler.
        self.app = RequestBodyLimitMiddleware(app, max_body_size=max_request_bytes)
        self.token = token.encode("utf-8")
        self.login = login_value(token).encode("ascii") if token else b""
        self.max_request_bytes = max_request_bytes
        self.csrf = csrf.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(Headers(scope=scope), scope["method"], scope["path"], scope.get("query_string"))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _same(self, given: str | None, expected: bytes) -> bool:
        # headers and cookies arrive decoded as latin-1: back to their bytes, compared in constant time
        return given is not None and hmac.compare_digest(given.encode("latin-1", "replace"), expected)

    def refusal(self, headers: Headers, method: str = "GET", path: str = "/",
                query: bytes | None = None) -> Response | None:
        unsafe = method not in SAFE_METHODS
        why = cross_site(headers) if unsafe else None
        if why is not None:  # a page of another site posting here with the user's browser
            return error_response(403, f"cross-site request refused ({why})", "permission_error",
                                  code="cross_site")
        if self.token and not path.startswith(OPEN_PATHS):
            scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
            if scheme.lower() == "bearer" and self._same(credentials, self.token):
                pass
            elif self._same(cookie_parser(headers.get("cookie", "")).get(COOKIE), self.login):
                # the login cookie: a change must also carry the page's token, which no other site can read
                if unsafe and not self._same(headers.get(CSRF_HEADER), self.csrf):
                    return error_response(403, f"a request with the login cookie must carry the page's "
                                               f"{CSRF_HEADER} header", "permission_error", code="csrf")
            elif method in ("GET", "HEAD") and is_page(path):
                target = path + (f"?{query.decode('latin-1')}" if query else "")
                return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            else:
                return error_response(401, "missing or wrong bearer token: send 'Authorization: Bearer <api.token>'",
                                      "authentication_error", code="invalid_api_key")
        elif not self.token:
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
