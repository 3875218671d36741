"""The adapter store's HTTP API (FastAPI; OpenAPI at ``/docs``). Thin: auth, limits, HTTP mapping.

``guard.RequestGuard`` authenticates, rate-limits and caps every body before a route runs; the routes
check what the principal may do, before they read the body.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .. import __version__
from .aggregate import AggregationPolicy
from .auth import Principal, check_device_id, check_fingerprint, may_read_device, require_admin, require_device
from .backends import StoreLocation, open_store
from .guard import RequestGuard
from .limits import StoreLimits
from .pages import add_pages
from .service import AdapterStore
from .storage import AggregateRecord, StoreError, VersionRecord
from .wire import MAX_COUNT, PUSH_MEDIA_TYPE, decode_push

ADAPTER_MEDIA_TYPE = "application/octet-stream"
SERVE_ENV = "EDGE_PEFT_SERVE_CONFIG"  # JSON: the store location and limits, for worker processes
_bearer = HTTPBearer(auto_error=False, description="`<device-id>.<secret>` or `admin.<secret>`")
POLICY_SCHEMA = {"type": "object", "properties": {
    "min_devices": {"type": "integer", "minimum": 1, "default": 3},
    "weighting": {"enum": ["equal", "samples"], "default": "equal"},
    "sample_cap": {"type": ["integer", "null"], "minimum": 1},
    "clip_norm": {"oneOf": [{"enum": ["auto", "off"]}, {"type": "number", "exclusiveMinimum": 0}], "default": "auto"},
    "method": {"enum": ["mean", "median", "trimmed-mean"], "default": "mean"},
    "trim": {"type": "number", "minimum": 0, "maximum": 0.5, "default": 0.1}}}


class NewDevice(BaseModel):
    id: str


def app_from_environment() -> FastAPI:
    """The app a ``serve --processes N`` worker runs: the store and limits its parent put in the environment."""
    config = json.loads(os.environ[SERVE_ENV])
    limits = StoreLimits(**config["limits"])
    store, admin_token = open_store(StoreLocation.from_json(config["location"]), limits)
    announce_admin_token(admin_token)
    return create_app(store, limits)


def announce_admin_token(admin_token: str | None) -> None:
    """Print a newly created admin token to stderr, once; only its hash is stored."""
    if admin_token:
        print(f"edge-peft store: admin token (shown once, keep it secret): {admin_token}", file=sys.stderr, flush=True)


def create_app(store: AdapterStore, limits: StoreLimits = StoreLimits()) -> FastAPI:
    """The store app over an open store (``backends.open_store``)."""
    app = FastAPI(title="edge-peft adapter store", version=__version__,
                  description="Push, pull and federated-average LoRA-FA adapters in PEFT format.")
    app.state.store = store
    app.add_middleware(RequestGuard, store=store, limits=limits)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"detail": f"malformed request ({problems[:300]}): see /docs"}, status_code=422)

    def principal(request: Request, _: Any = Depends(_bearer)) -> Principal:
        return request.state.principal  # set by RequestGuard, before any route runs

    def admin(who: Principal = Depends(principal)) -> Principal:
        require_admin(who)
        return who

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    # --- devices (admin) -------------------------------------------------------------------------

    @app.post("/v1/devices", status_code=201, dependencies=[Depends(admin)])
    def add_device(body: NewDevice) -> dict[str, str]:
        """Register a device (admin). The token is returned once; the store keeps only its hash."""
        return {"id": body.id, "token": store.add_device(body.id)}

    @app.delete("/v1/devices/{device}", dependencies=[Depends(admin)])
    def remove_device(device: str) -> dict[str, Any]:
        """Remove a device, its token and its versions (admin); global versions already made stay."""
        return {"id": device, **asdict(store.remove_device(device))}

    @app.post("/v1/devices/{device}/token", status_code=201, dependencies=[Depends(admin)])
    def rotate_token(device: str) -> dict[str, str]:
        """A new token for the device (admin); the old one stops working at once."""
        return {"id": device, "token": store.rotate_token(device)}

    @app.delete("/v1/devices/{device}/token", dependencies=[Depends(admin)])
    def revoke_token(device: str) -> dict[str, str]:
        """Revoke the device's token (admin): nothing it sends is accepted until its token is rotated."""
        store.revoke_token(device)
        return {"id": device, "token": "revoked"}

    # --- bases -----------------------------------------------------------------------------------

    @app.post("/v1/bases", dependencies=[Depends(admin)], openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"spec": {"type": "object", "description": "the manifest's adapter section"}}}}}}})
    async def add_base(request: Request) -> JSONResponse:
        """Register a base model with its artifact's adapter spec (admin); pushes must carry exactly this spec."""
        body = await json_body(request)
        if not isinstance(body, dict) or set(body) != {"spec"}:
            raise StoreError(400, 'the body must be {"spec": <the manifest\'s adapter section>}: use `store add-base`')
        record, created = await run_in_threadpool(store.add_base, body["spec"])
        return JSONResponse({"fingerprint": record.fingerprint, "created": created}, status_code=201 if created else 200)

    @app.get("/v1/bases/{base}", dependencies=[Depends(principal)])
    def get_base(base: str) -> dict[str, Any]:
        """The adapter spec registered for a base model fingerprint (any valid token)."""
        return {"fingerprint": base, "spec": store.spec(base).to_dict()}

    @app.delete("/v1/bases/{base}", dependencies=[Depends(admin)])
    def remove_base(base: str) -> dict[str, Any]:
        """Remove a base with all its device and global versions (admin)."""
        return {"fingerprint": base, **asdict(store.remove_base(base))}

    # --- push and pull ---------------------------------------------------------------------------

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
        meta, data = decode_push(await request.body())
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
        return adapter_response(store, request, record, {"kind": "device", "device": device, "version": record.number})

    @app.get("/v1/bases/{base}/global/{version}", dependencies=[Depends(principal)],
             responses={200: {"content": {ADAPTER_MEDIA_TYPE: {}}}, 304: {"description": "ETag matches"}})
    def pull_global(base: str, version: str, request: Request) -> Response:
        """A global (federated-average) adapter as a full PEFT safetensors file (any valid token)."""
        record = store.global_version(base, parse_version(version))
        return adapter_response(store, request, record, {"kind": "global", "version": record.number})

    @app.post("/v1/bases/{base}/aggregates", dependencies=[Depends(admin)], openapi_extra={"requestBody": {
        "required": False, "content": {"application/json": {"schema": POLICY_SCHEMA}}}})
    async def aggregate(base: str, request: Request) -> JSONResponse:
        """Average the latest version of each device into a new global version (admin); the optional body is
        the aggregation policy (robust defaults)."""
        policy = AggregationPolicy.from_dict(await json_body(request))
        record, created, report = await run_in_threadpool(store.aggregate, base, policy)
        return JSONResponse({**asdict(record), "created": created, "report": report},
                            status_code=201 if created else 200)

    @app.post("/v1/bases/{base}/global", dependencies=[Depends(admin)], openapi_extra={"requestBody": {
        "required": True,
        "description": "A push body (JSON metadata line, then the adapter_model.safetensors bytes) of a global "
                       "adapter averaged elsewhere, e.g. by a Flower server.",
        "content": {PUSH_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}})
    async def add_global(base: str, request: Request) -> JSONResponse:
        """Store a global version made outside the store (admin): devices pull it as any global version."""
        meta, data = decode_push(await request.body())
        record, created = await run_in_threadpool(store.add_global, base, meta, data)
        return JSONResponse({**asdict(record), "created": created}, status_code=201 if created else 200)

    add_pages(app, store)
    return app


async def json_body(request: Request) -> Any:
    """The request's JSON body (None when empty); StoreError(400) when it is not JSON or nested too deeply."""
    body = await request.body()
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except RecursionError:
        raise StoreError(400, "the JSON body is nested too deeply: see /docs") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(400, f"the body is not valid JSON ({exc}): see /docs") from None


def parse_version(version: str) -> int | None:
    if version == "latest":
        return None
    if not (version.isascii() and version.isdigit() and len(version) <= 16) or not 1 <= int(version) <= MAX_COUNT:
        raise StoreError(400, f"version {version[:20]!r} is not a number from 1 to {MAX_COUNT} or 'latest'")
    return int(version)


def adapter_response(store: AdapterStore, request: Request, record: VersionRecord | AggregateRecord,
                     source: dict[str, Any]) -> Response:
    """The version's full adapter file (``AdapterStore.adapter_file``) with its sha256 as a strong ETag; 304,
    without reading it, when If-None-Match has the recorded sha256."""
    headers = {"X-Edge-Peft-Kind": source["kind"], "X-Edge-Peft-Version": str(source["version"]),
               "Cache-Control": "no-cache"}
    if "device" in source:
        headers["X-Edge-Peft-Device"] = source["device"]
    if etag_matches(request.headers.get("if-none-match"), f'"{record.full_sha256}"'):
        return Response(status_code=304, headers={**headers, **_digest_headers(record.full_sha256)})
    data, sha256 = store.adapter_file(record)
    return Response(data, media_type=ADAPTER_MEDIA_TYPE, headers={**headers, **_digest_headers(sha256)})


def _digest_headers(sha256: str) -> dict[str, str]:
    return {"ETag": f'"{sha256}"', "X-Edge-Peft-Sha256": sha256}


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {c.strip().removeprefix("W/") for c in if_none_match.split(",")}
    return "*" in candidates or etag in candidates
