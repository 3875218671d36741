"""Adapter updates on the wire: fp32, or int8 with one scale per channel, checked whole when decoded.

int8: a 2-D tensor is sent as ``round(x / s)`` in int8 plus float32 scales ``s = max|x| / 127`` per channel:
per rank channel (column) for a LoRA B, per row otherwise (e.g. a classifier head's weight). 1-D tensors
(biases) stay fp32. Every decoded value is within ``s / 2`` of the original (round to nearest), so a weighted
average of decoded adapters is within ``sum_i w_i s_i / 2`` of the fp32 average, per channel (``error_bound``).

Decoding refuses, in one line, anything but that exact shape of data: a missing, extra or misshapen tensor, a
wrong dtype, a scale that is negative, not finite, or zero over a non-zero channel, and a channel whose largest
``|q|`` is not 127 (a scale that does not belong to its values: a wrongly scaled or corrupted update).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..artifact.names import is_b
from ..errors import UserError

FP32 = "fp32"
INT8 = "int8"
ENCODINGS = (FP32, INT8)
SCALE_SUFFIX = ".int8_scale"
QMAX = 127


def _axis(key: str) -> int:
    """The axis the scales run along: B's rank channels are its columns; other matrices have a scale per row."""
    return 1 if is_b(key) else 0


def encode(tensors: Mapping[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    """The tensors as sent: float32 copies (``fp32``), or int8 values plus ``<key>.int8_scale`` (``int8``)."""
    if encoding not in ENCODINGS:
        raise UserError(f"update encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        value = np.asarray(value, np.float32)
        if encoding == FP32 or value.ndim != 2:
            out[key] = np.ascontiguousarray(value)
            continue
        axis = _axis(key)
        scale = (np.abs(value).max(axis=1 - axis) / QMAX).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.rint(value / np.expand_dims(safe, 1 - axis))
        out[key] = np.clip(q, -QMAX, QMAX).astype(np.int8)
        out[key + SCALE_SUFFIX] = scale
    return out


def decode(shapes: Mapping[str, tuple[int, ...]], sent: Mapping[str, np.ndarray], encoding: str,
           source: str) -> dict[str, np.ndarray]:
    """float32 tensors of ``shapes`` from what ``encode`` sent; UserError naming the first problem."""
    if encoding not in ENCODINGS:
        raise UserError(f"{source}: update encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    expected = {}
    for key, shape in shapes.items():
        quantized = encoding == INT8 and len(shape) == 2
        expected[key] = (tuple(shape), np.int8 if quantized else np.float32)
        if quantized:
            expected[key + SCALE_SUFFIX] = ((shape[_axis(key)],), np.float32)
    check_tensors(sent, expected, source, f"{encoding} encoding")
    out = {}
    for key, shape in shapes.items():
        if sent[key].dtype == np.float32:
            out[key] = np.array(sent[key], np.float32)
            continue
        out[key] = _dequantize(key, sent[key], sent[key + SCALE_SUFFIX], source)
    return out


def _dequantize(key: str, q: np.ndarray, scale: np.ndarray, source: str) -> np.ndarray:
    axis = _axis(key)
    peak = np.abs(q.astype(np.int16)).max(axis=1 - axis)
    if np.any(scale < 0) or np.any((scale == 0) & (peak != 0)):
        raise UserError(f"{source}: {key} has a negative scale or a zero scale over non-zero values: the update is "
                        "corrupted")
    if np.any((scale > 0) & (peak != QMAX)):
        raise UserError(f"{source}: a channel of {key} does not reach +-{QMAX} although its scale is non-zero: the "
                        "scales do not belong to these values (a wrongly scaled or corrupted update)")
    return (q.astype(np.float32) * np.expand_dims(scale, 1 - axis)).astype(np.float32)


def error_bound(shapes: Mapping[str, tuple[int, ...]], sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per tensor, the largest difference between each decoded value and the original (0 for fp32 tensors)."""
    out = {}
    for key, shape in shapes.items():
        scale = sent.get(key + SCALE_SUFFIX)
        out[key] = (np.zeros(shape, np.float32) if scale is None
                    else np.broadcast_to(np.expand_dims(scale / 2, 1 - _axis(key)), shape).astype(np.float32))
    return out


def nbytes(sent: Mapping[str, np.ndarray]) -> int:
    """Bytes of the tensor values sent (headers and names excluded)."""
    return int(sum(v.nbytes for v in sent.values()))


def check_tensors(sent: dict[str, np.ndarray], expected: dict[str, tuple[tuple[int, ...], type]], source: str,
                  encoding: str, detail: str = "") -> None:
    """UserError naming the first tensor of ``sent`` missing, unexpected, of another shape or dtype than
    ``expected`` (key -> (shape, dtype)), or holding NaN or Inf; ``detail`` follows the expected shape."""
    extra, missing = sorted(set(sent) - set(expected)), sorted(set(expected) - set(sent))
    if extra or missing:
        what = f"has no tensor {missing[0]}" if missing else f"has an unexpected tensor {extra[0]}"
        raise UserError(f"{source} {what}: it was not made for this adapter's spec and {encoding}")
    for key, (shape, dtype) in expected.items():
        value = sent[key]
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise UserError(f"{source}: {key} is {value.dtype}{list(value.shape)}, expected {np.dtype(dtype).name}"
                            f"{list(shape)}{detail}: the update is corrupted or for another spec")
        if dtype == np.float32 and not np.all(np.isfinite(value)):
            raise UserError(f"{source}: {key} holds NaN or Inf: the update is corrupted")
