"""The checkpointed portable step split into pieces the runtime calls one after another, each distinct piece once.

ONNX Runtime keeps kilobytes of structures per node of a loaded graph; the stitched step of a 30-block model
has tens of thousands of nodes, nearly all of them the same block's forward and backward repeated. Cut at the
values ``portable_blocks`` stitches the blocks by (``hidden_value(i)``, the input of block ``i``, and
``grad_value(i)``, its gradient), a checkpointed step falls into pieces that read nothing of each other but those
values: the prologue (batch -> ``h0``), each block's forward (``h{i}`` -> ``h{i+1}``), the tail (``h{n}`` -> the
loss, ``g{n}`` and the gradients of tensors outside the blocks) and each block's recompute and backward
(``h{i}``, ``g{i+1}`` -> ``g{i}`` and the block's accumulated gradients). Values are renamed to their order in a
piece, so blocks alike give the same graph, written once. A piece reads its block's weights as inputs, which
the runtime (``backends/pieces.py``) feeds from ``weights.data`` by name.

Without checkpointing a block's backward reads its forward's activations: no cut exists and ``split`` returns None,
as it does when too few blocks are alike for the distinct pieces to hold fewer nodes than the whole step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..artifact.files import PORTABLE_PIECES, PORTABLE_PIECES_FORMAT, portable_piece
from ..artifact.names import LOSS, layer_index
from ..fileio import atomic_write_bytes, atomic_write_json
from .onnx_files import WeightsFile
from .portable_blocks import CONSTANT_PREFIX, grad_value, hidden_value

_INLINE_TYPES = (TensorProto.INT64, TensorProto.INT32)  # small integer tensors (shapes, axes) stay in the piece


@dataclass
class _Cut:
    """A piece before it is written: the step values it computes and the step values it stops at."""

    outputs: list[str]
    stops: set[str]


def _cuts(graph: onnx.GraphProto, produced: set[str]) -> tuple[list[_Cut], set[str]] | None:
    """The pieces in run order and the values they are cut at, or None when the step was not stitched block by
    block."""
    if hidden_value(0) not in produced:
        return None
    blocks = 0
    while hidden_value(blocks + 1) in produced:
        blocks += 1
    outputs = [o.name for o in graph.output]
    cuts = [_Cut([hidden_value(0)], set())]
    cuts += [_Cut([hidden_value(i + 1)], {hidden_value(i)}) for i in range(blocks)]
    last_grad = [grad_value(blocks)] if grad_value(blocks) in produced else []  # none when no block trains
    cuts.append(_Cut([LOSS, *last_grad, *[o for o in outputs if o != LOSS and layer_index(o) is None]],
                     {hidden_value(blocks)}))
    for i in reversed(range(blocks)):
        wanted = [grad_value(i)] if grad_value(i) in produced else []
        wanted += [o for o in outputs if layer_index(o) == i]
        if wanted:
            cuts.append(_Cut(wanted, {hidden_value(i), grad_value(i + 1)}))
    return cuts, {v for i in range(blocks + 1) for v in (hidden_value(i), grad_value(i)) if v in produced}


def _piece_nodes(nodes: list[onnx.NodeProto], producer: dict[str, int], cut: _Cut, sources: set[str],
                 boundary: set[str]) -> list[int] | None:
    """Indexes (in step order) of the nodes ``cut``'s outputs need, or None if they need a boundary value it does
    not stop at (a block's backward reading its forward's activations)."""
    seen: set[int] = set()
    stack = [producer[o] for o in cut.outputs if o in producer]
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        for value in nodes[k].input:
            if not value or value in cut.stops or value in sources:
                continue
            if value in boundary:
                return None
            stack.append(producer[value])
    return sorted(seen)


def _piece_graph(nodes: list[onnx.NodeProto], order: list[int], outputs: list[str],
                 initializers: dict[str, TensorProto], inputs: dict[str, onnx.ValueInfoProto]
                 ) -> tuple[onnx.GraphProto, list[tuple[str, str]]]:
    """The piece as a graph whose values are named by their order (``v*``, inputs ``i*``, outputs ``o*``), and
    what each input is bound to in the step."""
    made = {o for k in order for o in nodes[k].output if o}
    names = {o: f"o{j}" for j, o in enumerate(outputs)}
    reads: list[str] = []

    def rename(value: str) -> str:
        if value and value not in names:
            if value in made:
                names[value] = f"v{len(names)}"
            else:
                names[value] = f"i{len(reads)}"
                reads.append(value)
        return names.get(value, value)

    piece_nodes = []
    for j, k in enumerate(order):
        node = onnx.NodeProto()
        node.CopyFrom(nodes[k])
        node.name, node.doc_string = f"n{j}", ""
        node.input[:] = [rename(v) for v in node.input]
        node.output[:] = [rename(v) for v in node.output]
        piece_nodes.append(node)
    graph_inputs, constants, binding = [], [], []
    for value in reads:
        name = names[value]
        init = initializers.get(value)
        if init is not None and _inline(init):
            constant = TensorProto()
            constant.CopyFrom(init)
            constant.name = name
            constants.append(constant)
        elif init is not None:
            graph_inputs.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
            binding.append((name, value))
        else:
            info = onnx.ValueInfoProto()
            if value in inputs:
                info.CopyFrom(inputs[value])
            else:  # a boundary value: the hidden state or its gradient
                info.CopyFrom(helper.make_tensor_value_info(value, TensorProto.FLOAT, None))
            info.name = name
            graph_inputs.append(info)
            binding.append((name, value))
    graph_outputs = [helper.make_tensor_value_info(f"o{j}", TensorProto.FLOAT, None) for j in range(len(outputs))]
    return helper.make_graph(piece_nodes, "portable_piece", graph_inputs, graph_outputs, constants), binding


def _inline(init: TensorProto) -> bool:
    """Whether an initializer stays a constant of the piece (the step's merged constants, small integer tensors)
    rather than an input fed by name (weights, which differ from block to block)."""
    return init.name.startswith(CONSTANT_PREFIX) or (
        init.data_location != TensorProto.EXTERNAL and init.data_type in _INLINE_TYPES)


def split(proto: onnx.ModelProto, out: Path, weights: WeightsFile) -> int | None:
    """Write ``proto``'s pieces (``portable_piece(digest)`` graphs and the ``PORTABLE_PIECES`` plan) into ``out``,
    the weights they read by name into ``weights``; return the distinct pieces' node count, or None (nothing
    written) when the step has no cut or its pieces would not load fewer nodes than it. ``proto`` must have been
    saved through ``weights`` already."""
    graph = proto.graph
    nodes = list(graph.node)
    producer = {o: k for k, node in enumerate(nodes) for o in node.output if o}
    found = _cuts(graph, set(producer))
    if found is None:
        return None
    cuts, boundary = found
    initializers = {i.name: i for i in graph.initializer}
    inputs = {i.name: i for i in graph.input}
    sources = set(initializers) | set(inputs)
    pieces, written, read = [], {}, set()
    for cut in cuts:
        order = _piece_nodes(nodes, producer, cut, sources, boundary)
        if order is None:
            return None
        piece, binding = _piece_graph(nodes, order, cut.outputs, initializers, inputs)
        model = helper.make_model(piece, opset_imports=proto.opset_import)
        model.ir_version = proto.ir_version
        data = model.SerializeToString()
        digest = hashlib.sha256(data).hexdigest()[:16]
        if digest not in written:
            written[digest] = (data, len(order))
        pieces.append({"graph": portable_piece(digest), "inputs": binding, "outputs": cut.outputs})
        read.update(value for _, value in binding if value in initializers)
    loaded = sum(count for _, count in written.values())
    if loaded >= len(nodes):  # too few blocks alike: the pieces would load more than the whole step
        return None
    for digest, (data, _) in written.items():
        atomic_write_bytes(out / portable_piece(digest), data)
    index = {}
    for name in sorted(read):
        offset, length = weights.store(initializers[name])
        index[name] = {"offset": offset, "length": length, "shape": list(initializers[name].dims),
                       "dtype": str(helper.tensor_dtype_to_np_dtype(initializers[name].data_type))}
    atomic_write_json(out / PORTABLE_PIECES, {
        "format": PORTABLE_PIECES_FORMAT, "inputs": [i.name for i in graph.input if i.name not in initializers],
        "overridable": [i.name for i in graph.input if i.name in initializers],
        "pieces": pieces, "weights": index})
    return loaded
