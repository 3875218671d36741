"""Top-k sparsified int8 deltas: of the change since the global version a device started from, each matrix sends
its ``k = ceil(fraction x size)`` largest entries by magnitude, as int8 with one scale ``s = max|x| / 127``, and
their flat indices (increasing; uint16 for matrices of at most 65,536 entries, else int32); 1-D tensors send their
whole delta in fp32. The receiver adds the delta to
the same global version.

Error bound, per matrix: a sent entry is within ``s / 2`` of its delta; an entry left out was no larger than the
smallest one sent, so its error is at most ``(min|q| + 1/2) s`` (``error_bound``). Decoding refuses anything but
exactly ``k`` entries at distinct increasing indices inside the matrix, with a scale that belongs to its values.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..errors import UserError
from .compressed import QMAX, SCALE_SUFFIX, check_tensors

TOPK = "int8-topk"
INDEX_SUFFIX = ".topk_index"


def kept(size: int, fraction: float) -> int:
    """How many entries of a matrix of ``size`` entries travel."""
    return max(1, min(size, math.ceil(fraction * size)))


def index_dtype(size: int) -> type:
    """The dtype of a matrix's flat indices: 2 bytes where they fit."""
    return np.uint16 if size <= 1 << 16 else np.int32


def encode_delta(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 fraction: float) -> dict[str, np.ndarray]:
    """``tensors - reference`` as sent: per matrix the top-k entries (int8 + one scale + indices)."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        delta = np.asarray(value, np.float32) - np.asarray(reference[key], np.float32)
        if delta.ndim != 2:
            out[key] = delta
            continue
        flat = delta.ravel()
        k = kept(flat.size, fraction)
        index = np.sort(np.argpartition(-np.abs(flat), k - 1)[:k]).astype(index_dtype(flat.size))
        values = flat[index]
        scale = np.float32(np.abs(values).max() / QMAX)
        out[key] = np.clip(np.rint(values / (scale if scale > 0 else 1.0)), -QMAX, QMAX).astype(np.int8)
        out[key + SCALE_SUFFIX] = np.array([scale], np.float32)
        out[key + INDEX_SUFFIX] = index
    return out


def decode_delta(shapes: Mapping[str, tuple[int, ...]], sent: Mapping[str, np.ndarray],
                 reference: Mapping[str, np.ndarray], fraction: float, source: str) -> dict[str, np.ndarray]:
    """``reference`` plus the delta ``encode_delta`` sent, as float32; UserError naming the first problem."""
    expected = {}
    for key, shape in shapes.items():
        if len(shape) != 2:
            expected[key] = (tuple(shape), np.float32)
            continue
        size = int(np.prod(shape))
        k = kept(size, fraction)
        expected.update({key: ((k,), np.int8), key + SCALE_SUFFIX: ((1,), np.float32),
                         key + INDEX_SUFFIX: ((k,), index_dtype(size))})
    check_tensors(sent, expected, source, "top-k encoding", f" (top-k of {fraction})")
    out = {}
    for key, shape in shapes.items():
        base = np.array(reference[key], np.float32)
        if len(shape) != 2:
            out[key] = base + sent[key]
            continue
        index = sent[key + INDEX_SUFFIX].astype(np.int64)
        q, scale = sent[key], float(sent[key + SCALE_SUFFIX][0])
        if index[0] < 0 or index[-1] >= base.size or np.any(np.diff(index) <= 0):
            raise UserError(f"{source}: the indices of {key} are not distinct, increasing and inside the matrix: "
                            "the update is corrupted")
        peak = int(np.abs(q.astype(np.int16)).max())
        if scale < 0 or (scale == 0) != (peak == 0) or (scale > 0 and peak != QMAX):
            raise UserError(f"{source}: the scale of {key} does not belong to its values (a wrongly scaled or "
                            "corrupted update)")
        flat = base.ravel()
        flat[index] += q.astype(np.float32) * np.float32(scale)
        out[key] = flat.reshape(shape)
    return out


def error_bound(shapes: Mapping[str, tuple[int, ...]], sent: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per matrix, the largest difference between a decoded value and the value trained (0 for 1-D tensors)."""
    bound = {}
    for key, shape in shapes.items():
        if len(shape) != 2:
            bound[key] = 0.0
            continue
        scale = float(sent[key + SCALE_SUFFIX][0])
        smallest = int(np.abs(sent[key].astype(np.int16)).min())
        bound[key] = (smallest + 0.5) * scale
    return bound
