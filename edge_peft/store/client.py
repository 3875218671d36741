"""Device side of the store: build pushes from a run directory, an on-disk outbox, sync and pull.

Every push goes through ``<run>/outbox/`` first (one directory per adapter, written atomically) and
leaves it only after the store acknowledged it, so nothing is lost across crashes or offline spells;
re-sending is safe because the store deduplicates by sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from ..adapters.compressed import FP32
from ..adapters.peft_format import (check_tensors, decode_adapter, encode_adapter, full_adapter,
                                    peft_config)
from ..adapters.ranks import CHANNELS_KEY, keep_channels, nested_prefix, surviving_channels
from ..adapters.sparse import TOPK
from ..adapters.updates import check_encoding, encode_update, file_meta_for
from ..artifact.adapter_section import AdapterSpec
from ..artifact.files import (ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, OUTBOX, PULLED, RUN_INFO, SUMMARY, WARM_START,
                              WARM_START_WEIGHTS)
from ..artifact.manifest import load_manifest
from ..artifact.names import is_a
from ..checksums import record_adapter, verify_adapter
from ..errors import UserError
from ..fileio import atomic_directory, atomic_write_bytes, atomic_write_json, sha256_file
from .wire import PUSH_MEDIA_TYPE, encode_push, metrics_problem

ENTRY_META = "push.json"
REFUSED = "refused"  # <run>/refused/: pushes the store refused as invalid, each with refusal.json
REFUSAL_NAME = "refusal.json"
TRANSIENT_STATUSES = {429, 500, 502, 503, 504, 507}
INVALID_STATUSES = {400, 404, 409, 413, 422}  # the push itself is refused: sending it again cannot succeed
STALE_OUTBOX_TEMP_SECONDS = 600
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)  # closed under a reused connection


class StoreUnreachable(Exception):
    """The store could not be reached or answered with a transient error: retrying later may work."""


class StoreRefused(UserError):
    """The store answered with a refusal (4xx other than 429): ``status`` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StoreClient:
    """A thin httpx client for the store's HTTP API; refusals raise UserError, network trouble StoreUnreachable."""

    def __init__(self, url: str, token: str | None, timeout: float = 120.0, verify: bool | str = True) -> None:
        if not url:
            raise UserError("no store given: pass --store URL or set EDGE_PEFT_STORE")
        if not token:
            raise UserError("no token given: pass --token (or EDGE_PEFT_TOKEN / --admin-token) as printed when registered")
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10.0), verify=verify,
                                 headers={"Authorization": f"Bearer {token}"})

    def __enter__(self) -> "StoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, ok: tuple[int, ...] = (200, 201), repeatable: bool | None = None,
                **kwargs: Any) -> httpx.Response:
        """One request; a ``repeatable`` one (default: GET) is sent once more on a fresh connection when the pooled
        connection it went out on was closed by the server without an answer (its keep-alive ran out as the
        request left): sending it again cannot do anything twice."""
        repeatable = method == "GET" if repeatable is None else repeatable
        for attempt in (1, 2):
            try:
                response = self.http.request(method, path, **kwargs)
                break
            except STALE_CONNECTION as exc:
                if attempt == 1 and repeatable:
                    continue
                raise StoreUnreachable(f"cannot reach the store at {self.url} ({exc.__class__.__name__}: {exc})") from None
            except httpx.TransportError as exc:
                raise StoreUnreachable(f"cannot reach the store at {self.url} ({exc.__class__.__name__}: {exc})") from None
        if response.status_code in ok:
            return response
        detail = _detail(response)
        if response.status_code in TRANSIENT_STATUSES:
            raise StoreUnreachable(f"the store at {self.url} answered {response.status_code} ({detail})")
        raise StoreRefused(response.status_code, f"the store refused {method} {path} ({response.status_code}: {detail})")

    def push(self, base: str, device: str, meta: dict[str, Any], adapter: bytes) -> dict[str, Any]:
        body = encode_push(meta, adapter)
        return self.request("POST", f"/v1/bases/{base}/devices/{device}/versions", content=body, repeatable=True,
                            headers={"Content-Type": PUSH_MEDIA_TYPE}).json()  # the same tensors: the same version

    def push_global(self, base: str, meta: dict[str, Any], adapter: bytes) -> dict[str, Any]:
        """Store a global adapter averaged elsewhere as the base's next global version (admin token)."""
        return self.request("POST", f"/v1/bases/{base}/global", content=encode_push(meta, adapter), repeatable=True,
                            headers={"Content-Type": PUSH_MEDIA_TYPE}).json()

    def spec(self, base: str) -> AdapterSpec:
        raw = self.request("GET", f"/v1/bases/{base}").json().get("spec")
        try:
            return AdapterSpec.from_dict(raw)
        except (UserError, KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"the store at {self.url} answered an unreadable adapter spec for base {base[:19]}...: "
                            "ask its admin to register the base again (`edge-peft store add-base`)") from None

    def add_base(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/bases", json={"spec": spec}).json()

    def remove_base(self, base: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/bases/{base}").json()

    def remove_device(self, device: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/devices/{device}").json()

    def rotate_token(self, device: str) -> str:
        return self.request("POST", f"/v1/devices/{device}/token").json()["token"]

    def revoke_token(self, device: str) -> None:
        self.request("DELETE", f"/v1/devices/{device}/token")

    def pull(self, base: str, device: str | None, version: int | None, etag: str | None) -> httpx.Response:
        """GET an adapter (global when ``device`` is None, latest when ``version`` is None); 304 if ``etag`` holds."""
        which = "latest" if version is None else str(version)
        path = f"/v1/bases/{base}/global/{which}" if device is None else f"/v1/bases/{base}/devices/{device}/versions/{which}"
        headers = {"If-None-Match": f'"{etag}"'} if etag else {}
        return self.request("GET", path, ok=(200, 304), headers=headers)

    def add_device(self, device: str) -> str:
        return self.request("POST", "/v1/devices", json={"id": device}).json()["token"]

    def aggregate(self, base: str, policy: dict[str, Any] | None = None) -> dict[str, Any]:
        """A new global version; ``policy`` overrides the store's robust defaults (see ``AggregationPolicy``)."""
        return self.request("POST", f"/v1/bases/{base}/aggregates", json=policy or None).json()


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))[:500]
    except (ValueError, AttributeError):
        return response.text[:200] or response.reason_phrase


def device_of(token: str | None, device: str | None) -> str:
    """The device to push as: ``device`` if given, else the one the device token names."""
    if device:
        return device
    name, dot, _ = (token or "").partition(".")
    if not dot or name == "admin":
        raise UserError("pass a device token (--token / EDGE_PEFT_TOKEN) as printed by `edge-peft store add-device`")
    return name


# --- building a push from a run directory --------------------------------------------------------

def build_push(run_dir: str | os.PathLike, b_only: bool | None = None, rank: int | None = None,
               encoding: str = FP32, topk: float = 0.1) -> tuple[str, dict[str, Any], bytes]:
    """(base fingerprint, push metadata, adapter bytes) for ``<run>/adapter``.

    ``b_only`` (default: True for LoRA-FA) drops the A factors, which the store regenerates from their seeds,
    and sends only the channels that carry an update (an adaptive-rank run's survivors, compact).
    ``rank`` sends only a nested-rank run's rank-``rank`` adapter (its first ``rank`` channels, see
    ``ranks.nested_prefix``: a smaller upload). The store expands compact pushes to the full rank with zero columns.
    ``encoding`` ``int8`` sends the matrices as int8 with per-channel scales (4x smaller); ``int8-topk`` sends the
    ``topk`` fraction of each matrix's change since the global version the run's artifact was warm-started from.
    """
    run = Path(run_dir)
    spec = load_manifest(run).adapter
    weights = run / ADAPTER / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights} is missing: pass a run directory written by `edge-peft train`")
    verify_adapter(run / ADAPTER)
    data = weights.read_bytes()
    check_encoding(encoding, topk)
    summary = _read_summary(run / SUMMARY)
    if b_only is None:
        b_only = not spec.kind.trains_a
    if encoding == TOPK:
        if rank is not None:
            raise UserError("--rank and --encoding int8-topk do not combine (a delta is against the full-rank "
                            "global version): push the prefix with --encoding int8")
        data = _delta_payload(spec, data, str(weights), _reference(run, spec, summary.get("parent")), topk)
    elif b_only or rank is not None or encoding != FP32:
        data = _payload(spec, data, str(weights), rank, drop_a=b_only, encoding=encoding)
    metrics = {k: v for k, v in summary.items() if k not in ("samples", "steps", "parent")}
    if problem := metrics_problem(metrics):
        raise UserError(f"{run / SUMMARY} cannot be pushed: {problem}; a NaN or Inf loss means the run diverged: "
                        "retrain with a lower --lr")
    meta = {
        "spec": spec.to_dict(),
        "samples": summary["samples"],
        "steps": summary["steps"],
        "metrics": metrics,
        "parent": store_parent(summary.get("parent")),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return spec.base_fingerprint, meta, data


def _payload(spec: AdapterSpec, data: bytes, source: str, rank: int | None, drop_a: bool, encoding: str) -> bytes:
    """The adapter to upload: a nested-rank run's rank-``rank`` adapter, or (``rank`` None) the surviving
    ones, compact when fewer than all; without the seeded A when ``drop_a``; in ``encoding``."""
    if drop_a and spec.kind.trains_a:
        raise UserError(f"{source} is a {spec.variant!r} adapter whose A is trained: push it with --full")
    full, file_meta = full_adapter(spec, data, source)
    if rank is not None:
        full, channels, file_meta = nested_prefix(spec, full, file_meta, rank)
    else:
        channels = surviving_channels(spec, full)
    kept, meta, _ = keep_channels(spec, full, channels, file_meta)
    if drop_a:
        kept = {k: v for k, v in kept.items() if not is_a(k)}
    return encode_adapter(spec, encode_update(kept, encoding), extra_meta={**meta, **file_meta_for(encoding)})


def _delta_payload(spec: AdapterSpec, data: bytes, source: str, reference: dict[str, np.ndarray], topk: float) -> bytes:
    """The top-k int8 delta of every trained tensor (full rank, no seeded A) against ``reference``."""
    full, file_meta = full_adapter(spec, data, source)
    trained = {k: full[k] for k in spec.expected_shapes(with_frozen=False)}
    sent = encode_update(trained, TOPK, reference, topk)
    meta = {k: v for k, v in file_meta.items() if k != CHANNELS_KEY}
    return encode_adapter(spec, sent, extra_meta={**meta, **file_meta_for(TOPK, topk)})


def store_parent(parent: Any) -> dict[str, Any] | None:
    """A run's parent as a push names it: a store version (global, or a device's), else None (a local adapter)."""
    return parent if isinstance(parent, dict) and parent.get("kind") in ("global", "device") else None


def _reference(run: Path, spec: AdapterSpec, parent: Any) -> dict[str, np.ndarray]:
    """The global version a run trained from (its artifact's warm start), by PEFT key: what a delta is against."""
    if store_parent(parent) is None or parent["kind"] != "global":
        raise UserError(f"{run} did not train from a global version (its parent is {parent!r}), and a top-k delta "
                        "is against one: `edge-peft pull --global`, `edge-peft adapter load` it into the artifact "
                        "and train again, or push with --encoding int8")
    try:
        artifact = Path(json.loads((run / RUN_INFO).read_text())["artifact"])
        warm_start = json.loads((artifact / WARM_START).read_text())
        data = (artifact / WARM_START_WEIGHTS).read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"the global version {run} trained from is no longer in its artifact: push with "
                        "--encoding int8") from None
    if warm_start != parent:
        raise UserError(f"{artifact} was warm-started from another adapter since {run} trained: push with "
                        "--encoding int8")
    full, _ = full_adapter(spec, data, str(artifact / WARM_START_WEIGHTS))
    return {k: full[k] for k in spec.expected_shapes(with_frozen=False)}


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: pass a run directory written by `edge-peft train`") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupt ({exc}): re-run `edge-peft train`") from None
    if not isinstance(summary, dict) or any(type(summary.get(k)) is not int for k in ("samples", "steps")):
        raise UserError(f"{path} lacks integer samples/steps: re-run `edge-peft train`")
    return summary


# --- the outbox ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutboxEntry:
    """One queued push: ``<run>/outbox/<time>-<sha>/`` holding the adapter bytes and ``push.json``."""

    path: Path
    base: str
    meta: dict[str, Any]
    store: str | None

    def adapter(self) -> bytes:
        return (self.path / ADAPTER_WEIGHTS).read_bytes()


def enqueue(run_dir: str | os.PathLike, base: str, meta: dict[str, Any], adapter: bytes,
            store: str | None) -> tuple[OutboxEntry, bool]:
    """Queue a push durably; an adapter already queued is not queued twice (False)."""
    for entry in pending(run_dir):
        if entry.base == base and entry.meta["sha256"] == meta["sha256"]:
            return entry, False
    final = Path(run_dir) / OUTBOX / f"{time.time_ns():020d}-{meta['sha256'][:16]}"
    record = {"base": base, "meta": meta, "store": store, "queued": datetime.now(timezone.utc).isoformat()}
    with atomic_directory(final) as tmp:
        atomic_write_bytes(tmp / ADAPTER_WEIGHTS, adapter)
        atomic_write_json(tmp / ENTRY_META, record)
    return OutboxEntry(final, base, meta, store), True


def pending(run_dir: str | os.PathLike) -> list[OutboxEntry]:
    """Queued pushes, oldest first (temp and removed entries start with '.' and are skipped)."""
    outbox = Path(run_dir) / OUTBOX
    entries = []
    for path in sorted(outbox.iterdir()) if outbox.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            record = json.loads((path / ENTRY_META).read_text())
            entries.append(OutboxEntry(path, record["base"], record["meta"], record.get("store")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"outbox entry {path} is unreadable ({exc}): move it out of {outbox} and sync again") from None
    return entries


def _remove(entry: OutboxEntry) -> None:
    """Drop an acknowledged entry: one rename makes it invisible, then delete it."""
    gone = entry.path.with_name(f".{entry.path.name}.sent")
    os.replace(entry.path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _set_aside(entry: OutboxEntry, refusal: StoreRefused) -> Path:
    """Move a push the store refused as invalid out of the outbox, into ``<run>/refused/`` with the reason."""
    target = entry.path.parent.parent / REFUSED / entry.path.name
    atomic_write_json(entry.path / REFUSAL_NAME, {"status": refusal.status, "detail": str(refusal),
                                                  "refused": datetime.now(timezone.utc).isoformat()})
    target.parent.mkdir(exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(entry.path, target)
    return target


def _remove_leftovers(outbox: Path) -> None:
    """Delete what interrupted syncs and pushes left: sent entries, and temp entries older than ten minutes
    (a younger one may be another push still writing)."""
    cutoff = time.time() - STALE_OUTBOX_TEMP_SECONDS
    for old in outbox.glob(".*"):
        try:
            if old.name.endswith(".sent") or (old.name.endswith(".tmp") and old.stat().st_mtime < cutoff):
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:
            pass


def flush(run_dir: str | os.PathLike, store: str | None, token: str | None, device: str | None = None,
          attempts: int = 1, backoff: float = 1.0, max_backoff: float = 30.0,
          sleep: Callable[[float], None] = time.sleep, on_ack: Callable[[OutboxEntry, dict], None] | None = None,
          on_refused: Callable[[Path, StoreRefused], None] | None = None) -> int:
    """Send queued pushes oldest first, each removed once acknowledged; returns how many were sent.

    Transient failures are retried up to ``attempts`` times per entry with exponential backoff
    (``backoff``, doubling, at most ``max_backoff`` seconds); then StoreUnreachable propagates and
    the remaining entries stay queued. A push the store refuses as invalid (400, 404, 409, 413, 422) is
    moved to ``<run>/refused/`` with the store's reason (``on_refused`` is told) and the next one is sent;
    after the queue, a UserError says how many were refused. Any other refusal (a bad token) stops,
    keeping the entry.
    """
    device = device_of(token, device)
    _remove_leftovers(Path(run_dir) / OUTBOX)
    sent, refused = 0, []
    for entry in pending(run_dir):
        url = store or entry.store
        if not url:
            raise UserError("no store given: pass --store URL or set EDGE_PEFT_STORE")
        with StoreClient(url, token) as client:
            try:
                ack = _with_retries(lambda: client.push(entry.base, device, entry.meta, entry.adapter()),
                                    attempts, backoff, max_backoff, sleep)
            except StoreRefused as exc:
                if exc.status not in INVALID_STATUSES:
                    raise UserError(f"{exc}; {entry.path} stays queued: fix this and run sync again, "
                                    "or delete that entry") from None
                refused.append(_set_aside(entry, exc))
                if on_refused:
                    on_refused(refused[-1], exc)
                continue
        _remove(entry)
        sent += 1
        if on_ack:
            on_ack(entry, ack)
    if refused:
        raise UserError(f"the store refused {len(refused)} adapter(s) as invalid; they were moved out of the outbox "
                        f"to {refused[0].parent} with the reason in {REFUSAL_NAME} ({sent} sent)")
    return sent


def _with_retries(call: Callable[[], dict], attempts: int, backoff: float, max_backoff: float,
                  sleep: Callable[[float], None]) -> dict:
    delay = backoff
    for _ in range(max(1, attempts) - 1):
        try:
            return call()
        except StoreUnreachable:
            sleep(delay)
            delay = min(delay * 2, max_backoff)
    return call()


# --- pull ------------------------------------------------------------------------------------------

def pull(client: StoreClient, base: str, out_dir: str | os.PathLike, device: str | None = None,
         version: int | None = None) -> dict[str, Any] | None:
    """Write the adapter into ``out_dir`` as a loadable PEFT directory; None when it is already up to date.

    Returns what was pulled (kind, device, version, sha256): also saved as ``<out>/pulled.json``, whose
    kind/version/device are what a run trained from this adapter reports as its ``parent``.
    """
    out = Path(out_dir)
    previous = _previous_pull(out)
    source = {"base": base, "kind": "device" if device else "global", "device": device}
    same_source = previous is not None and all(previous.get(k) == v for k, v in source.items()) \
        and _intact(out / ADAPTER_WEIGHTS, previous.get("sha256"))
    response = client.pull(base, device, version, previous["sha256"] if same_source else None)
    if response.status_code == 304:
        return None
    data = response.content
    sha = hashlib.sha256(data).hexdigest()
    if sha != response.headers.get("X-Edge-Peft-Sha256"):
        raise UserError(f"the adapter downloaded from {client.url} does not match its sha256: the transfer was corrupted; pull again")
    spec = client.spec(base)
    tensors, _ = decode_adapter(data, "pulled adapter")
    check_tensors(spec, tensors, "pulled adapter", complete=True)
    pulled = {**source, "version": int(response.headers["X-Edge-Peft-Version"]), "sha256": sha, "store": client.url}
    with atomic_directory(out, overwrite=True) as tmp:
        atomic_write_bytes(tmp / ADAPTER_WEIGHTS, data)
        atomic_write_json(tmp / ADAPTER_CONFIG, peft_config(spec))
        atomic_write_json(tmp / PULLED, pulled)
        record_adapter(tmp)
    return pulled


def _intact(path: Path, sha256: Any) -> bool:
    """Whether an earlier pull's file still has the sha256 it was pulled with (else it is pulled again)."""
    if path.is_file() and sha256_file(path) == sha256:
        return True
    print(f"note: {path} is missing or corrupt (its sha256 differs from {PULLED}'s): pulling it again",
          file=sys.stderr)
    return False


def _previous_pull(out: Path) -> dict[str, Any] | None:
    """What an earlier pull left in ``out``; refuse to overwrite a directory that is not a pull."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        return json.loads((out / PULLED).read_text())
    except (OSError, ValueError):
        raise UserError(f"{out} exists and was not written by `edge-peft pull`: choose another --out or remove it") from None
