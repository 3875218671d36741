"""Frozen-base matrix products in int8: the portable step graph's ``MatMul(X, DequantizeLinear(W))`` become
``MatMulInteger`` with int32 accumulation, in the forward ``X W`` and in the input gradient ``dY W^T`` alike.
X (or dY) is quantized per row (per token) on the fly, symmetric int8, because the per-tensor quantization of
``DynamicQuantizeMatMul`` loses too much to the activation outliers of LLMs; it is stored as uint8 with zero
point 128, because onnxruntime's x86 kernels multiply uint8 x int8 several times faster than int8 x int8.

A weight is stored once per orientation it is read in (``W`` for the forward, ``W^T`` for the backward), so
neither orientation is transposed or dequantized during a step. Per-channel weight scales along the product's
output axis scale the result's columns; scales along the reduced axis (the backward's view of a weight
quantized per output channel) scale the activation's columns before it is quantized:
``dY diag(s) Wq^T = (dY * s) Wq^T``. Adapters, norms, softmax, the loss and the optimizer stay fp32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import _attr, drop_unread_nodes

INV_127 = "int8_compute.inv_127"
OFFSET, ZERO_POINT = "int8_compute.offset", "int8_compute.zero_point"  # symmetric int8 stored as uint8 - 128
TINY = "int8_compute.tiny"
LAST_AXIS = "int8_compute.last_axis"


def int8_compute(proto: onnx.ModelProto) -> int:
    """Rewrite every ``MatMul`` whose right operand is a dequantized 2-D int8 weight (an initializer, or a
    ``Transpose`` of one) as a row-quantized ``MatMulInteger``; returns how many were rewritten."""
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        weight = _int8_weight(graph, dq, producers, inits) if dq is not None else None
        if weight is None:
            nodes.append(node)
            continue
        scale, axis = dq.input[1], _attr(dq, "axis", 1)
        nodes += _row_quantized_matmul(node.input[0], weight, scale, axis, node.output[0])
        rewritten += 1
    if not rewritten:
        return 0
    graph.initializer.extend([numpy_helper.from_array(np.array(1 / 127, np.float32), INV_127),
                              numpy_helper.from_array(np.array(1e-30, np.float32), TINY),
                              numpy_helper.from_array(np.array([-1], np.int64), LAST_AXIS),
                              numpy_helper.from_array(np.array(128, np.float32), OFFSET),
                              numpy_helper.from_array(np.array(128, np.uint8), ZERO_POINT)])
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return rewritten


def _row_quantized_matmul(x: str, weight: str, scale: str, axis: int, out: str) -> list[onnx.NodeProto]:
    """``out = X @ (Wq * scale)`` with X quantized per row: ``(round(X / sx) @ Wq) * sx * scale``."""
    t = f"{out}.q"
    make = helper.make_node
    nodes = []
    if axis == 0:  # the weight's scale runs along the reduced axis: move it onto X's columns
        nodes.append(make("Mul", [x, scale], [f"{t}.x"]))
        x = f"{t}.x"
    nodes += [
        make("Abs", [x], [f"{t}.abs"]),
        make("ReduceMax", [f"{t}.abs", LAST_AXIS], [f"{t}.amax"], keepdims=1),
        make("Mul", [f"{t}.amax", INV_127], [f"{t}.sx0"]),
        make("Max", [f"{t}.sx0", TINY], [f"{t}.sx"]),
        make("Div", [x, f"{t}.sx"], [f"{t}.scaled"]),
        make("Round", [f"{t}.scaled"], [f"{t}.rounded"]),
        make("Add", [f"{t}.rounded", OFFSET], [f"{t}.shifted"]),
        make("Cast", [f"{t}.shifted"], [f"{t}.uint8"], to=TensorProto.UINT8),
        make("MatMulInteger", [f"{t}.uint8", weight, ZERO_POINT], [f"{t}.int32"]),
        make("Cast", [f"{t}.int32"], [f"{t}.f"], to=TensorProto.FLOAT),
    ]
    if axis == 0:
        nodes.append(make("Mul", [f"{t}.f", f"{t}.sx"], [out]))
    else:
        nodes += [make("Mul", [f"{t}.f", f"{t}.sx"], [f"{t}.rows"]), make("Mul", [f"{t}.rows", scale], [out])]
    return nodes


def _int8_weight(graph: onnx.GraphProto, dq: onnx.NodeProto, producers: dict, inits: dict) -> str | None:
    """The stored int8 [K, N] matrix a ``DequantizeLinear`` without zero point reads (storing the transpose of
    an initializer it reads through ``Transpose`` as ``<name>.t``); None for anything else."""
    if dq.op_type != "DequantizeLinear" or len(dq.input) != 2:
        return None
    source, transpose = dq.input[0], producers.get(dq.input[0])
    if transpose is not None and transpose.op_type == "Transpose" and list(_attr(transpose, "perm", [1, 0])) == [1, 0]:
        stored = inits.get(transpose.input[0])
        if not _is_int8_matrix(stored):
            return None
        source = f"{stored.name}.t"
        if source not in inits:
            inits[source] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(stored).T), source)
            graph.initializer.append(inits[source])
        return source
    return source if _is_int8_matrix(inits.get(source)) else None


def _is_int8_matrix(init: onnx.TensorProto | None) -> bool:
    return init is not None and init.data_type == TensorProto.INT8 and len(init.dims) == 2


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (the replaced dequantizations and transposes)."""
    drop_unread_nodes(graph)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    kept_inits = [i for i in graph.initializer if i.name in read or i.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
