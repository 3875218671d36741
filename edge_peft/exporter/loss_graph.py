"""A causal LM's training loss computed on the target tokens only, in chunks of the LM head.

The naive training graph computes logits ``[B*T, V]`` for every position, then the cross-entropy;
ORT keeps the logits, their log-softmax and their gradient: a few times ``B*T*V`` floats at the
peak (the ``logit`` memory factor of ``backends.base.MemoryFactors``). Here the LM head's input is instead

1. gathered at the positions whose (already shifted) label is not -100: ``[N, H]``, N <= B*T
   (padding and prompt tokens never reach the head);
2. padded with ignored rows to a multiple of ``chunks`` and split into ``chunks`` equal parts; each
   part gets its own head ``MatMul`` and a summed ``SoftmaxCrossEntropyLoss``, so only one part's
   logits and logit gradient are alive at a time (each part's log-softmax is still kept for backward).

3. with a quantized head, each part's product is cut into ``chunks`` vocabulary slices whose logits are
   concatenated: each slice of the head is dequantized on its own where it is read (``int4.row_slice_nodes``,
   ``int4.int8_row_slice_nodes``; ``recompute.dequantize_at_use`` makes a copy at each read), so at any time one
   slice of the head is in fp32, not all of it.

The loss is the sum over parts divided by N: the mean cross-entropy over targets, exactly the naive
loss (only the order of the floating-point sum changes). Element-wise ops between the head and the
logits (Gemma 2's final soft-capping ``tanh(x / c) * c``) are applied to each part's logits.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifact.manifest import IGNORE_INDEX
from . import graph as graph_ops
from . import int4

LOSS_CHUNKS = 8
TARGET_LOSS = "target_loss"
LABELS = "labels"


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))


SOFTCAP_OPS = ("Div", "Tanh", "Mul")  # logit soft-capping: tanh(x / cap) * cap
HEAD_OPS = ("MatMul", "FusedMatMul")  # FusedMatMul: an int4 head read as stored (int4.transposed_product)


def _head(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, list[onnx.NodeProto]]:
    """The LM head's MatMul and the element-wise ops from its output to ``logits`` (soft-capping), in order.

    Each of those ops reads the previous one's output as its first input and only constants otherwise."""
    producer = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    tail: list[onnx.NodeProto] = []
    node = producer.get("logits")
    while node is not None and node.op_type in SOFTCAP_OPS and all(i in constants for i in node.input[1:]):
        tail.insert(0, node)
        node = producer.get(node.input[0])
    if node is None or node.op_type not in HEAD_OPS:
        raise RuntimeError(f"the LM head is not a MatMul (then soft-capping) producing 'logits': "
                           f"{[n.op_type for n in tail]} after {node.op_type if node is not None else 'a graph input'}")
    return node, tail


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _sliced_head(graph: onnx.GraphProto, head: onnx.NodeProto, slices: int, zero: str
                 ) -> tuple[list[onnx.NodeProto], list[str]] | None:
    """The head's stored quantized weight as ``slices`` vocabulary slices (their bounds computed with ``zero``, a
    computed int64 [0], ``int4._row_range``), each dequantized by its own nodes:
    (those nodes, the slices' fp32 names in vocabulary order); None when the weight is not stored quantized, or not
    in rows along the vocabulary."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    weight = head.input[1]
    last = producer.get(weight)
    if last is None or slices < 2:
        return None
    attrs = _attrs(head)
    vocab_axis = 0 if attrs.get("transB", 0) else 1
    if set(attrs) - {"transB"}:
        return None
    if last.op_type == "DequantizeLinear" and all(i in inits for i in last.input if i):
        dims = list(inits[last.input[0]].dims)
        scales = list(inits[last.input[1]].dims)
        per_row = len(scales) == 1 and scales[0] > 1 and _attrs(last).get("axis", 1) == vocab_axis
        vocab = dims[vocab_axis]
        make = lambda start, stop, out: int4.int8_row_slice_nodes(last, vocab_axis, per_row, start, stop, out, zero)
    elif int4.is_chain_end(last) and last.input[1].endswith(".shape") and vocab_axis == 0:
        stored = last.input[1][: -len(".shape")]
        vocab, width = (int(v) for v in numpy_helper.to_array(inits[stored + ".shape"]))
        row_blocks = int(np.prod(inits[stored + ".scale"].dims)) // vocab
        packed, offset = stored + ".int4" in inits, stored + ".offset" in inits
        make = lambda start, stop, out: int4.row_slice_nodes(stored, width, row_blocks, start, stop, out, zero,
                                                             offset, packed)
    else:
        return None
    bounds = [vocab * k // slices for k in range(slices + 1)]
    nodes: list[onnx.NodeProto] = []
    names = [f"{weight}.vocab{k}" for k in range(slices)]
    for k, name in enumerate(names):
        nodes += make(bounds[k], bounds[k + 1], name)
    return nodes, names


def _chunk_product(head: onnx.NodeProto, rows: str, weight: str, out: str, name: str) -> onnx.NodeProto:
    """``head`` on one part's ``rows`` ([n, H]) and ``weight``: a ``MatMul`` stays one; a head read as stored
    (``FusedMatMul`` with ``transB``) becomes the ``Gemm`` it is on 2-D rows, which ORT 1.19 can differentiate."""
    if head.op_type == "FusedMatMul" and set(_attrs(head)) == {"transB"}:
        return helper.make_node("Gemm", [rows, weight], [out], name=name, transB=_attrs(head)["transB"])
    product = onnx.NodeProto()
    product.CopyFrom(head)
    product.name = name
    product.input[0], product.input[1], product.output[0] = rows, weight, out
    return product


def target_rows(hidden: str, labels: str, chunks: int, p: str) -> list[onnx.NodeProto]:
    """Nodes that gather the rows of ``hidden`` ([N, H]) whose flat ``labels`` are not -100 and split them, padded
    with ignored rows, into ``chunks`` equal parts: ``{p}rows.k`` and ``{p}targets.k``; also ``{p}index`` (the rows'
    positions), ``{p}n`` ([1] int64) and ``{p}count`` (their number as a float scalar)."""
    return [
        _const(p + "ignore", [IGNORE_INDEX]),
        helper.make_node("Equal", [labels, p + "ignore"], [p + "ignored"]),
        helper.make_node("Not", [p + "ignored"], [p + "kept"]),
        helper.make_node("NonZero", [p + "kept"], [p + "where"]),
        _const(p + "minus1", [-1]),
        helper.make_node("Reshape", [p + "where", p + "minus1"], [p + "index"]),
        helper.make_node("Gather", [hidden, p + "index"], [p + "rows"], axis=0),
        helper.make_node("Gather", [labels, p + "index"], [p + "targets"], axis=0),
        helper.make_node("Shape", [p + "targets"], [p + "n"]),
        helper.make_node("Cast", [p + "n"], [p + "n_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", [p + "n_float"], [p + "count"], keepdims=0),
        # pad N up to chunks * ceil(N / chunks) with ignored rows, so Split can cut equal parts
        _const(p + "chunks", [chunks]),
        _const(p + "chunks_minus1", [chunks - 1]),
        helper.make_node("Add", [p + "n", p + "chunks_minus1"], [p + "n_up"]),
        helper.make_node("Div", [p + "n_up", p + "chunks"], [p + "per_chunk"]),
        helper.make_node("Mul", [p + "per_chunk", p + "chunks"], [p + "padded"]),
        helper.make_node("Sub", [p + "padded", p + "n"], [p + "extra"]),
        _const(p + "zero", [0]),
        helper.make_node("Concat", [p + "zero", p + "zero", p + "extra", p + "zero"], [p + "row_pads"], axis=0),
        helper.make_node("Concat", [p + "zero", p + "extra"], [p + "label_pads"], axis=0),
        helper.make_node("Pad", [p + "rows", p + "row_pads"], [p + "rows_padded"]),
        _const(p + "ignore_scalar_shape", []),
        helper.make_node("Reshape", [p + "ignore", p + "ignore_scalar_shape"], [p + "ignore_scalar"]),
        helper.make_node("Pad", [p + "targets", p + "label_pads", p + "ignore_scalar"], [p + "targets_padded"]),
        helper.make_node("Split", [p + "rows_padded"], [f"{p}rows.{k}" for k in range(chunks)], axis=0),
        helper.make_node("Split", [p + "targets_padded"], [f"{p}targets.{k}" for k in range(chunks)], axis=0),
    ]


def target_loss_graph(proto: onnx.ModelProto, hidden_size: int, chunks: int = LOSS_CHUNKS) -> int:
    """Replace the ``logits`` output by ``target_loss`` (mean CE over labels != -100), taking flat ``labels``;
    returns the vocabulary slices the head is read in (1: whole)."""
    graph = proto.graph
    head, tail = _head(graph)
    hidden = head.input[0]
    p = "target_loss."
    sliced = _sliced_head(graph, head, chunks, p + "vocab_zero")
    removed = {id(head)} | {id(n) for n in tail}
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    nodes = [_const(p + "flat", [-1, hidden_size]), helper.make_node("Reshape", [hidden, p + "flat"], [p + "hidden"])]
    nodes += target_rows(p + "hidden", LABELS, chunks, p)
    weights = [head.input[1]] if sliced is None else sliced[1]
    if sliced is not None:
        nodes += [helper.make_node("Mul", [p + "n", p + "zero"], [p + "vocab_zero"]), *sliced[0]]
    sums = []
    for k in range(chunks):
        logits = f"{p}head.{k}"
        for j, weight in enumerate(weights):
            out = logits if len(weights) == 1 else f"{logits}.{j}"
            nodes.append(_chunk_product(head, f"{p}rows.{k}", weight, out, f"{p}head_product.{k}.{j}"))
        if len(weights) > 1:
            nodes.append(helper.make_node("Concat", [f"{logits}.{j}" for j in range(len(weights))], [logits],
                                          axis=-1))
        for j, op in enumerate(tail):
            capped = onnx.NodeProto()
            capped.CopyFrom(op)
            capped.name = f"{p}{op.op_type}.{j}.{k}"
            capped.input[0], capped.output[0] = logits, f"{p}{op.op_type}.{j}.{k}"
            logits = capped.output[0]
            nodes.append(capped)
        nodes.append(helper.make_node("SoftmaxCrossEntropyLoss", [logits, f"{p}targets.{k}"], [f"{p}sum.{k}"],
                                      reduction="sum", ignore_index=IGNORE_INDEX))
        sums.append(f"{p}sum.{k}")
    total = sums[0]
    for k, name in enumerate(sums[1:], start=1):
        nodes.append(helper.make_node("Add", [total, name], [f"{p}total.{k}"]))
        total = f"{p}total.{k}"
    nodes.append(helper.make_node("Div", [total, p + "count"], [TARGET_LOSS]))
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["N"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(TARGET_LOSS, TensorProto.FLOAT, []))
    if sliced is not None:
        graph_ops.drop_unread_nodes(graph)  # the whole head's dequantization, no longer read
    return len(weights)
