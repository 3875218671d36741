"""Blockwise 4-bit frozen weights (``export --quantize int4``) and the ONNX nodes that dequantize them.

A weight is quantized in blocks of ``block`` values along its reduced axis (the axis a product sums over),
asymmetrically, as GGUF's Q4_1: ``w = d * q + m`` with ``q`` in 0..15 and per block a scale ``d`` and an offset
``m`` (the block's minimum), both fp16. Stored per weight:

- ``<W>.int4``: uint8, two values per byte: the first half of the reduced axis in the low nibbles, the second
  half in the high ones (unpacking is one ``Concat``);
- ``<W>.d`` / ``<W>.m``: the fp16 scale and offset as their uint16 bit patterns, shaped to broadcast over the
  blocks (``[K/B, 1, N]`` for a weight reduced along axis 0, ``[M, K/B, 1]`` along axis 1).

ORT 1.19's training checkpoint refuses fp16 tensors (it loads uint8 and uint16), and ONNX's
``DequantizeLinear`` with blocked int4 fails there too, so the dequantization is spelled out in opset-17 ops
both ORT 1.19 and current onnxruntime run: ``BitShift`` unpacks the nibbles, ``Cast`` / ``Reshape`` /
``Mul`` / ``Add`` apply the blocks, and the fp16 bit patterns are decoded exactly in fp32 (two 64-entry
tables indexed by sign and exponent). Each chain's roots read a stored tensor and a small one
(``BitShift``'s shift, ``Cast``'s scale bits): ``recompute.dequantize_at_use`` pins those to run at use.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifact.manifest import INT4_BLOCK_SIZES
from ..errors import UserError

FOUR = "int4.four"  # the nibble shift, uint8 [1]
POW = "int4.fp16_pow"  # fp16 bits >> 10 (sign and exponent) -> signed power of two of the mantissa's unit
LEAD = "int4.fp16_lead"  # fp16 bits >> 10 -> the implicit leading mantissa bit (1024; 0 for subnormals)
INV_1024, K1024 = "int4.inv_1024", "int4.1024"
DEFAULT_BLOCK_SIZE = INT4_BLOCK_SIZES[0]
MARK, END = ".int4/", ".int4/out"  # in the names of a stored weight's dequantization nodes; END: the last one
PINNED_INPUTS = {("BitShift", 1), ("Cast", 0)}  # the small input of each root a copy made at use waits on


def is_chain_node(node: onnx.NodeProto) -> bool:
    """Whether ``node`` belongs to a stored weight's dequantization (``dequantize_nodes``), or a copy of one."""
    return MARK in node.name


def is_chain_end(node: onnx.NodeProto) -> bool:
    """Whether ``node`` makes the fp32 weight of a ``dequantize_nodes`` chain (the original, not a copy)."""
    return node.name.endswith(END)


def check_block_size(block: int) -> None:
    """Refuse a block size other than 32, 64 or 128 in one line."""
    if block not in INT4_BLOCK_SIZES:
        raise UserError(f"--block-size {block} is not supported: use {', '.join(map(str, INT4_BLOCK_SIZES))}")


def quantize(w: np.ndarray, axis: int, block: int, name: str = "weight") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` (2-D fp32) in blocks of ``block`` along ``axis`` -> (packed uint8, scale bits, offset bits).

    The returned arrays have the storage shapes of the module docstring; a reduced dimension ``block`` does not
    divide is refused in one line naming the weight."""
    if w.shape[axis] % block:
        raise UserError(f"--block-size {block} does not divide dimension {w.shape[axis]} of {name}: use a block "
                        f"size among {', '.join(map(str, INT4_BLOCK_SIZES))} that divides it")
    kn = w if axis == 0 else w.T  # [K, N], K reduced
    k, n = kn.shape
    blocks = kn.reshape(k // block, block, n).astype(np.float32)
    low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    d = ((high - low) / 15).astype(np.float16)
    m = low.astype(np.float16)
    d32, m32 = d.astype(np.float32), m.astype(np.float32)
    safe = np.where(d32 > 0, d32, 1.0)
    q = np.where(d32 > 0, np.clip(np.rint((blocks - m32) / safe), 0, 15), 0).astype(np.uint8).reshape(k, n)
    packed = q[: k // 2] | (q[k // 2:] << 4)
    if axis == 1:  # back to the weight's own orientation
        return (np.ascontiguousarray(packed.T), d.view(np.uint16).transpose(2, 0, 1).copy(),
                m.view(np.uint16).transpose(2, 0, 1).copy())
    return packed, d.view(np.uint16), m.view(np.uint16)


def dequantize(packed: np.ndarray, d_bits: np.ndarray, m_bits: np.ndarray) -> np.ndarray:
    """The fp32 weight the graph's dequantization computes from the stored arrays (numpy: references, tests)."""
    axis = 0 if d_bits.shape[1] == 1 and d_bits.shape[2] == packed.shape[1] else 1  # [K/B, 1, N] or [M, K/B, 1]
    q = np.concatenate([packed & 15, packed >> 4], axis=axis).astype(np.float32)
    d, m = d_bits.view(np.float16).astype(np.float32), m_bits.view(np.float16).astype(np.float32)
    blocks = q.reshape(d.shape[0], -1, q.shape[1]) if axis == 0 else q.reshape(q.shape[0], d.shape[1], -1)
    return (blocks * d + m).reshape(q.shape)


def constants() -> list[onnx.TensorProto]:
    """The shared constants the dequantization nodes read (one set per graph)."""
    index = np.arange(64)
    exponent = index % 32
    sign = np.where(index >= 32, -1.0, 1.0)
    power = (sign * np.exp2(np.maximum(exponent, 1) - 25.0)).astype(np.float32)
    lead = np.where(exponent > 0, 1024.0, 0.0).astype(np.float32)
    return [numpy_helper.from_array(np.array([4], np.uint8), FOUR), numpy_helper.from_array(power, POW),
            numpy_helper.from_array(lead, LEAD), numpy_helper.from_array(np.array(1 / 1024, np.float32), INV_1024),
            numpy_helper.from_array(np.array(1024, np.float32), K1024)]


def _decode_fp16(bits: str, out: str) -> list[onnx.NodeProto]:
    """fp32 ``out`` = the fp16 values whose uint16 bit patterns are ``bits`` (exact; no inf or NaN)."""
    make = helper.make_node
    return [
        make("Cast", [bits], [f"{out}.f"], to=TensorProto.FLOAT),
        make("Mul", [f"{out}.f", INV_1024], [f"{out}.top_f"]),
        make("Floor", [f"{out}.top_f"], [f"{out}.top"]),
        make("Cast", [f"{out}.top"], [f"{out}.index"], to=TensorProto.INT64),
        make("Gather", [POW, f"{out}.index"], [f"{out}.pow"], axis=0),
        make("Gather", [LEAD, f"{out}.index"], [f"{out}.lead"], axis=0),
        make("Mul", [f"{out}.top", K1024], [f"{out}.high"]),
        make("Sub", [f"{out}.f", f"{out}.high"], [f"{out}.fraction"]),
        make("Add", [f"{out}.fraction", f"{out}.lead"], [f"{out}.mantissa"]),
        make("Mul", [f"{out}.mantissa", f"{out}.pow"], [out]),
    ]


def _nibbles(packed: str, out: str, axis: int) -> list[onnx.NodeProto]:
    """uint8 ``out``: the packed values unpacked along ``axis`` (low nibbles first)."""
    make = helper.make_node
    return [
        make("BitShift", [packed, FOUR], [f"{out}.high"], direction="RIGHT"),
        make("BitShift", [packed, FOUR], [f"{out}.shifted"], direction="LEFT"),
        make("BitShift", [f"{out}.shifted", FOUR], [f"{out}.low"], direction="RIGHT"),
        make("Concat", [f"{out}.low", f"{out}.high"], [out], axis=axis),
    ]


def dequantize_nodes(weight: str, shape: tuple[int, int], axis: int, block: int, out: str,
                     transposed: bool = False) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing fp32 ``out`` = the stored ``weight`` (``shape``, reduced along ``axis``), or its transpose
    with ``transposed`` (unpacked values are transposed as uint8, before the fp32 copy exists), and the shape
    constants they read."""
    make = helper.make_node
    rows, cols = shape
    t = f"{out}.int4"
    nodes = _nibbles(f"{weight}.int4", f"{t}.q", axis)
    nodes += _decode_fp16(f"{weight}.d", f"{t}.d") + _decode_fp16(f"{weight}.m", f"{t}.m")
    q, d, m = f"{t}.q", f"{t}.d", f"{t}.m"
    if transposed:
        nodes += [make("Transpose", [q], [f"{t}.qt"], perm=[1, 0]),
                  make("Transpose", [d], [f"{t}.dt"], perm=[2, 0, 1] if axis == 0 else [1, 2, 0]),
                  make("Transpose", [m], [f"{t}.mt"], perm=[2, 0, 1] if axis == 0 else [1, 2, 0])]
        q, d, m = f"{t}.qt", f"{t}.dt", f"{t}.mt"
        rows, cols, axis = cols, rows, 1 - axis
    blocked = [rows // block, block, cols] if axis == 0 else [rows, cols // block, block]
    shapes = [numpy_helper.from_array(np.array(blocked, np.int64), f"{t}.blocked"),
              numpy_helper.from_array(np.array([rows, cols], np.int64), f"{t}.shape")]
    nodes += [
        make("Cast", [q], [f"{t}.qf"], to=TensorProto.FLOAT),
        make("Reshape", [f"{t}.qf", f"{t}.blocked"], [f"{t}.q3"]),
        make("Mul", [f"{t}.q3", d], [f"{t}.scaled"]),
        make("Add", [f"{t}.scaled", m], [f"{t}.w3"]),
        make("Reshape", [f"{t}.w3", f"{t}.shape"], [out]),
    ]
    for k, node in enumerate(nodes):
        node.name = f"{out}{END}" if k == len(nodes) - 1 else f"{out}{MARK}{k}"
    return nodes, shapes


def gather_nodes(weight: str, width: int, block: int, indices: str, out: str) -> list[onnx.NodeProto]:
    """Nodes computing fp32 ``out`` = rows ``indices`` of the stored ``weight`` (reduced along axis 1, ``width``
    wide): only the gathered rows are unpacked and dequantized (embeddings)."""
    make = helper.make_node
    t = f"{out}.int4"
    nodes = [make("Gather", [f"{weight}.int4", indices], [f"{t}.packed"], axis=0)]
    nodes += _nibbles(f"{t}.packed", f"{t}.q", -1)
    for part in ("d", "m"):
        nodes.append(make("Gather", [f"{weight}.{part}", indices], [f"{t}.{part}_bits"], axis=0))
        nodes += _decode_fp16(f"{t}.{part}_bits", f"{t}.{part}_rows")
        nodes.append(make("Reshape", [f"{t}.{part}_rows", f"{t}.scale_shape"], [f"{t}.{part}"]))
    nodes += [
        make("Constant", [], [f"{t}.scale_shape"],
             value=numpy_helper.from_array(np.array([-1, width // block, 1], np.int64))),
        make("Constant", [], [f"{t}.blocked"],
             value=numpy_helper.from_array(np.array([-1, width // block, block], np.int64))),
        make("Constant", [], [f"{t}.width"], value=numpy_helper.from_array(np.array([width], np.int64))),
        make("Cast", [f"{t}.q"], [f"{t}.qf"], to=TensorProto.FLOAT),
        make("Reshape", [f"{t}.qf", f"{t}.blocked"], [f"{t}.q3"]),
        make("Mul", [f"{t}.q3", f"{t}.d"], [f"{t}.scaled"]),
        make("Add", [f"{t}.scaled", f"{t}.m"], [f"{t}.w3"]),
        make("Shape", [indices], [f"{t}.index_shape"]),
        make("Concat", [f"{t}.index_shape", f"{t}.width"], [f"{t}.shape"], axis=0),
        make("Reshape", [f"{t}.w3", f"{t}.shape"], [out]),
    ]
    return _ordered(nodes)


def _ordered(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` with the Constants first (they are read before they are listed above)."""
    return [n for n in nodes if n.op_type == "Constant"] + [n for n in nodes if n.op_type != "Constant"]


def stored(weight: str, packed: np.ndarray, d: np.ndarray, m: np.ndarray) -> list[onnx.TensorProto]:
    """The initializers of one quantized weight."""
    return [numpy_helper.from_array(packed, f"{weight}.int4"), numpy_helper.from_array(d, f"{weight}.d"),
            numpy_helper.from_array(m, f"{weight}.m")]


def stored_names(weight: str) -> list[str]:
    return [f"{weight}.int4", f"{weight}.d", f"{weight}.m"]
