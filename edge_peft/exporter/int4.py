"""Blockwise 4-bit frozen weights (``export --quantize int4``) and the ONNX nodes that dequantize them.

A weight is stored as ``S`` [M, K]: the matrix itself, or its transpose, whichever has the axis a product
reduces over (K) last. Each row is cut into blocks of ``block`` values, quantized asymmetrically,
``w = scale * (q - zero)`` with ``q`` in 0..15, a per-block fp32 scale and a uint8 zero point. GGUF's Q4_0 is the
case zero = 8 with an fp16 scale: a Q4_0 model exported with block 32 keeps its codes and scales exactly
(``q4_0_codes``). GGUF's Q4_1, ``w = d * q + m``, has a float offset no integer zero point gives: such a matrix keeps
its codes, ``d`` and ``m`` exactly with zero 0 and a per-block fp32 ``offset`` added after the dequantization
(``q4_1_codes``). Stored per weight:

- ``<W>.int4``: uint8 [M, K/2], two values a byte: the first half of each row in the low nibbles, the second
  half in the high ones (unpacking is one ``Concat``);
- ``<W>.scale`` fp32 and ``<W>.zero`` uint8, both [M*K/B] (row-major: the blocks of row 0 first), and
  ``<W>.shape`` (int64 [M, K]);
- a Q4_1 matrix only: ``<W>.offset``, fp32 [M*K/B, 1], added to each dequantized block (one ``Add``, a second fp32
  copy of that one matrix while it runs).

An int8 export keeps a GGUF Q8_0 matrix (``w = d * q``, int8 ``q``, fp16 ``d`` per block of 32) exactly the same way
(``q8_0_codes``): ``<W>.q8`` (int8 [M, K], nothing to unpack), ``<W>.scale`` [M*K/32] and ``<W>.shape``, through
the same chain without the unpacking and without zero points (``packed=False`` below), instead of per-channel int8.

Why this form: ORT 1.19's training checkpoint refuses int4 and fp16 tensors (``DequantizeLinear`` on int4
fails there), and ``MatMulNBits`` has no gradient. Unpacking is ``BitShift`` + ``Concat`` on uint8; the
unpacked values viewed as [M*K/B, B] go through one per-axis ``DequantizeLinear`` (axis 0: a row a block),
which writes the fp32 matrix once: a chain of ``Cast``, ``Mul`` and ``Add`` would hold two fp32 copies at a
time (ONNX Runtime's training sessions run without memory reuse, so nothing is computed in place), and the
reshapes alias their input. Products read ``S`` as it is: a product with the transpose becomes
``com.microsoft.FusedMatMul(X, S, transB=1)`` (``Gemm`` flips ``transB``), so no fp32 transpose is made. ORT 1.19
has no gradient for ``FusedMatMul``: the ORT training graph gets ``Gemm`` on ``X`` reshaped to 2-D instead
(``products_as_gemm``). The rest is opset 17, which ORT 1.19 and current onnxruntime both run.
The chain's roots are the ``BitShift`` of the stored nibbles by a small shift tensor (the reshapes of the scales
and zero points alias them), a Q8_0 chain's first ``Reshape``, or the ``Slice`` nodes of a row slice
(``row_slice_nodes``): ``recompute.dequantize_at_use`` pins their small input (``pinned``) to make each copy at its
use.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..artifact.manifest import INT4_BLOCK_SIZES
from ..errors import UserError

FOUR = "int4.four"  # the nibble shift, uint8 [1]
ROWS = "int4.rows"  # [-1, block]: the unpacked values a block a row
DEFAULT_BLOCK_SIZE = INT4_BLOCK_SIZES[0]
MARK, END = ".int4/", ".int4/out"  # in the names of a stored weight's dequantization nodes; END: the last one
ROOT = "root"  # a Q8_0 chain's first node: MARK + ROOT (copies made at use add a suffix)
Q8_0_BLOCK = 32  # values per GGUF Q8_0 block
MS_DOMAIN = "com.microsoft"
MINUS_ONE = "int4.minus_one"


def is_chain_node(node: onnx.NodeProto) -> bool:
    """Whether ``node`` belongs to a stored weight's dequantization (``dequantize_nodes``), or a copy of one."""
    return MARK in node.name


def pinned(node: onnx.NodeProto, k: int) -> bool:
    """Whether input ``k`` of chain node ``node`` is the small input of a root, which a copy made at use waits on:
    a ``BitShift``'s shift, a Q8_0 chain's block shape, or a row slice's first index (never the stored codes)."""
    if k != 1:
        return False
    return node.op_type in ("BitShift", "Slice") or (node.op_type == "Reshape" and f"{MARK}{ROOT}" in node.name)


def is_chain_end(node: onnx.NodeProto) -> bool:
    """Whether ``node`` makes the fp32 weight of a ``dequantize_nodes`` chain (the original, not a copy)."""
    return node.name.endswith(END)


def check_block_size(block: int) -> None:
    """Refuse a block size other than 32, 64 or 128 in one line."""
    if block not in INT4_BLOCK_SIZES:
        raise UserError(f"--block-size {block} is not supported: use {', '.join(map(str, INT4_BLOCK_SIZES))}")


def quantize(s: np.ndarray, block: int, name: str = "weight"
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``s`` (2-D fp32 [M, K]) in blocks of ``block`` along its rows -> (packed uint8, scale fp32, zero uint8,
    offset fp32 [M*K/B, 1] or None).

    Values already on GGUF Q4_0's or Q4_1's grid keep their codes exactly (``q4_0_codes``, ``q4_1_codes``); others
    are quantized asymmetrically from each block's range, without an offset. A row length ``block`` does not
    divide is refused in one line naming the weight."""
    rows, k = s.shape
    if k % block:
        raise UserError(f"--block-size {block} does not divide dimension {k} of {name}: use a block "
                        f"size among {', '.join(map(str, INT4_BLOCK_SIZES))} that divides it")
    blocks = s.reshape(rows, k // block, block).astype(np.float32)
    codes, offset = _first_row_first(q4_0_codes, blocks), None
    if codes is None and (exact := _first_row_first(q4_1_codes, blocks)) is not None:
        *codes, offset = exact
        offset = offset.reshape(-1, 1)
    if codes is None:
        low = np.minimum(blocks.min(axis=2), 0)  # the range holds 0, so a zero point in 0..15 represents it
        high = np.maximum(blocks.max(axis=2), 0)
        scale = ((high - low) / 15).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zero = np.clip(np.rint(-low / safe), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(blocks / safe[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
        codes = q, safe, zero
    q, scale, zero = codes
    q = q.reshape(rows, k)
    packed = q[:, : k // 2] | (q[:, k // 2:] << 4)
    return np.ascontiguousarray(packed), scale.reshape(-1), zero.reshape(-1), offset


def _first_row_first(codes: Callable[[np.ndarray], tuple | None], blocks: np.ndarray) -> tuple | None:
    """``codes(blocks)``, tried on the first row alone first: a matrix off the grid almost always fails there."""
    return None if len(blocks) > 1 and codes(blocks[:1]) is None else codes(blocks)


def q4_0_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes, scale, zero) reproducing ``blocks`` [rows, n, block] bit for bit when every block lies on GGUF
    Q4_0's grid ``d * (q - 8)``, q in 0..15 (a Q4_0 GGUF's weights as transformers dequantizes them), else None.

    llama.cpp sets ``d = x / -8`` from the block's value ``x`` of largest magnitude, so that value is ``-8 d``
    exactly and gives ``d`` back (negative when ``x`` is positive: ``DequantizeLinear`` takes any sign)."""
    top = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
    d = (top / np.float32(-8)).astype(np.float32)
    safe = np.where(d != 0, d, np.float32(1))
    q = np.rint(blocks / safe[..., None]) + 8
    if q.min() < 0 or q.max() > 15:
        return None
    q = q.astype(np.uint8)
    if not np.array_equal((q.astype(np.float32) - 8) * safe[..., None], blocks):
        return None
    return q, safe, np.full(d.shape, 8, np.uint8)


def q4_1_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes, scale ``d``, zero 0, offset ``m``) reproducing ``blocks`` [rows, n, block] bit for bit when every block
    lies on GGUF Q4_1's grid ``d * q + m`` (fp16 ``d`` and ``m``, q in 0..15, computed in fp32 as transformers
    dequantizes the file), else None.

    llama.cpp sets ``m`` to the block's minimum (its code is 0, so the value is ``m`` exactly) and ``d`` to the
    range over 15 in fp16; that ``d`` or an fp16 neighbour of it gives the block's values back."""
    m = blocks.min(axis=2)
    if not np.array_equal(m.astype(np.float16).astype(np.float32), m):
        return None
    guess = ((blocks.max(axis=2) - m) / np.float32(15)).astype(np.float16)
    found = _fp16_scale_codes(blocks, guess, m[..., None], 0, 15, np.zeros(m.shape, bool))
    if found is None:
        return None
    q, d = found
    return q.astype(np.uint8), d, np.zeros(m.shape, np.uint8), m.astype(np.float32)


def q8_0_codes(s: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 codes [M, K], scale [M*K/32]) reproducing ``s`` [M, K] bit for bit when every block of 32 along its rows
    lies on GGUF Q8_0's grid ``d * q`` (fp16 ``d``, q in -127..127, computed in fp32 as transformers dequantizes the
    file), else None. llama.cpp sets ``d`` to the block's largest magnitude over 127 in fp16, so that quotient or
    an fp16 neighbour of it gives the values back."""
    rows, k = s.shape
    if k % Q8_0_BLOCK:
        return None
    found = _first_row_first(_q8_0_blocks, s.reshape(rows, k // Q8_0_BLOCK, Q8_0_BLOCK).astype(np.float32))
    if found is None:
        return None
    q, d = found
    return q.astype(np.int8).reshape(rows, k), d.reshape(-1)


def _q8_0_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    top = np.abs(blocks).max(axis=2)
    guess = (top / np.float32(127)).astype(np.float16)
    return _fp16_scale_codes(blocks, guess, np.float32(0), -127, 127, top == 0)  # all zeros: code 0, any scale


def _fp16_scale_codes(blocks: np.ndarray, guess: np.ndarray, offset: np.ndarray | np.float32, low: int, high: int,
                      solved: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes as float32, fp32 scale ``d`` per block) with ``q * d + offset`` equal to ``blocks`` bit for bit, ``d``
    the fp16 ``guess`` or one of its fp16 neighbours and ``q`` in ``low..high``; None unless every block not
    ``solved`` already (those get codes 0, scale 1) finds one."""
    best_q, best_d = np.zeros(blocks.shape, np.float32), np.ones(guess.shape, np.float32)
    for d16 in (guess, np.nextafter(guess, np.float16(np.inf)), np.nextafter(guess, np.float16(-np.inf))):
        d = np.where(d16 > 0, d16.astype(np.float32), np.float32(1))
        q = np.clip(np.rint((blocks - offset) / d[..., None]), low, high).astype(np.float32)
        ok = ~solved & (q * d[..., None] + offset == blocks).all(axis=2)
        best_q[ok], best_d[ok] = q[ok], d[ok]
        solved = solved | ok
    return (best_q, best_d) if solved.all() else None


def dequantize(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, offset: np.ndarray | None = None
               ) -> np.ndarray:
    """The fp32 ``S`` the graph's dequantization computes from the stored arrays (numpy: references, tests)."""
    q = np.concatenate([packed & 15, packed >> 4], axis=1).astype(np.int32)
    scale, zero = scale.reshape(packed.shape[0], -1), zero.reshape(packed.shape[0], -1)
    blocks = (q.reshape(scale.shape[0], scale.shape[1], -1) - zero[..., None].astype(np.int32)).astype(np.float32)
    blocks = blocks * scale[..., None]
    if offset is not None:
        blocks = blocks + offset.reshape(scale.shape)[..., None]
    return blocks.reshape(q.shape)


def constants(block: int, packed: bool = True) -> list[onnx.TensorProto]:
    """The shared constants the dequantization nodes read (one set per graph; the nibble shift only if ``packed``)."""
    rows = numpy_helper.from_array(np.array([-1, block], np.int64), ROWS)
    return [numpy_helper.from_array(np.array([4], np.uint8), FOUR), rows] if packed else [rows]


def _unpack(packed: str, out: str) -> list[onnx.NodeProto]:
    """uint8 ``out``: the packed values unpacked along the last axis (low nibbles first)."""
    make = helper.make_node
    return [
        make("BitShift", [packed, FOUR], [f"{out}.high"], direction="RIGHT"),
        make("BitShift", [packed, FOUR], [f"{out}.shifted"], direction="LEFT"),
        make("BitShift", [f"{out}.shifted", FOUR], [f"{out}.low"], direction="RIGHT"),
        make("Concat", [f"{out}.low", f"{out}.high"], [out], axis=-1),
    ]


def _dequantize_blocks(q: str, scale: str, zero: str | None, out: str, offset: str | None) -> list[onnx.NodeProto]:
    """fp32 ``out`` [-1, block] = unpacked ``q`` viewed a block a row, through one per-axis DequantizeLinear (no
    ``zero``: symmetric int8), plus the blocks' ``offset`` [-1, 1] when there is one."""
    scaled = f"{out}.scaled" if offset else out
    nodes = [helper.make_node("Reshape", [q, ROWS], [f"{out}.q"]),
             helper.make_node("DequantizeLinear", [f"{out}.q", scale, *([zero] if zero else [])], [scaled], axis=0)]
    if offset:
        nodes.append(helper.make_node("Add", [scaled, offset], [out]))
    return nodes


def dequantize_nodes(weight: str, out: str, offset: bool = False, packed: bool = True) -> list[onnx.NodeProto]:
    """Nodes computing fp32 ``out`` = the stored ``weight`` ``S`` (``offset``: it has ``<W>.offset``; not
    ``packed``: a Q8_0 matrix's ``<W>.q8``): three to eight, so that the copies made at each use
    (``recompute.dequantize_at_use``) add few nodes to the session."""
    t = f"{out}.int4"
    nodes = _unpack(f"{weight}.int4", f"{t}.q") if packed else []
    nodes += _dequantize_blocks(f"{t}.q" if packed else f"{weight}.q8", f"{weight}.scale",
                                f"{weight}.zero" if packed else None, f"{t}.blocks",
                                f"{weight}.offset" if offset else None)
    nodes.append(helper.make_node("Reshape", [f"{t}.blocks", f"{weight}.shape"], [out]))
    for k, node in enumerate(nodes):
        node.name = f"{out}{END}" if k == len(nodes) - 1 else f"{out}{MARK}{k if k or packed else ROOT}"
    return nodes


def _row_range(out: str, start: int, stop: int, zero: str, row_blocks: int = 0) -> list[onnx.NodeProto]:
    """Nodes making a row slice's bounds, int64 [1]: ``{out}.rows.start``/``.stop`` (and with ``row_blocks`` the same
    in blocks, ``.block_start``/``.block_stop``), and ``.axis`` [0]. The first indices add ``zero`` (a computed int64
    [0]): a slice of a stored array at constant bounds would be folded, or fused with its neighbours into one
    ``Split`` of the whole array, by ONNX Runtime's graph optimizations."""
    make = helper.make_node
    p = f"{out}.rows"
    values = {"first": [start], "stop": [stop], "axis": [0],
              **({"block_first": [start * row_blocks], "block_stop": [stop * row_blocks]} if row_blocks else {})}
    nodes = [make("Constant", [], [f"{p}.{k}"], value=numpy_helper.from_array(np.array(v, np.int64)))
             for k, v in values.items()]
    firsts = ("", "block_") if row_blocks else ("",)
    return nodes + [make("Add", [f"{p}.{at}first", zero], [f"{p}.{at}start"]) for at in firsts]


def _row_slice(array: str, out: str, part: str, at: str = "", axis: str = "axis") -> onnx.NodeProto:
    p = f"{out}.rows"
    return helper.make_node("Slice", [array, f"{p}.{at}start", f"{p}.{at}stop", f"{p}.{axis}"], [f"{p}.{part}"],
                            name=f"{out}{MARK}rows.{part}")


def row_slice_nodes(weight: str, width: int, row_blocks: int, start: int, stop: int, out: str, zero: str,
                    offset: bool = False, packed: bool = True) -> list[onnx.NodeProto]:
    """Nodes computing fp32 ``out`` = rows ``start:stop`` of the stored ``weight`` (rows ``width`` wide, ``row_blocks``
    blocks a row; ``zero`` as in ``_row_range``; ``offset``/``packed`` as in ``dequantize_nodes``): only those rows'
    codes, scales, zero points and offsets are sliced out and dequantized (an LM head read a vocabulary slice at a
    time). Its ``Slice`` nodes are roots: a copy made at use waits on their first index (``pinned``) and slices when
    it is read."""
    constants = _row_range(out, start, stop, zero, row_blocks)
    parts = [("int4" if packed else "q8", ""), ("scale", "block_"), *([("zero", "block_")] if packed else []),
             *([("offset", "block_")] if offset else [])]
    shape = numpy_helper.from_array(np.array([stop - start, width], np.int64))
    constants.append(helper.make_node("Constant", [], [f"{out}.rows.shape"], value=shape))
    return (constants + [_row_slice(f"{weight}.{part}", out, part, at) for part, at in parts]
            + dequantize_nodes(f"{out}.rows", out, offset, packed))


def int8_row_slice_nodes(dequantize: onnx.NodeProto, axis: int, per_row_scales: bool, start: int, stop: int,
                         out: str, zero: str) -> list[onnx.NodeProto]:
    """Nodes computing fp32 ``out`` = rows ``start:stop`` along ``axis`` of a per-channel int8 weight read through
    ``dequantize`` (its ``DequantizeLinear``), slicing its scales (and zero points) too when they run along ``axis``
    (``per_row_scales``); a chain like ``row_slice_nodes``'s, so that it is copied at each use."""
    constants = _row_range(out, start, stop, zero)
    constants.append(helper.make_node("Constant", [], [f"{out}.rows.along"],
                                      value=numpy_helper.from_array(np.array([axis], np.int64))))
    q, *scales = dequantize.input
    sliced = [_row_slice(name, out, part) for name, part in zip(scales, ("scale", "zero")) if name and per_row_scales]
    chain = [_row_slice(q, out, "q", axis="along"), *sliced]
    last = onnx.NodeProto()
    last.CopyFrom(dequantize)
    last.input[:] = [f"{out}.rows.q", *(n.output[0] for n in sliced)] if per_row_scales else [f"{out}.rows.q", *scales]
    last.output[:] = [out]
    last.name = f"{out}{END}"
    return constants + chain + [last]


def gather_nodes(weight: str, width: int, block: int, indices: str, out: str, offset: bool = False,
                 packed: bool = True) -> list[onnx.NodeProto]:
    """Nodes computing fp32 ``out`` = rows ``indices`` of the stored ``weight`` (``width`` wide; ``offset``: it has
    ``<W>.offset``; not ``packed``: a Q8_0 matrix): only the gathered rows are unpacked and dequantized
    (embeddings)."""
    make = helper.make_node
    t = f"{out}.int4"
    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return make("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))

    nodes = [const(f"{t}.table", [-1, width // block]), const(f"{t}.flat", [-1]), const(f"{t}.width", [width]),
             const(f"{t}.column", [-1, 1])]
    # the stored blocks a table row a weight row, gathered, flat again (offsets: a column, as stored)
    parts = [("scale", "flat"), *([("zero", "flat")] if packed else []), *([("offset", "column")] if offset else [])]
    for part, shape in parts:
        nodes += [make("Reshape", [f"{weight}.{part}", f"{t}.table"], [f"{t}.{part}_table"]),
                  make("Gather", [f"{t}.{part}_table", indices], [f"{t}.{part}_rows"], axis=0),
                  make("Reshape", [f"{t}.{part}_rows", f"{t}.{shape}"], [f"{t}.{part}"])]
    nodes.append(make("Gather", [f"{weight}.int4" if packed else f"{weight}.q8", indices], [f"{t}.packed"], axis=0))
    nodes += _unpack(f"{t}.packed", f"{t}.q") if packed else []
    nodes += _dequantize_blocks(f"{t}.q" if packed else f"{t}.packed", f"{t}.scale", f"{t}.zero" if packed else None,
                                f"{t}.blocks", f"{t}.offset" if offset else None)
    nodes += [
        make("Shape", [indices], [f"{t}.index_shape"]),
        make("Concat", [f"{t}.index_shape", f"{t}.width"], [f"{t}.shape"], axis=0),
        make("Reshape", [f"{t}.blocks", f"{t}.shape"], [out]),
    ]
    return nodes


def stored(weight: str, packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, offset: np.ndarray | None = None
           ) -> list[onnx.TensorProto]:
    """The initializers of one quantized weight (its nibbles, scales, zero points, offsets if any, and its shape)."""
    shape = np.array([packed.shape[0], 2 * packed.shape[1]], np.int64)
    arrays = [packed, scale, zero, *([] if offset is None else [offset])]
    return [*(numpy_helper.from_array(a, n) for a, n in zip(arrays, stored_names(weight))),
            numpy_helper.from_array(shape, f"{weight}.shape")]


def stored_q8(weight: str, codes: np.ndarray, scale: np.ndarray) -> list[onnx.TensorProto]:
    """The initializers of one Q8_0 matrix (its int8 codes, block scales and shape)."""
    return [numpy_helper.from_array(codes, f"{weight}.q8"), numpy_helper.from_array(scale, f"{weight}.scale"),
            numpy_helper.from_array(np.array(codes.shape, np.int64), f"{weight}.shape")]


def stored_names(weight: str) -> list[str]:
    """The names of a stored 4-bit weight's arrays, in ``dequantize``'s order; the last (the offset) only a Q4_1
    matrix has."""
    return [f"{weight}.int4", f"{weight}.scale", f"{weight}.zero", f"{weight}.offset"]


def products_as_gemm(proto: onnx.ModelProto) -> int:
    """Rewrite every ``FusedMatMul(A, S, transB=1)`` as ``Gemm`` on ``A`` reshaped to 2-D (ORT 1.19 can
    differentiate that); returns how many."""
    make = helper.make_node
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in proto.graph.node:
        if node.op_type != "FusedMatMul" or node.domain != MS_DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs != {"transB": 1}:
            raise RuntimeError(f"{node.name}: no Gemm form for FusedMatMul with {attrs}")
        a, y, t, n = node.input[0], node.output[0], f"{node.output[0]}.gemm", node.name
        nodes += [  # named in the product's scope: recompute.checkpoint_blocks counts them in its block
            make("Shape", [a], [f"{t}.lead"], name=f"{n}/lead", end=-1),
            make("Shape", [a], [f"{t}.last"], name=f"{n}/last", start=-1),
            make("Concat", [MINUS_ONE, f"{t}.last"], [f"{t}.rows"], name=f"{n}/rows", axis=0),
            make("Concat", [f"{t}.lead", MINUS_ONE], [f"{t}.shape"], name=f"{n}/shape", axis=0),
            make("Reshape", [a, f"{t}.rows"], [f"{t}.a"], name=f"{n}/to_2d"),
            make("Gemm", [f"{t}.a", node.input[1]], [f"{t}.y"], name=n, transB=1),
            make("Reshape", [f"{t}.y", f"{t}.shape"], [y], name=f"{n}/from_2d"),
        ]
        count += 1
    if count:
        proto.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), MINUS_ONE))
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return count


def transposed_product(node: onnx.NodeProto, k: int, s: str) -> onnx.NodeProto | None:
    """``node`` reading ``S^T`` at input ``k``, rewritten to read ``S`` itself; None when it cannot be."""
    trans = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and k == 1:
        return helper.make_node("FusedMatMul", [node.input[0], s], list(node.output), name=node.name,
                                domain=MS_DOMAIN, transB=1)
    if node.op_type in ("Gemm", "FusedMatMul") and k == 1 and not trans.get("transBatchB", 0):
        flipped = onnx.NodeProto()
        flipped.CopyFrom(node)
        flipped.input[1] = s
        del flipped.attribute[:]
        flipped.attribute.extend(helper.make_attribute(n, v) for n, v in trans.items() if n != "transB")
        flipped.attribute.append(helper.make_attribute("transB", 1 - int(trans.get("transB", 0))))
        return flipped
    return None
