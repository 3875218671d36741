"""ONNX graph surgery between the torch export and ORT artifact generation.

Everything here works on names the exporter kept (no guessing from ``onnx::MatMul_N``):
strip the wrapper's name prefix, fold the transposes of frozen weights into their storage,
quantize frozen weights to int8 (``DequantizeLinear`` -> ``MatMul``; embeddings dequantize only
the gathered rows), flatten logits for the loss, and expose trainable tensors as inputs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifact.names import is_a
from . import int4

INT8_MIN_ELEMENTS = 1024  # smaller 2-D tensors (e.g. token-type tables) stay fp32: nothing to gain


def strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
    """Rename initializers ``prefix + name`` -> ``name`` everywhere they are referenced."""
    renames = {i.name: i.name[len(prefix):] for i in proto.graph.initializer if i.name.startswith(prefix)}
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for k, name in enumerate(node.input):
            uses[name].append((node, k))
    return uses


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fold_transposes(proto: onnx.ModelProto, frozen: set[str]) -> dict[str, str]:
    """Read frozen 2-D weights that are only ever transposed as stored transposed (saves a copy per step): their
    readers take ``<name>.T`` and the initializer is renamed so, its bytes still in the old orientation until
    ``store_frozen`` quantizes them from a transposed view or transposes what stays fp32 (so no fp32 transpose of a
    quantized weight is written: protobuf would keep both copies until the graph is freed).

    Returns old name -> new name for every folded weight.
    """
    graph = proto.graph
    uses = _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    folded: dict[str, str] = {}
    dead: set[int] = set()
    for name in sorted(frozen):
        init, nodes = inits.get(name), uses.get(name, [])
        if init is None or len(init.dims) != 2 or not nodes:
            continue
        if not all(n.op_type == "Transpose" and list(_attr(n, "perm", [1, 0])) == [1, 0] for n, _ in nodes):
            continue
        new_name = f"{name}.T"
        init.name = new_name
        for node, _ in nodes:
            dead.add(id(node))
            for user, k in uses.get(node.output[0], []):
                user.input[k] = new_name
        folded[name] = new_name
    kept = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _transpose_bytes(init: onnx.TensorProto) -> None:
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(init).T), init.name))


def _values(init: onnx.TensorProto, transposed: frozenset[str]) -> np.ndarray:
    """The initializer's values, read transposed when it is a folded weight whose bytes were not moved."""
    values = numpy_helper.to_array(init)
    return values.T if init.name in transposed else values


def _readers(name: str, uses: dict, axes: dict[str, int] | None) -> tuple[list, list, int]:
    """(Gather readers, other readers, channel axis) of a 2-D weight: the axis its scales run along, the one a
    product keeps (1 for ``MatMul``'s and ``Gemm``'s right operand, else 0; ``axes`` overrides it)."""
    nodes = uses.get(name, [])
    gathers = [(n, k) for n, k in nodes if n.op_type == "Gather" and k == 0 and _attr(n, "axis", 0) == 0]
    others = [(n, k) for n, k in nodes if (n, k) not in gathers]
    in_out = others and all(
        (n.op_type == "MatMul" and k == 1) or (n.op_type == "Gemm" and k == 1 and not _attr(n, "transB", 0))
        for n, k in others
    )
    axis = 1 if in_out and not gathers else 0
    if axes and name in axes and not gathers:
        axis = axes[name]
    return gathers, others, axis


def _transposes(others: list) -> list[onnx.NodeProto]:
    return [n for n, _ in others if n.op_type == "Transpose" and list(_attr(n, "perm", [1, 0])) == [1, 0]]


def drop_unread_nodes(graph: onnx.GraphProto) -> None:
    """Remove the nodes nothing reads any more (no graph output, no reader), until none is left."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        kept = [n for n in graph.node if any(o in read for o in n.output)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


def _rewire(node: onnx.NodeProto, uses: dict, new_name: str) -> None:
    """Point the readers still reading ``node``'s output at ``new_name`` (those rewritten since are left)."""
    for user, k in uses.get(node.output[0], []):
        if user.input[k] == node.output[0]:
            user.input[k] = new_name


def _write_order(graph: onnx.GraphProto, prologue: list, after: dict, dead: set[int]) -> None:
    ordered = list(prologue)
    for node in graph.node:
        if id(node) not in dead:
            ordered.append(node)
        ordered.extend(after.get(id(node), []))
    del graph.node[:]
    graph.node.extend(ordered)


def _quantizable(init: onnx.TensorProto | None) -> bool:
    return (init is not None and len(init.dims) == 2 and init.data_type == TensorProto.FLOAT
            and int(np.prod(init.dims)) >= INT8_MIN_ELEMENTS)


def quantize_int8(proto: onnx.ModelProto, names: set[str], axes: dict[str, int] | None = None,
                  transposed: frozenset[str] = frozenset()) -> list[str]:
    """Symmetric per-output-channel int8 for the named fp32 2-D initializers; returns the new frozen names.

    The channel axis follows from the consumers unless ``axes`` names it (the portable gradient graph,
    whose backward reads weights in both orientations, passes the forward's output axis).

    ``W`` becomes ``W.int8`` (int8) + ``W.scale`` (fp32). Matmul-like consumers read
    ``DequantizeLinear(W.int8, W.scale, axis)`` under the old name; ``Gather`` consumers (embeddings)
    gather int8 rows and their scales and dequantize only those rows. A matrix on GGUF Q8_0's grid keeps its
    codes and block scales instead, read as ``quantize_int4`` reads its blocks (``int4.q8_0_codes``).
    """
    graph = proto.graph
    uses = _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    prologue: list[onnx.NodeProto] = []
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    dead: set[int] = set()
    new_frozen: list[str] = []
    for name in sorted(names):
        init = inits.get(name)
        if not _quantizable(init):
            continue
        w = _values(init, transposed)
        gathers, others, axis = _readers(name, uses, axes)
        q8_0 = int4.q8_0_codes(np.ascontiguousarray(w.T if axis == 1 else w))
        if q8_0 is not None:
            graph.initializer.remove(init)
            graph.initializer.extend(int4.stored_q8(name, *q8_0))
            new_frozen += [f"{name}.q8", f"{name}.scale"]
            _read_blockwise(name, axis == 1, gathers, others, uses, prologue, after, dead,
                            lambda out: int4.dequantize_nodes(name, out, packed=False),
                            lambda ids, out: int4.gather_nodes(name, w.shape[1], int4.Q8_0_BLOCK, ids, out,
                                                               packed=False))
            continue
        absmax = np.abs(w).max(axis=1 - axis)
        scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
        shaped = scale[None, :] if axis == 1 else scale[:, None]
        q = np.clip(np.rint(w / shaped), -127, 127).astype(np.int8)
        qname, sname = f"{name}.int8", f"{name}.scale"
        init.CopyFrom(numpy_helper.from_array(q, qname))
        graph.initializer.append(numpy_helper.from_array(scale, sname))
        new_frozen += [qname, sname]
        transposes = _transposes(others)
        if gathers and transposes and len(transposes) == len(others):
            # A tied LM head reads the embedding table transposed: its products read the dequantized table with
            # transB flipped (``_read_stored``), so one int8 table serves both. DequantizeLinear -> Transpose would
            # make ORT 1.19's transpose optimizer insert a uint8 QuantizeLinear it then rejects, so a reader that
            # takes no transB gets its own transposed int8 copy (one extra byte per parameter).
            kept = _read_stored(others, name, False, uses, dead)
            if any(user.input[k] == name for t in transposes for user, k in uses.get(t.output[0], [])):
                prologue.append(helper.make_node("DequantizeLinear", [qname, sname], [name], axis=0,
                                                 name=f"{name}.dq"))
                _microsoft_opset(proto)
            if kept:
                tname = f"{name}.T"
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q.T), f"{tname}.int8"))
                new_frozen.append(f"{tname}.int8")
                prologue.append(helper.make_node("DequantizeLinear", [f"{tname}.int8", sname], [tname], axis=1,
                                                 name=f"{tname}.dq"))
                for node, _ in kept:
                    dead.add(id(node))
                    _rewire(node, uses, tname)
        elif others:
            prologue.append(helper.make_node("DequantizeLinear", [qname, sname], [name], axis=axis, name=f"{name}.dq"))
        for node, _ in gathers:
            out = node.output[0]
            rows, row_scale, rows_f, row_scale_u = (f"{out}.{s}" for s in ("q", "s", "f", "su"))
            node.input[0] = qname
            node.output[0] = rows
            unsqueeze_axes = f"{out}.axes"  # not ``axes``: the channel axes of the weights still to come
            after[id(node)] += [
                helper.make_node("Gather", [sname, node.input[1]], [row_scale], axis=0),
                helper.make_node("Cast", [rows], [rows_f], to=TensorProto.FLOAT),
                helper.make_node("Constant", [], [unsqueeze_axes],
                                 value=numpy_helper.from_array(np.array([-1], np.int64))),
                helper.make_node("Unsqueeze", [row_scale, unsqueeze_axes], [row_scale_u]),
                helper.make_node("Mul", [rows_f, row_scale_u], [out]),
            ]
    if any(n.endswith(".q8") for n in new_frozen):  # Q8_0 matrices kept blockwise
        _blockwise_constants(proto, int4.Q8_0_BLOCK, packed=False)
    _write_order(graph, prologue, after, dead)
    return new_frozen


def quantize_int4(proto: onnx.ModelProto, names: set[str], block: int, axes: dict[str, int] | None = None,
                  transposed: frozenset[str] = frozenset()) -> list[str]:
    """Blockwise 4-bit (``int4.py``) for the named fp32 2-D initializers; returns the new frozen names.

    ``W`` is stored as ``S``: itself when the axis its products reduce over (the one ``quantize_int8``'s channel
    axis is not) is its last, else its transpose. Products read ``S`` (those of ``S^T``, through a ``Transpose``
    or not, become ``FusedMatMul`` / ``Gemm`` with ``transB`` flipped; a ``Transpose`` whose readers all go
    this way is dropped); other readers read ``W`` (``Transpose(S)`` where ``S`` is the transpose). ``Gather``
    readers (embeddings) dequantize only the gathered rows.
    """
    graph = proto.graph
    uses = _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    prologue: list[onnx.NodeProto] = []
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    dead: set[int] = set()
    new_frozen: list[str] = []
    for name in sorted(names):
        init = inits.get(name)
        if not _quantizable(init):
            continue
        w = _values(init, transposed)
        gathers, others, axis = _readers(name, uses, axes)
        flipped = axis == 1  # reduced along axis 0: S = W^T
        stored = np.ascontiguousarray(w.T if flipped else w)
        graph.initializer.remove(init)
        *arrays, offsets = int4.quantize(stored, block, name)
        offset = offsets is not None  # a GGUF Q4_1 matrix kept exactly
        graph.initializer.extend(int4.stored(name, *arrays, offsets))
        new_frozen.extend(int4.stored_names(name)[: 4 if offset else 3])
        _read_blockwise(name, flipped, gathers, others, uses, prologue, after, dead,
                        lambda out: int4.dequantize_nodes(name, out, offset),
                        lambda ids, out: int4.gather_nodes(name, w.shape[1], block, ids, out, offset))
    if new_frozen:
        _blockwise_constants(proto, block)
    _write_order(graph, prologue, after, dead)
    return new_frozen


def _read_blockwise(name: str, flipped: bool, gathers: list, others: list, uses: dict, prologue: list, after: dict,
                    dead: set[int], chain: Callable[[str], list], gather: Callable[[str, str], list]) -> None:
    """Point the readers of weight ``name``, stored blockwise as ``S`` (its transpose if ``flipped``), at ``S``:
    products through ``_read_stored``, other readers at ``chain(out)``'s fp32 ``S`` (transposed back if
    ``flipped``), ``Gather`` readers at ``gather(indices, out)``'s dequantized rows."""
    s_name = f"{name}.int4s"
    direct = _read_stored(others, s_name, flipped, uses, dead)
    if direct:
        value = name if flipped else s_name
        if flipped:
            prologue.append(helper.make_node("Transpose", [s_name], [name], perm=[1, 0]))
        for node, k in direct:
            node.input[k] = value
    if others:
        prologue.extend(chain(s_name))
    for node, _ in gathers:
        dead.add(id(node))
        after[id(node)] += gather(node.input[1], node.output[0])


def _blockwise_constants(proto: onnx.ModelProto, block: int, packed: bool = True) -> None:
    """The constants blockwise chains read, and the opset of the ``FusedMatMul`` products that read ``S``."""
    proto.graph.initializer.extend(int4.constants(block, packed))
    _microsoft_opset(proto)


def _microsoft_opset(proto: onnx.ModelProto) -> None:
    """Import the opset of the ``FusedMatMul`` products that read a stored weight with ``transB``."""
    if all(o.domain != int4.MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(int4.MS_DOMAIN, 1))


def _read_stored(readers: list, s_name: str, transposed: bool, uses: dict, dead: set[int]) -> list:
    """Point ``readers`` of a weight (equal to ``S^T`` if ``transposed``, else ``S``) at ``s_name`` (``S``);
    return those that need the weight itself. A ``Transpose`` reader is followed to its own readers."""
    direct = []
    for node, k in readers:
        if node.op_type == "Transpose" and list(_attr(node, "perm", [1, 0])) == [1, 0]:
            inner = uses.get(node.output[0], [])
            rest = _read_stored(inner, s_name, not transposed, uses, dead)
            if rest:  # the transposed value is still needed by someone: keep the Transpose, reading the weight
                direct.append((node, k))
                for user, j in rest:
                    user.input[j] = node.output[0]
            else:
                dead.add(id(node))
            continue
        if not transposed:
            node.input[k] = s_name
            continue
        rewritten = int4.transposed_product(node, k, s_name)
        if rewritten is None:
            direct.append((node, k))
        else:
            node.CopyFrom(rewritten)
    return direct


def prepare_frozen(proto: onnx.ModelProto, trainable: list[str], quantize: str, block: int = 0) -> list[str]:
    """Fold the transposes of the frozen base weights and quantize them (``quantize``: none, int8, or int4 in
    blocks of ``block``); return the frozen names.

    A frozen LoRA A stays fp32 (it is the adapter's). Every graph of an artifact goes through this, so they
    all hold the same stored weights."""
    frozen = set(weight_names(proto)) - set(trainable)
    store_frozen(proto, {n for n in frozen if not is_a(n)}, quantize, block)
    return [n for n in weight_names(proto) if n not in set(trainable)]


def store_frozen(proto: onnx.ModelProto, base: set[str], quantize: str, block: int = 0,
                 axes: Callable[[dict[str, str]], dict[str, int] | None] = lambda folded: None) -> dict[str, str]:
    """Fold the transposes of the ``base`` weights and quantize them (``quantize``: none, int8, or int4 in blocks of
    ``block``; ``axes(folded)`` names channel axes where the consumers do not); return ``fold_transposes``'s
    renames. A quantized weight is quantized from a transposed view of its fp32 bytes, never transposed in fp32."""
    folded = fold_transposes(proto, base)
    base = (base - set(folded)) | set(folded.values())
    pending = frozenset(folded.values())
    if quantize == "int8":
        quantize_int8(proto, base, axes(folded), pending)
    elif quantize == "int4":
        quantize_int4(proto, base, block, axes(folded), pending)
    for init in proto.graph.initializer:
        if init.name in pending:  # folded and left fp32 (no quantization, or too small to gain)
            _transpose_bytes(init)
    return folded


def compacted(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` that holds only its live bytes. Protobuf keeps the bytes of every replaced tensor until
    the whole message is freed, so a quantized ``proto`` still holds its fp32 weights (and their transposes):
    use the copy and drop ``proto``."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(proto)
    return fresh


def flatten_logits(proto: onnx.ModelProto, width: int) -> None:
    """Reshape the ``logits`` output to ``[N, width]`` (what SoftmaxCrossEntropyLoss wants)."""
    graph = proto.graph
    shape = "logits.flat_shape"
    graph.node.extend([
        helper.make_node("Constant", [], [shape], value=numpy_helper.from_array(np.array([-1, width], np.int64))),
        helper.make_node("Reshape", ["logits", shape], ["logits_flat"]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits_flat", TensorProto.FLOAT, ["N", width]))


def initializers_to_inputs(proto: onnx.ModelProto, names: list[str]) -> None:
    """Turn the named initializers into graph inputs (the inference model takes the adapters as inputs)."""
    graph = proto.graph
    keep = []
    for init in graph.initializer:
        if init.name in names:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)


def weight_names(proto: onnx.ModelProto) -> list[str]:
    """Names of all floating-point, int8 and uint8 (int4 storage) initializers (the model's parameters, not shape
    constants)."""
    kinds = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8}
    return [i.name for i in proto.graph.initializer if i.data_type in kinds and len(i.dims) > 0]


def _stored_nbytes(tensor: onnx.TensorProto) -> int:
    """Storage bytes of one initializer, from its shape and type (its data is not decoded)."""
    return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def nbytes(proto: onnx.ModelProto, names: list[str]) -> int:
    """Total storage bytes of the named initializers."""
    wanted = set(names)
    return sum(_stored_nbytes(i) for i in proto.graph.initializer if i.name in wanted)


def initializer_nbytes(proto: onnx.ModelProto) -> int:
    """Storage bytes of every initializer."""
    return sum(_stored_nbytes(i) for i in proto.graph.initializer)


def quantized_nbytes(proto: onnx.ModelProto) -> int:
    """Storage bytes of the quantized weights (int8 or Q8_0 codes with their fp32 scales, or int4 nibbles with their
    scales, zero points and offsets)."""
    inits = proto.graph.initializer
    int8 = [i for i in inits if i.data_type == TensorProto.INT8]
    scales = {f"{i.name.removesuffix('.T.int8').removesuffix('.int8').removesuffix('.q8')}.scale" for i in int8}
    packed = [i.name.removesuffix(".int4") for i in inits
              if i.data_type == TensorProto.UINT8 and i.name.endswith(".int4")]
    int4_names = [n for w in packed for n in int4.stored_names(w)]
    return sum(_stored_nbytes(i) for i in int8) + nbytes(proto, sorted(scales) + int4_names)


def quantized_values(proto: onnx.ModelProto) -> int:
    """How many values the quantized weights hold (int8: one a byte; int4: two a byte)."""
    inits = proto.graph.initializer
    int8 = sum(int(np.prod(i.dims)) for i in inits if i.data_type == TensorProto.INT8)
    packed = sum(int(np.prod(i.dims)) for i in inits if i.data_type == TensorProto.UINT8 and i.name.endswith(".int4"))
    return int8 + 2 * packed


def expose_layernorm_stats(proto: onnx.ModelProto) -> None:
    """Give every LayerNormalization its optional Mean/InvStdDev outputs: ORT's gradient builder needs them."""
    for k, node in enumerate(proto.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}.mean.{k}", f"{node.output[0]}.inv_std.{k}"])


def undo_value_dedup(proto: onnx.ModelProto, tied: set[str]) -> None:
    """Give every parameter its own initializer again.

    The exporter replaces initializers that merely hold equal values (fresh LayerNorm weights,
    zero biases) by ``Identity(first)``; ORT's gradient builder then defines one gradient twice.
    Equal-valued copies get their own initializer back; truly tied weights (``tied``: names that
    share storage in torch, e.g. an LM head tied to the embeddings) are rewired to one initializer.
    """
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    renames: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            source, alias = node.input[0], node.output[0]
            if alias in tied:
                renames[alias] = source
            else:
                copy_ = onnx.TensorProto()
                copy_.CopyFrom(inits[source])
                copy_.name = alias
                graph.initializer.append(copy_)
            continue
        kept.append(node)
    for node in kept:
        for k, name in enumerate(node.input):
            node.input[k] = renames.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
