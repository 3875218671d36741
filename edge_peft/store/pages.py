"""The store's HTML pages: ``GET /`` (the fleet view, for the admin) and a login form that sets a session cookie.

The admin authenticates with ``Authorization: Bearer admin.…`` or by posting the token to ``/login``, which
sets an HttpOnly, SameSite=Strict cookie holding an expiry and its HMAC keyed by the stored admin token hash:
no token ever travels in a URL, the cookie works on every store process, and resetting the admin token ends
every session. Pages are rendered server-side with Jinja2 (autoescaped) under a CSP that allows no script.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from .. import __version__
from .auth import ADMIN, authenticate, require_admin
from .fleet import fleet_view, pushes_chart
from .guard import bearer
from .service import AdapterStore
from .storage import StoreError

SESSION_COOKIE = "edge_peft_session"
SESSION_SECONDS = 8 * 3600
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                           "frame-ancestors 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
_templates = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=select_autoescape(default=True))


def session_cookie(admin_hash: str, expires: int) -> str:
    """``<expires>.<hmac>``: valid until ``expires`` (unix seconds) while the admin token stays the same."""
    mac = hmac.new(admin_hash.encode(), f"fleet-page|{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def session_valid(admin_hash: str | None, value: str | None) -> bool:
    expires, _, _ = (value or "").partition(".")
    if not admin_hash or not expires.isdigit() or int(expires) < time.time():
        return False
    return hmac.compare_digest(session_cookie(admin_hash, int(expires)), value or "")


def add_pages(app: FastAPI, store: AdapterStore) -> None:
    """Register ``/``, ``/login``, ``/logout`` and ``/v1/fleet`` on ``app``."""

    def is_admin(request: Request) -> bool:
        token = bearer(request.headers.get("authorization"))
        if token:
            return authenticate(store.metadata, token).kind == ADMIN
        return session_valid(store.metadata.admin_token_hash(), request.cookies.get(SESSION_COOKIE))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def fleet_page(request: Request) -> Response:
        """The fleet view (admin); anyone else is sent to the login form."""
        if not is_admin(request):
            return RedirectResponse("/login", status_code=303, headers=PAGE_HEADERS)
        view = fleet_view(store)
        html = _templates.get_template("fleet.html").render(view=view, chart=pushes_chart(view["pushes"]),
                                                            version=__version__)
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @app.get("/v1/fleet")
    def fleet_json(request: Request) -> dict:
        """What the fleet page shows, as JSON (admin token)."""
        require_admin(request.state.principal)  # set by RequestGuard
        return fleet_view(store)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form() -> HTMLResponse:
        return HTMLResponse(_templates.get_template("login.html").render(error=None), headers=PAGE_HEADERS)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """Check the posted admin token; on success set the session cookie and go to the fleet page."""
        token = (parse_qs((await request.body()).decode("utf-8", "replace")).get("token") or [""])[0].strip()
        try:
            ok = bool(token) and (await run_in_threadpool(authenticate, store.metadata, token)).kind == ADMIN
        except StoreError:
            ok = False
        if not ok:
            html = _templates.get_template("login.html").render(error="That is not this store's admin token.")
            return HTMLResponse(html, status_code=401, headers=PAGE_HEADERS)
        response = RedirectResponse("/", status_code=303, headers=PAGE_HEADERS)
        value = session_cookie(store.metadata.admin_token_hash() or "", int(time.time()) + SESSION_SECONDS)
        response.set_cookie(SESSION_COOKIE, value, max_age=SESSION_SECONDS, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303, headers=PAGE_HEADERS)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
        return response
