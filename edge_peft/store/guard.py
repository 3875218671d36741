"""Limits before work: an ASGI layer that runs before any route reads a byte of the body.

For every route but the public ones (health, OpenAPI) it authenticates the bearer token, spends one request
of the principal's rate budget and checks the declared Content-Length against the route's cap; then it
counts the bytes actually received, so a chunked body cannot pass the cap either. A refusal is answered
at once without reading the body, so an unauthenticated 1 GiB upload costs the server no memory.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .limits import PUSH_PATH, RateLimiter, StoreLimits
from .service import AdapterStore
from .storage import StoreError

PUBLIC_PATHS = {"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                "/", "/login", "/logout"}  # the pages (pages.py) check the admin token or session themselves
MAX_LENGTH_DIGITS = 18


class RequestGuard:
    """Authenticate, rate-limit and cap the body of every non-public request before the app sees it."""

    def __init__(self, app: Callable[..., Awaitable[None]], store: AdapterStore, limits: StoreLimits) -> None:
        self.app = app
        self.store = store
        self.limits = limits
        self.rate = RateLimiter(limits.rate_per_minute)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.limits.body_limit(scope["method"], scope["path"])
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if scope["path"] not in PUBLIC_PATHS:
                principal = await run_in_threadpool(self.store.authenticate, bearer(headers.get("authorization")))
                if principal.kind == "device":
                    self.rate.take(principal.id)
                scope.setdefault("state", {})["principal"] = principal
            _check_length(headers.get("content-length"), cap, scope["method"], scope["path"])
        except StoreError as exc:
            return await send_error(send, exc)
        received = 0

        async def capped_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise HTTPException(413, _over(cap, scope["method"], scope["path"]))
            return message

        await self.app(scope, capped_receive, send)


def bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _check_length(declared: str | None, cap: int, method: str, path: str) -> None:
    if declared is None:
        return
    if not declared.isascii() or not declared.isdigit() or len(declared) > MAX_LENGTH_DIGITS:
        raise StoreError(400, f"Content-Length {declared[:24]!r} is not a byte count")
    if int(declared) > cap:
        raise StoreError(413, _over(cap, method, path, int(declared)))


def _over(cap: int, method: str, path: str, declared: int | None = None) -> str:
    size = f"body of {declared} bytes" if declared is not None else "body"
    fix = "the admin can raise `serve --max-body-mb`" if method == "POST" and PUSH_PATH.fullmatch(path) \
        else "send what the API documents (/docs)"
    return f"{size} is over this store's limit of {cap} bytes for {method} {path[:80]}: {fix}"


async def send_error(send: Callable, exc: StoreError) -> None:
    """Answer ``exc`` as JSON ``{"detail": ...}`` and close the connection (the body was not read)."""
    body = json.dumps({"detail": str(exc)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
