"""The adapter store's HTTP API (FastAPI; OpenAPI at ``/docs``). Thin: auth, limits, HTTP mapping."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .. import __version__
from .auth import Principal, check_device_id, check_fingerprint, may_read_device, require_admin, require_device
from .service import DEFAULT_MAX_BODY_BYTES, AdapterStore
from .storage import StoreError
from .wire import PUSH_MEDIA_TYPE, decode_push

ADAPTER_MEDIA_TYPE = "application/octet-stream"
_bearer = HTTPBearer(auto_error=False, description="`<device-id>.<secret>` or `admin.<secret>`")


class NewDevice(BaseModel):
    id: str


def create_app(data_dir: str | os.PathLike, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The store app over ``data_dir`` (created and migrated if needed).

    On first start it prints the admin token to stderr, once; only its hash is stored.
    """
    store, admin_token = AdapterStore.open(data_dir, max_body_bytes)
    if admin_token:
        print(f"edge-peft store: admin token (shown once, keep it secret): {admin_token}", file=sys.stderr, flush=True)

    app = FastAPI(title="edge-peft adapter store", version=__version__,
                  description="Push, pull and federated-average LoRA-FA adapters in PEFT format.")
    app.state.store = store

    @app.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    async def principal(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
        return await run_in_threadpool(store.authenticate, credentials.credentials if credentials else None)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.post("/v1/devices", status_code=201)
    def add_device(body: NewDevice, who: Principal = Depends(principal)) -> dict[str, str]:
        """Register a device (admin). The token is returned once; the store keeps only its hash."""
        require_admin(who)
        return {"id": body.id, "token": store.add_device(body.id)}

    @app.get("/v1/bases/{base}", dependencies=[Depends(principal)])
    def get_base(base: str) -> dict[str, Any]:
        """The adapter spec registered for a base model fingerprint (any valid token)."""
        return {"fingerprint": base, "spec": store.spec(base).to_dict()}

    @app.post("/v1/bases/{base}/devices/{device}/versions", openapi_extra={"requestBody": {
        "required": True,
        "description": "One line of JSON metadata {spec, samples, steps, metrics, parent, sha256}, '\\n', "
                       "then the adapter_model.safetensors bytes (full, or B only for LoRA-FA).",
        "content": {PUSH_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}})
    async def push(base: str, device: str, request: Request, who: Principal = Depends(principal)) -> JSONResponse:
        """Push a device's adapter (that device's token). Same bytes again: 200 with the existing version."""
        check_fingerprint(base)
        check_device_id(device)
        require_device(who, device)
        body = await read_limited_body(request, store.max_body_bytes)
        meta, data = decode_push(body)
        record, created = await run_in_threadpool(store.push, base, device, meta, data)
        return JSONResponse({**asdict(record), "created": created}, status_code=201 if created else 200)

    @app.get("/v1/bases/{base}/devices/{device}/versions/{version}",
             responses={200: {"content": {ADAPTER_MEDIA_TYPE: {}}}, 304: {"description": "ETag matches"}})
    def pull_device(base: str, device: str, version: str, request: Request,
                    who: Principal = Depends(principal)) -> Response:
        """A device's adapter as a full PEFT safetensors file; ``version`` is a number or ``latest``."""
        check_device_id(device)
        may_read_device(who, device)
        record = store.device_version(base, device, parse_version(version))
        return adapter_response(store, request, record.full_sha256,
                                {"kind": "device", "device": device, "version": record.number})

    @app.get("/v1/bases/{base}/global/{version}", dependencies=[Depends(principal)],
             responses={200: {"content": {ADAPTER_MEDIA_TYPE: {}}}, 304: {"description": "ETag matches"}})
    def pull_global(base: str, version: str, request: Request) -> Response:
        """A global (federated-average) adapter as a full PEFT safetensors file (any valid token)."""
        record = store.global_version(base, parse_version(version))
        return adapter_response(store, request, record.full_sha256, {"kind": "global", "version": record.number})

    @app.post("/v1/bases/{base}/aggregates")
    def aggregate(base: str, who: Principal = Depends(principal)) -> JSONResponse:
        """Federated-average the latest version of each device into a new global version (admin)."""
        require_admin(who)
        record, created = store.aggregate(base)
        return JSONResponse({**asdict(record), "created": created}, status_code=201 if created else 200)

    return app


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one over ``limit`` by Content-Length or by bytes actually received."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise StoreError(413, f"body of {declared} bytes is over this store's limit of {limit} bytes: "
                              "raise the server's --max-body-mb")
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise StoreError(413, f"body is over this store's limit of {limit} bytes: raise the server's --max-body-mb")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_version(version: str) -> int | None:
    if version == "latest":
        return None
    if not version.isdigit() or int(version) < 1:
        raise StoreError(400, f"version {version[:20]!r} is not a number >= 1 or 'latest'")
    return int(version)


def adapter_response(store: AdapterStore, request: Request, sha256: str, source: dict[str, Any]) -> Response:
    """The full adapter bytes with a strong ETag (their sha256); 304 when If-None-Match has it."""
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "X-Edge-Peft-Sha256": sha256, "X-Edge-Peft-Kind": source["kind"],
               "X-Edge-Peft-Version": str(source["version"]), "Cache-Control": "no-cache"}
    if "device" in source:
        headers["X-Edge-Peft-Device"] = source["device"]
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(store.blobs.get(sha256), media_type=ADAPTER_MEDIA_TYPE, headers=headers)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {c.strip().removeprefix("W/") for c in if_none_match.split(",")}
    return "*" in candidates or etag in candidates
