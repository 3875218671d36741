"""The push request body, shared by server and client: one line of JSON metadata, then the adapter bytes.

``{"spec": ..., "samples": N, "steps": N, "metrics": {...}, "parent": {...} | null, "sha256": "..."}\\n``
followed by the raw ``adapter_model.safetensors`` bytes. Easy to produce with ``curl --data-binary``,
no multipart parser, and the spec can be as large as the model needs (unlike an HTTP header).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .storage import StoreError

PUSH_MEDIA_TYPE = "application/vnd.edge-peft.push"
MAX_META_BYTES = 4 << 20
MAX_METRICS_BYTES = 64 << 10
MAX_METRICS_DEPTH = 8
MAX_COUNT = 2**53 - 1  # samples, steps, version numbers: exact in JSON and in SQLite


def encode_push(meta: dict[str, Any], adapter: bytes) -> bytes:
    return json.dumps(meta, separators=(",", ":"), allow_nan=False).encode() + b"\n" + adapter


def decode_push(body: bytes) -> tuple[Any, bytes]:
    """Split a push body; StoreError(400) if the metadata line is missing, not JSON, or nested too deeply."""
    end = body.find(b"\n", 0, MAX_META_BYTES)
    if end < 0:
        raise StoreError(400, "push body must start with one line of JSON metadata (at most 4 MiB): use `edge-peft push`")
    try:
        meta = json.loads(body[:end])
    except RecursionError:
        raise StoreError(400, "push metadata is nested too deeply: use `edge-peft push`") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(400, f"push metadata is not valid JSON ({exc}): use `edge-peft push`") from None
    return meta, body[end + 1:]


def metrics_problem(metrics: Any) -> str | None:
    """What makes ``metrics`` unfit to store (NaN/Inf, nesting, size), or None. The client checks it before
    queueing a push, the store on receipt."""
    if not isinstance(metrics, dict):
        return "metrics must be a JSON object"
    problem = _value_problem(metrics, "metrics", 0)
    if problem is None and len(json.dumps(metrics, allow_nan=False)) > MAX_METRICS_BYTES:
        problem = f"metrics take more than {MAX_METRICS_BYTES >> 10} KiB as JSON"
    return problem


def _value_problem(value: Any, path: str, depth: int) -> str | None:
    if depth > MAX_METRICS_DEPTH:
        return f"{path} is nested more than {MAX_METRICS_DEPTH} levels deep"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path} is {value} (only finite numbers can be stored)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return f"{path} is an integer beyond 64 bits"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a key that is not a string"
            if problem := _value_problem(item, f"{path}.{key[:40]}", depth + 1):
                return problem
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if problem := _value_problem(item, f"{path}[{i}]", depth + 1):
                return problem
    elif not (value is None or isinstance(value, (str, int, float))):
        return f"{path} is a {type(value).__name__}, not a JSON value"
    return None
