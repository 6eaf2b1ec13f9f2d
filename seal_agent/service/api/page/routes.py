"""The page's routes: HTML rendered from the state database, the chart, the
login form. What the page changes (uploads, questions, pauses, checks) it asks
of the API's own routes from its script, so the page can do nothing the API
does not; the guard (../guard.py) holds both to the same token rules.

    GET  /                  documents, what the daemon is doing now, ask, upload
    GET  /documents/{id}    a document: passages, modules, self-edits, QAs before/after
    GET  /memory            memory health: checks by age, consolidations, ReSTEM rounds
    GET  /page/charts/memory.svg
    GET  /login, POST /login, POST /logout
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ...serving import NotServed, ServingBackend
from ..guard import COOKIE, login_value
from . import views
from .charts import memory_svg

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                   trim_blocks=True, lstrip_blocks=True)


def _safe_next(target: str | None) -> str:
    """Where the login form goes after: a path of this server, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def add_page(app: FastAPI, backend: ServingBackend, csrf: str) -> None:
    cfg = backend.api
    app.mount("/page/static", StaticFiles(directory=HERE / "static"), name="page-static")

    def render(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.update(csrf=csrf, model_name=cfg.model_name, version=backend.served.current()[1],
                       login=bool(cfg.token), learning=backend.database is not None)
        return HTMLResponse(_env.get_template(name).render(**context), status_code=status_code,
                            headers={"Cache-Control": "no-store"})

    def status() -> dict[str, Any] | None:
        try:
            return backend.status()
        except NotServed:  # a server that only serves a model: the page asks, nothing more
            return None

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        st = status()
        if backend.database is None or st is None:
            return render("index.html", status=None, documents=[], queued=[])
        with views.connect(backend.database) as conn:
            docs = views.documents(conn, st.get("progress"))
            queued = views.queued(conn)
        return render("index.html", status=st, documents=docs, queued=queued)

    @app.get("/documents/{doc_id}", response_class=HTMLResponse)
    def document(doc_id: int) -> HTMLResponse:
        doc = None
        if backend.database is not None and 0 < doc_id < 2**63:
            with views.connect(backend.database) as conn:
                doc = views.document(conn, doc_id)
        if doc is None:
            return render("missing.html", status_code=404, what=f"document {doc_id}")
        return render("document.html", doc=doc)

    @app.get("/memory", response_class=HTMLResponse)
    def memory() -> HTMLResponse:
        if backend.database is None:
            return render("missing.html", status_code=404, what="a learning state (this server only serves)")
        with views.connect(backend.database) as conn:
            health = views.memory(conn)
        return render("memory.html", memory=health)

    @app.get("/page/charts/memory.svg")
    def memory_chart() -> Response:
        rows: list[dict[str, Any]] = []
        if backend.database is not None:
            with views.connect(backend.database) as conn:
                rows = views.checks(conn)
        return Response(memory_svg(views.by_age(rows), rows), media_type="image/svg+xml",
                        headers={"Cache-Control": "no-store"})

    @app.get("/login", response_class=HTMLResponse)
    def login_form(next: str = "/") -> Response:
        if not cfg.token:
            return RedirectResponse(_safe_next(next), status_code=303)
        return render("login.html", next=_safe_next(next), error=None, on_login=True)

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token, target = form.get("token", [""])[0], _safe_next(form.get("next", ["/"])[0])
        if not cfg.token:
            return RedirectResponse(target, status_code=303)
        if not hmac.compare_digest(token.encode("utf-8"), cfg.token.encode("utf-8")):
            log.warning("page login refused from %s", request.client.host if request.client else "?")
            return render("login.html", status_code=401, next=target, error="That is not the token (api.token).",
                          on_login=True)
        answer = RedirectResponse(target, status_code=303)
        answer.set_cookie(COOKIE, login_value(cfg.token), httponly=True, samesite="strict", path="/",
                          secure=request.url.scheme == "https")
        return answer

    @app.post("/logout")
    def logout() -> Response:
        answer = RedirectResponse("/login" if cfg.token else "/", status_code=303)
        answer.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return answer
