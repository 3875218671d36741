"""The portable step's causal-LM head and loss on target tokens only, in vocabulary slices, with their gradient
written out.

The target rows come from ``loss_graph.target_rows`` (one part). The head ``W`` [V, H] is read a slice of rows
at a time, through a ``Gather`` of that slice's row numbers, so a quantized base dequantizes only that slice
(``graph.quantize_int8`` / ``quantize_int4`` dequantize a ``Gather``'s rows alone) and no fp32 copy of the whole
head exists. Two passes over the slices:

- forward: per slice ``logits = rows W_s^T`` (soft-capped ``tanh(x / c) * c`` where the family does), its
  ``log-sum-exp`` per row, and the target's logit where the target falls in the slice; the loss is the sum over
  rows of ``logsumexp(all slices) - target logit``, over the number of targets;
- backward: per slice the logits again, ``d logits = (exp(logits - logsumexp) - onehot(target)) * loss_scale /
  targets`` (times ``1 - tanh^2`` under soft-capping) and ``d rows += d logits W_s``; the rows' gradients are
  scattered back to their positions, zeros elsewhere.

Each slice's row numbers are pinned to everything the previous slice computes from its logits
(``recompute.late_value``), so ONNX Runtime makes and frees one slice's weights and ``[targets, V / slices]``
tensors at a time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import recompute
from .loss_graph import target_rows

P = "head_loss."


def _const(name: str, value, dtype=np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype), name))


def slice_bounds(vocab: int, slices: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of ``slices`` near-equal parts of a ``vocab``-row head (none empty)."""
    edges = np.linspace(0, vocab, min(slices, vocab) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _logits(q: str, rows: str, weight: str, start: int, stop: int, trigger: str,
            softcap: float | None) -> tuple[list[onnx.NodeProto], str, str | None]:
    """Nodes computing slice ``[start, stop)``'s (soft-capped) logits once ``trigger`` exists; returns them, the
    logits' name and, under soft-capping, the name of their ``tanh``."""
    make = helper.make_node
    nodes = [_const(q + "ids", np.arange(start, stop))]
    nodes += recompute.late_value(q + "ids", trigger, q + "late_ids")
    nodes += [make("Gather", [weight, q + "late_ids"], [q + "weight"], axis=0),
              make("Gemm", [rows, q + "weight"], [q + "logits"], transB=1)]
    if not softcap:
        return nodes, q + "logits", None
    nodes += [make("Div", [q + "logits", P + "cap"], [q + "scaled"]),
              make("Tanh", [q + "scaled"], [q + "tanh"]),
              make("Mul", [q + "tanh", P + "cap"], [q + "capped"])]
    return nodes, q + "capped", q + "tanh"


def _target_column(q: str, start: int, stop: int) -> list[onnx.NodeProto]:
    """``{q}column`` ([N, 1] int64): each target's column in slice ``[start, stop)``, clipped into it, and
    ``{q}inside`` ([N, 1] fp32): 1 where the target falls in the slice."""
    make = helper.make_node
    return [_const(q + "start", start), _const(q + "last", stop - start - 1),
            make("Sub", [P + "target_col", q + "start"], [q + "local"]),
            make("Clip", [q + "local", P + "first_column", q + "last"], [q + "column"]),
            make("Equal", [q + "local", q + "column"], [q + "inside_bool"]),
            make("Cast", [q + "inside_bool"], [q + "inside"], to=TensorProto.FLOAT)]


def head_loss_nodes(normed: str, labels: str, loss_scale: str, weight: str, hidden_size: int, vocab: int,
                    softcap: float | None, slices: int, loss: str, d_normed: str) -> list[onnx.NodeProto]:
    """Nodes (opset 18) computing ``loss`` (mean cross-entropy over labels != -100 of the head ``weight`` [``vocab``, H]
    applied to ``normed`` [B, T, H], read in ``slices`` row slices) and ``d_normed``, the gradient of
    ``loss_scale * loss`` with respect to ``normed``."""
    make = helper.make_node
    nodes = [
        _const(P + "flat_shape", [-1, hidden_size]),
        make("Reshape", [normed, P + "flat_shape"], [P + "hidden"]),
        _const(P + "flat", [-1]),
        make("Reshape", [labels, P + "flat"], [P + "labels"]),
    ]
    nodes += target_rows(P + "hidden", P + "labels", 1, P)
    rows = P + "rows.0"
    nodes += [
        _const(P + "one", 1.0, np.float32),
        make("Max", [P + "count", P + "one"], [P + "divisor"]),
        make("Div", [loss_scale, P + "divisor"], [P + "factor"]),
        _const(P + "first_column", 0),
        _const(P + "axis1", [1]),
        make("Unsqueeze", [P + "targets.0", P + "axis1"], [P + "target_col"]),
    ]
    if softcap:
        nodes.append(_const(P + "cap", float(softcap), np.float32))
    bounds = slice_bounds(vocab, slices)
    for s, (start, stop) in enumerate(bounds):  # [N, 1] each, read by both passes
        nodes += _target_column(f"{P}t{s}.", start, stop)
    trigger, sums, hits = rows, [], []
    for s, (start, stop) in enumerate(bounds):
        q, t = f"{P}f{s}.", f"{P}t{s}."
        made, logits, _ = _logits(q, rows, weight, start, stop, trigger, softcap)
        nodes += made
        nodes += [make("ReduceLogSumExp", [logits, P + "axis1"], [q + "lse"], keepdims=1),
                  make("GatherElements", [logits, t + "column"], [q + "at_target"], axis=1),
                  make("Mul", [q + "at_target", t + "inside"], [q + "hit"]),
                  make("Concat", [q + "lse", q + "hit"], [q + "done"], axis=1)]  # both read the logits first
        sums.append(q + "lse")
        hits.append(q + "hit")
        trigger = q + "done"
    nodes += [
        make("Concat", sums, [P + "slice_lse"], axis=1),
        make("ReduceLogSumExp", [P + "slice_lse", P + "axis1"], [P + "lse"], keepdims=1),
        make("Sum", hits, [P + "target_logit"]),
        make("Sub", [P + "lse", P + "target_logit"], [P + "row_loss"]),
        make("ReduceSum", [P + "row_loss"], [P + "total"], keepdims=0),
        make("Div", [P + "total", P + "divisor"], [loss]),
    ]
    trigger, d_rows = P + "row_loss", None  # after every forward slice's log-sum-exp and target logit
    for s, (start, stop) in enumerate(bounds):
        q, t = f"{P}b{s}.", f"{P}t{s}."
        made, logits, tanh = _logits(q, rows, weight, start, stop, trigger, softcap)
        nodes += made
        nodes += [
            make("Sub", [logits, P + "lse"], [q + "shifted"]),
            make("Exp", [q + "shifted"], [q + "probs"]),
            make("GatherElements", [q + "probs", t + "column"], [q + "p_target"], axis=1),
            make("Sub", [q + "p_target", t + "inside"], [q + "p_minus_hit"]),
            make("ScatterElements", [q + "probs", t + "column", q + "p_minus_hit"], [q + "residual"], axis=1),
            make("Mul", [q + "residual", P + "factor"], [q + "d_logits"]),
        ]
        d_logits = q + "d_logits"
        if tanh:
            nodes += [make("Mul", [tanh, tanh], [q + "tanh2"]),
                      make("Sub", [P + "one", q + "tanh2"], [q + "slope"]),
                      make("Mul", [d_logits, q + "slope"], [q + "d_uncapped"])]
            d_logits = q + "d_uncapped"
        nodes.append(make("MatMul", [d_logits, q + "weight"], [q + "d_rows"]))
        if d_rows is not None:
            nodes.append(make("Add", [d_rows, q + "d_rows"], [q + "d_rows_sum"]))
        d_rows = q + "d_rows_sum" if s else q + "d_rows"
        trigger = d_rows
    nodes += [
        make("Shape", [P + "hidden"], [P + "hidden_shape"]),
        _const(P + "zero_float", [0.0], np.float32),
        make("Expand", [P + "zero_float", P + "hidden_shape"], [P + "zeros"]),
        make("Unsqueeze", [P + "index", P + "axis1"], [P + "scatter_index"]),
        make("ScatterND", [P + "zeros", P + "scatter_index", d_rows], [P + "d_hidden"]),
        make("Shape", [normed], [P + "normed_shape"]),
        make("Reshape", [P + "d_hidden", P + "normed_shape"], [d_normed]),
    ]
    return nodes
