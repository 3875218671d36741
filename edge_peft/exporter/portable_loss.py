"""The portable step's causal-LM head and loss on target tokens only, in chunks, with their gradient written out.

The forward is ``loss_graph.target_rows``' gather-pad-split, then per chunk ``logits = rows W^T`` (soft-capped
``tanh(x / c) * c`` where the family does) and a summed ``SoftmaxCrossEntropyLoss``; the loss is the sum over
chunks over the number of targets. Its gradient needs no autodiff: ``d logits = (softmax - onehot(target)) *
loss_scale / targets`` on target rows (times ``1 - tanh^2`` under soft-capping) and ``d rows = d logits W``; the
rows' gradients are scattered back to their positions, zeros elsewhere. Each chunk's rows are pinned to the
previous chunk's row gradient (``recompute.late_value``), so one chunk's ``[rows, vocabulary]`` tensors are alive
at a time instead of the ``[batch x sequence, vocabulary]`` logits, log-softmax and gradient of the whole batch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifact.manifest import IGNORE_INDEX
from . import recompute
from .loss_graph import target_rows

P = "head_loss."


def _const(name: str, value, dtype=np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype), name))


def head_loss_nodes(normed: str, labels: str, loss_scale: str, weight: str, hidden_size: int, vocab: int,
                    softcap: float | None, chunks: int, loss: str, d_normed: str) -> list[onnx.NodeProto]:
    """Nodes computing ``loss`` (mean cross-entropy over labels != -100 of the head ``weight`` [V, H] applied to
    ``normed`` [B, T, H]) and ``d_normed``, the gradient of ``loss_scale * loss`` with respect to ``normed``."""
    nodes = [
        _const(P + "flat_shape", [-1, hidden_size]),
        helper.make_node("Reshape", [normed, P + "flat_shape"], [P + "hidden"]),
        _const(P + "minus1", [-1]),
        helper.make_node("Reshape", [labels, P + "minus1"], [P + "labels"]),
    ]
    nodes += target_rows(P + "hidden", P + "labels", chunks, P)
    nodes += [
        _const(P + "one", 1.0, np.float32),
        helper.make_node("Max", [P + "count", P + "one"], [P + "divisor"]),
        helper.make_node("Div", [loss_scale, P + "divisor"], [P + "factor"]),
        helper.make_node("Transpose", [weight], [P + "weight_t"], perm=[1, 0]),
        _const(P + "depth", vocab),
        _const(P + "onehot_values", [0.0, 1.0], np.float32),
        _const(P + "ignore_row", IGNORE_INDEX),
        _const(P + "zero_label", 0),
        _const(P + "axis1", [1]),
    ]
    if softcap:
        nodes.append(_const(P + "cap", float(softcap), np.float32))
    sums, grads = [], []
    for k in range(chunks):
        q = f"{P}{k}."
        rows = f"{P}rows.{k}"
        if grads:
            nodes += recompute.late_value(rows, grads[-1], q + "rows")
            rows = q + "rows"
        targets = f"{P}targets.{k}"
        nodes.append(helper.make_node("MatMul", [rows, P + "weight_t"], [q + "logits"]))
        logits = q + "logits"
        if softcap:
            nodes += [helper.make_node("Div", [logits, P + "cap"], [q + "scaled"]),
                      helper.make_node("Tanh", [q + "scaled"], [q + "tanh"]),
                      helper.make_node("Mul", [q + "tanh", P + "cap"], [q + "capped"])]
            logits = q + "capped"
        nodes += [
            helper.make_node("SoftmaxCrossEntropyLoss", [logits, targets], [q + "sum", q + "log_probs"],
                             reduction="sum", ignore_index=IGNORE_INDEX),
            helper.make_node("Exp", [q + "log_probs"], [q + "probs"]),
            helper.make_node("Equal", [targets, P + "ignore_row"], [q + "ignored"]),
            helper.make_node("Where", [q + "ignored", P + "zero_label", targets], [q + "safe_targets"]),
            helper.make_node("OneHot", [q + "safe_targets", P + "depth", P + "onehot_values"], [q + "onehot"], axis=-1),
            helper.make_node("Sub", [q + "probs", q + "onehot"], [q + "residual"]),
            helper.make_node("Not", [q + "ignored"], [q + "kept"]),
            helper.make_node("Cast", [q + "kept"], [q + "kept_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [q + "kept_float", P + "factor"], [q + "weight_row"]),
            helper.make_node("Unsqueeze", [q + "weight_row", P + "axis1"], [q + "weight_col"]),
            helper.make_node("Mul", [q + "residual", q + "weight_col"], [q + "d_logits"]),
        ]
        d_logits = q + "d_logits"
        if softcap:
            nodes += [helper.make_node("Mul", [q + "tanh", q + "tanh"], [q + "tanh2"]),
                      helper.make_node("Sub", [P + "one", q + "tanh2"], [q + "slope"]),
                      helper.make_node("Mul", [d_logits, q + "slope"], [q + "d_uncapped"])]
            d_logits = q + "d_uncapped"
        nodes.append(helper.make_node("MatMul", [d_logits, weight], [q + "d_rows"]))
        sums.append(q + "sum")
        grads.append(q + "d_rows")
    nodes += [
        helper.make_node("Sum", sums, [P + "total"]),
        helper.make_node("Div", [P + "total", P + "divisor"], [loss]),
        helper.make_node("Concat", grads, [P + "d_rows_padded"], axis=0),
        _const(P + "start", [0]),
        helper.make_node("Slice", [P + "d_rows_padded", P + "start", P + "n"], [P + "d_rows"]),
        helper.make_node("Shape", [P + "hidden"], [P + "hidden_shape"]),
        _const(P + "zero_float", [0.0], np.float32),
        helper.make_node("Expand", [P + "zero_float", P + "hidden_shape"], [P + "zeros"]),
        helper.make_node("Unsqueeze", [P + "index", P + "axis1"], [P + "scatter_index"]),
        helper.make_node("ScatterND", [P + "zeros", P + "scatter_index", P + "d_rows"], [P + "d_hidden"]),
        helper.make_node("Shape", [normed], [P + "normed_shape"]),
        helper.make_node("Reshape", [P + "d_hidden", P + "normed_shape"], [d_normed]),
    ]
    return nodes
