"""The portable backend's training-step graph: forward and adapter-only gradients, accumulated over a step's
micro-batches, as one standard ONNX model.

Route (the only one that exported, see issue 7): ``torch.func.grad_and_value`` over
``torch.func.functional_call``, traced to plain aten ops with ``make_fx(tracing_mode="symbolic")``,
``torch.export.export(strict=False)`` with dynamic batch and sequence axes, then the dynamo ONNX
exporter (opset 18). Frozen tensors are inputs of the traced function (no weight gradients are
computed for them) and of the exported graph (so its optimizer keeps them single and int8-able); they
become initializers under their Hugging Face names afterwards.

Gradient accumulation is then appended to the exported graph (``append_accumulation``); the AdamW update is
the loop's, in numpy (``backends/adamw.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper
import torch
from safetensors.numpy import save as save_safetensors
from torch import nn
from torch.func import functional_call, grad_and_value

from ..artifact.files import PORTABLE_INITIAL_STATE, PORTABLE_INT8_STEP_MODEL, PORTABLE_STEP_MODEL
from ..artifact.names import BATCH_INPUTS, LOSS, accumulated, grad_name, is_a, updated
from ..fileio import atomic_write_bytes
from . import graph, int4, low_precision, portable_pieces, recompute
from ..errors import UserError
from .onnx_files import WeightsFile
from .portable_blocks import BlockwiseExport, find_blocks
from .portable_trace import BATCH, SEQUENCE, Input, mean_cross_entropy, trace


def _step_function(model: nn.Module, causal: bool, trainable: list[str], frozen: list[str]):
    """The function traced: scaled mean cross-entropy (labels -100 ignored) and its adapter gradients."""
    extra = {"use_cache": False} if causal else {}

    def loss_of(train, fixed, input_ids, attention_mask, labels, loss_scale):
        out = functional_call(model, {**fixed, **train}, args=(),
                              kwargs={"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True,
                                      **extra})
        loss = mean_cross_entropy(out.logits, labels)
        return loss * loss_scale, loss

    def step(input_ids, attention_mask, labels, loss_scale, *tensors):
        train = dict(zip(trainable, tensors[: len(trainable)]))
        fixed = dict(zip(frozen, tensors[len(trainable):]))
        grads, (_, loss) = grad_and_value(loss_of, has_aux=True)(train, fixed, input_ids, attention_mask, labels,
                                                                  loss_scale)
        return (loss, *[grads[name] for name in trainable])

    return step


def batch_inputs(causal: bool) -> list[Input]:
    """The step graph's batch inputs with example values: ``input_ids``, ``attention_mask``, ``labels``, ``loss_scale``."""
    tokens = {0: BATCH, 1: SEQUENCE}
    ids, mask, labels, scale = BATCH_INPUTS
    return [Input(ids, torch.ones(2, 8, dtype=torch.long), tokens), Input(mask, torch.ones(2, 8, dtype=torch.long), tokens),
            Input(labels, torch.ones(2, 8, dtype=torch.long), tokens) if causal else
            Input(labels, torch.ones(2, dtype=torch.long), {0: BATCH}),
            Input(scale, torch.tensor(1.0), {})]


def export_gradient_model(model: nn.Module, causal: bool, trainable: list[str], max_seq_len: int,
                          checkpointing: bool = False, loss_chunks: int = 0) -> onnx.ModelProto:
    """Export the gradient graph of ``model`` (LoRA already injected) for the named trainable parameters.

    Inputs: input_ids, attention_mask, labels, loss_scale and the trainable tensors by name. Outputs:
    ``loss`` (unscaled mean) and ``<name>.grad`` = d(loss_scale * loss)/d(name). Frozen parameters are
    initializers under their Hugging Face names (tied weights appear once, under the first name).
    A model with a list of transformer blocks is traced block by block (``portable_blocks``), which is also
    where ``checkpointing`` and a causal LM's chunked target-only loss (``loss_chunks`` > 0) apply; others whole.
    """
    model.eval()
    params = dict(model.named_parameters())
    frozen = [name for name in params if name not in set(trainable)]
    if find_blocks(model) is not None:
        proto = BlockwiseExport(model, causal, trainable, max_seq_len, loss_chunks).export(batch_inputs(causal),
                                                                                          checkpointing)
    elif checkpointing:
        raise UserError(f"--checkpointing needs a model with a list of transformer blocks; {type(model).__name__} "
                        "has none: export without it")
    else:
        step = _step_function(model, causal, trainable, frozen)
        proto = trace(step, batch_inputs(causal), [(n, params[n].detach()) for n in (*trainable, *frozen)],
                      [LOSS, *[grad_name(n) for n in trainable]], max_seq_len)
    _inputs_to_initializers(proto, {name: params[name].detach().numpy() for name in frozen})
    return proto


def _inputs_to_initializers(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """Turn the frozen graph inputs into named initializers (exported as inputs so that the exporter's
    optimizer cannot fold their transposes into fp32 copies); inputs no node reads are dropped. LoRA-FA's
    A factors stay inputs too, with their initializers as defaults, so the device loop can feed scaled
    copies for a step (``PortableBackend.gate_channels``: nested ranks)."""
    graph = proto.graph
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.input if i.name not in values or (is_a(i.name) and i.name in used)]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(onnx.numpy_helper.from_array(np.ascontiguousarray(v), name)
                             for name, v in values.items() if name in used)


def write_portable_artifacts(model: nn.Module, causal: bool, trainable: list[str], quantize: str, block: int,
                             max_seq_len: int, out: Path, weights: WeightsFile,
                             int8_compute: bool = False, checkpointing: bool = False, loss_chunks: int = 0,
                             attention_recompute: bool = True) -> tuple[int, int, int]:
    """Write the training-step graph (its frozen tensors into ``weights``) and the initial trainable state into
    ``out``. Returns what the memory model's load terms count: the nodes the runtime loads (the step graph's, or
    with ``checkpointing`` its distinct pieces': ``portable_pieces``, the step also written cut at its blocks), the
    bytes of the frozen tensors the step reads, and the attentions whose probabilities the step recomputes in the
    backward (``attention_recompute``; with ``checkpointing`` a block's backward recomputes its whole forward).

    Frozen base weights (not the LoRA A factors) are stored as ``quantize`` says: int8 behind
    ``DequantizeLinear``, int4 in blocks of ``block`` behind ``int4.py``'s nodes, or fp32 (none);
    ``int8_compute`` also writes the step with int8 products (``low_precision.py``); ``checkpointing`` recomputes
    each transformer block in the backward; ``loss_chunks`` > 0 puts a causal LM's head and loss on target tokens
    only, in that many chunks (``portable_loss``).
    """
    proto = export_gradient_model(model, causal, trainable, max_seq_len, checkpointing, loss_chunks)
    params = dict(model.named_parameters())
    frozen = set(params) - set(trainable)
    base = {i.name for i in proto.graph.initializer if i.name in frozen and not is_a(i.name)}
    graph.store_frozen(proto, base, quantize, block, lambda folded: _quantization_axes(model, folded))
    shapes = {name: list(params[name].shape) for name in trainable}
    append_accumulation(proto.graph, shapes)
    int8_products = None
    if int8_compute:
        int8_products = onnx.ModelProto()
        int8_products.CopyFrom(proto)
    if quantize == "int8":
        _products_read_dequantized(proto)
    _transpose_before_dequantize(proto)  # what transB cannot take
    recompute.dequantize_at_use(proto)
    attentions = recompute.recompute_attention(proto, LOSS) if attention_recompute else 0
    frozen_bytes = graph.initializer_nbytes(proto)
    weights.save(proto, out / PORTABLE_STEP_MODEL)
    nodes = (portable_pieces.split(proto, out, weights) if checkpointing else None) or len(proto.graph.node)
    del proto  # the graphs are rewritten in place: a 1 B model's protos are gigabytes each
    if int8_products is not None:
        _transpose_before_dequantize(int8_products)
        low_precision.int8_compute(int8_products)
        recompute.dequantize_at_use(int8_products)
        if attention_recompute:
            recompute.recompute_attention(int8_products, LOSS)
        weights.save(int8_products, out / PORTABLE_INT8_STEP_MODEL)
        del int8_products
    values = {name: params[name].detach().numpy().astype(np.float32, copy=True) for name in trainable}
    atomic_write_bytes(out / PORTABLE_INITIAL_STATE, save_safetensors(values))
    return nodes, frozen_bytes, attentions


def append_accumulation(graph: onnx.GraphProto, shapes: dict[str, list[int]]) -> None:
    """Replace ``graph``'s outputs ``<name>.grad`` (this micro-batch's gradients) by the gradients accumulated
    over the step's micro-batches: per trainable tensor an input ``<name>.grad_acc`` (zeros at first) and an
    output ``<name>.grad_acc.new``, their sum. The update itself is the loop's (``backends/adamw.py``)."""
    kept = [o for o in graph.output if o.name not in {grad_name(name) for name in shapes}]
    del graph.output[:]
    graph.output.extend(kept)
    for name, shape in shapes.items():
        total = updated(accumulated(name))
        graph.input.append(helper.make_tensor_value_info(accumulated(name), TensorProto.FLOAT, shape))
        graph.node.append(helper.make_node("Add", [accumulated(name), grad_name(name)], [total]))
        graph.output.append(helper.make_tensor_value_info(total, TensorProto.FLOAT, shape))


def _products_read_dequantized(proto: onnx.ModelProto) -> None:
    """Rewrite ``DequantizeLinear(W) -> Transpose -> product`` as the product reading the dequantized ``W`` with
    ``transB`` (``int4.transposed_product``, then ``Gemm``) where every reader of the ``Transpose`` allows it.

    A ``Transpose`` of the int8 tensor instead (``_transpose_before_dequantize``) is folded by ONNX Runtime into a
    second, transposed int8 copy of every weight the backward reads: twice the base's bytes in memory."""
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dead = set()
    for node in proto.graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if node.op_type != "Transpose" or node.input[0] not in dequantized or perm not in ([], [[1, 0]]):
            continue
        users = readers.get(node.output[0], [])
        rewritten = [int4.transposed_product(u, list(u.input).index(node.output[0]), node.input[0]) for u in users]
        if users and all(r is not None for r in rewritten) and node.output[0] not in {o.name for o in proto.graph.output}:
            for user, new in zip(users, rewritten):
                user.CopyFrom(new)
            dead.add(id(node))
    if dead:
        kept = [n for n in proto.graph.node if id(n) not in dead]
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
        int4.products_as_gemm(proto)  # standard ops only: Gemm on the input reshaped to 2-D


def _transpose_before_dequantize(proto: onnx.ModelProto) -> None:
    """Rewrite ``DequantizeLinear(W) -> Transpose`` as ``Transpose(W int8) -> DequantizeLinear`` (other axis).

    Weights the backward reads in both orientations keep one int8 copy; ORT 1.19's extended optimizers
    would otherwise insert a uint8 ``QuantizeLinear`` there and reject the graph."""
    dequantized = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    nodes = []
    for node in proto.graph.node:
        source = dequantized.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        if source is None or len(source.input) != 2:
            nodes.append(node)
            continue
        axis = next(onnx.helper.get_attribute_value(a) for a in source.attribute if a.name == "axis")
        rows = f"{node.output[0]}.int8"
        nodes += [onnx.helper.make_node("Transpose", [source.input[0]], [rows], perm=[1, 0]),
                  onnx.helper.make_node("DequantizeLinear", [rows, source.input[1]], [node.output[0]], axis=1 - axis)]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _output_axes(model: nn.Module) -> dict[str, int]:
    """Output-channel axis of every 2-D weight: 1 for GPT-2's ``Conv1D`` ([in, out]), else 0 ([out, in]).

    The same channels the ORT artifact's forward-only graph quantizes per, so both backends train the
    same int8 base."""
    return {f"{prefix}.{name}" if prefix else name: int(type(module).__name__ == "Conv1D")
            for prefix, module in model.named_modules() for name, p in module.named_parameters(recurse=False)
            if p.ndim == 2}


def _quantization_axes(model: nn.Module, folded: dict[str, str]) -> dict[str, int]:
    """``_output_axes`` of the weights as stored: flipped for those ``fold_transposes`` stored transposed."""
    axes = _output_axes(model)
    axes.update({new: 1 - axes[old] for old, new in folded.items() if old in axes})
    return axes
