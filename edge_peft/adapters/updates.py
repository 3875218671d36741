"""An adapter update in one of the wire encodings, in a safetensors file or a Flower message: one place that
encodes and decodes fp32, int8 (``compressed.py``) and top-k int8 deltas (``sparse.py``).

A pushed safetensors file names its encoding in the edge-peft metadata (``encoding``, and ``topk`` for deltas);
a file without it is fp32. A top-k delta is against the global version the device trained from (its parent).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from ..errors import UserError
from . import compressed, sparse

ENCODING_KEY, TOPK_KEY = "encoding", "topk"
UPDATE_ENCODINGS = (*compressed.ENCODINGS, sparse.TOPK)


def check_encoding(encoding: str, topk: float) -> None:
    """UserError naming the option when the encoding or the top-k fraction is out of range."""
    if encoding not in UPDATE_ENCODINGS:
        raise UserError(f"update encoding {encoding!r} is not one of {', '.join(UPDATE_ENCODINGS)}")
    if not (isinstance(topk, (int, float)) and not isinstance(topk, bool) and math.isfinite(topk) and 0 < topk <= 1):
        raise UserError(f"the top-k fraction {topk!r} must be a number in (0, 1], e.g. 0.1")


def encode_update(tensors: Mapping[str, np.ndarray], encoding: str, reference: Mapping[str, np.ndarray] | None = None,
                  topk: float = 0.1) -> dict[str, np.ndarray]:
    """The tensors as sent; ``reference`` (the starting global version, same keys) for ``int8-topk``."""
    check_encoding(encoding, topk)
    if encoding == sparse.TOPK:
        if reference is None:
            raise UserError("a top-k delta needs the global version it starts from: train from a pulled global "
                            "version (`edge-peft adapter load`) or send int8")
        return sparse.encode_delta(tensors, reference, topk)
    return compressed.encode(tensors, encoding)


def decode_update(shapes: Mapping[str, tuple[int, ...]], sent: Mapping[str, np.ndarray], encoding: str, source: str,
                  reference: Mapping[str, np.ndarray] | None = None, topk: float = 0.1) -> dict[str, np.ndarray]:
    """float32 tensors of ``shapes`` from what ``encode_update`` sent; UserError naming the first problem."""
    check_encoding(encoding, topk)
    if encoding == sparse.TOPK:
        if reference is None:
            raise UserError(f"{source} is a top-k delta, but no global version to add it to is known")
        return sparse.decode_delta(shapes, sent, reference, topk, source)
    return compressed.decode(shapes, sent, encoding, source)


def file_encoding(file_meta: Mapping[str, Any], source: str) -> tuple[str, float]:
    """(encoding, top-k fraction) a pushed file's metadata names (fp32 when absent); UserError when invalid."""
    encoding = file_meta.get(ENCODING_KEY, compressed.FP32)
    topk = file_meta.get(TOPK_KEY, 0.1)
    try:
        check_encoding(encoding, topk)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    if (TOPK_KEY in file_meta) != (encoding == sparse.TOPK):
        raise UserError(f"{source}: the metadata's {TOPK_KEY!r} belongs with encoding {sparse.TOPK!r} only")
    return encoding, float(topk)


def file_meta_for(encoding: str, topk: float = 0.1) -> dict[str, Any]:
    """The metadata a pushed file carries for its encoding (nothing for fp32)."""
    if encoding == compressed.FP32:
        return {}
    return {ENCODING_KEY: encoding, **({TOPK_KEY: topk} if encoding == sparse.TOPK else {})}
