"""A push's JSON metadata, checked field by field: types, integer ranges, finite metrics, the parent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .auth import check_device_id
from .blobs import SHA256_HEX
from .storage import Parent, StoreError
from .wire import MAX_COUNT, metrics_problem

FIELDS = {"spec", "samples", "steps", "metrics", "parent", "sha256"}


@dataclass(frozen=True)
class PushRequest:
    """The validated metadata of a push; ``spec`` stays raw JSON until it is compared with the base's."""

    spec: Any
    samples: int
    steps: int
    metrics: dict[str, Any]
    parent: Parent | None
    sha256: str


def parse_push_meta(meta: Any) -> PushRequest:
    """Validate a push's JSON metadata; StoreError(400) naming the first problem."""
    if not isinstance(meta, dict):
        raise StoreError(400, "push metadata must be a JSON object: use `edge-peft push`")
    unknown = sorted(set(meta) - FIELDS)
    if unknown:
        raise StoreError(400, f"push metadata has unknown fields {[str(k)[:40] for k in unknown[:5]]}: use a matching "
                              "`edge-peft push`")
    sha = meta.get("sha256")
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        raise StoreError(400, "push metadata needs sha256 (64 lowercase hex digits of the adapter bytes)")
    counts = {key: count(meta.get(key), f"push metadata {key}", minimum=0) for key in ("samples", "steps")}
    metrics = meta.get("metrics", {})
    if problem := metrics_problem(metrics):
        raise StoreError(400, f"push metadata: {problem}: push the run's own summary.json")
    return PushRequest(meta.get("spec"), counts["samples"], counts["steps"], metrics, parse_parent(meta.get("parent")),
                       sha)


def count(value: Any, what: str, minimum: int) -> int:
    """An integer in ``minimum..MAX_COUNT``; StoreError(400) otherwise (booleans and floats included)."""
    if type(value) is not int or not minimum <= value <= MAX_COUNT:
        raise StoreError(400, f"{what} must be an integer from {minimum} to {MAX_COUNT} "
                              "(the run's summary.json has it)")
    return value


def parse_parent(raw: Any) -> Parent | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("kind") not in ("global", "device") or set(raw) - {"kind", "version", "device"}:
        raise StoreError(400, 'push metadata parent must be null or {"kind": "global"|"device", "version": N >= 1}')
    version = count(raw.get("version"), "push metadata parent.version", minimum=1)
    device = raw.get("device")
    if device is not None:
        if raw["kind"] != "device":
            raise StoreError(400, "push metadata parent.device is only valid with kind 'device'")
        check_device_id(device)
    return Parent(raw["kind"], version, device)
