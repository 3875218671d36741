"""The push request body, shared by server and client: one line of JSON metadata, then the adapter bytes.

``{"spec": ..., "samples": N, "steps": N, "metrics": {...}, "parent": {...} | null, "sha256": "..."}\\n``
followed by the raw ``adapter_model.safetensors`` bytes. Easy to produce with ``curl --data-binary``,
no multipart parser, and the spec can be as large as the model needs (unlike an HTTP header).
"""

from __future__ import annotations

import json
from typing import Any

from .storage import StoreError

PUSH_MEDIA_TYPE = "application/vnd.edge-peft.push"
MAX_META_BYTES = 4 << 20


def encode_push(meta: dict[str, Any], adapter: bytes) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + adapter


def decode_push(body: bytes) -> tuple[Any, bytes]:
    """Split a push body; StoreError(400) if the metadata line is missing or not JSON."""
    end = body.find(b"\n", 0, MAX_META_BYTES)
    if end < 0:
        raise StoreError(400, "push body must start with one line of JSON metadata: use `edge-peft push`")
    try:
        meta = json.loads(body[:end])
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(400, f"push metadata is not valid JSON ({exc}): use `edge-peft push`") from None
    return meta, body[end + 1:]
