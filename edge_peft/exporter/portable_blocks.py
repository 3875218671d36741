"""The portable step graph exported block by block: each distinct transformer block is traced once and its
graph repeated for every block like it, so export time does not grow with depth.

Traced graphs (``portable_trace.trace``), whose weights are inputs named relative to what they stand for:

- **prologue** ``(input_ids, attention_mask) -> hidden``: the model up to its first block (embeddings);
- **block forward** ``(input_ids, attention_mask, hidden) -> hidden.out`` and **block step**
  ``(input_ids, attention_mask, hidden, hidden.grad) -> (hidden.out, hidden.in.grad, *grads)``: one block and
  its vector-Jacobian product. The block's mask and positions are recomputed inside from the batch, as the model
  computes them; the copies of that work merge when the graphs are stitched;
- **epilogue** ``(batch, loss_scale, hidden) -> (loss, hidden.grad, *grads)``: from the last block's output to the
  scaled loss, and its gradient.

``stitch`` lays them out as one step: prologue, blocks, epilogue, then the blocks' backwards (ONNX Runtime orders
nodes by their inputs). Without checkpointing one step instance per block computes both halves and its backward
reads the forward's activations. With it, a forward instance runs each block and the step instance recomputes the
block from its saved input once the gradient from above exists (the input is pinned to that gradient,
``recompute.late_value``): between the passes only block inputs stay alive.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import onnx
import torch
from onnx import helper
from torch import nn
from torch.func import functional_call, grad_and_value, vjp

from ..artifact.names import BATCH_INPUTS, LOSS, grad_name, layer_index
from . import recompute
from .portable_loss import head_loss_nodes
from .portable_trace import BATCH, SEQUENCE, Input, mean_cross_entropy, trace

HIDDEN, HIDDEN_GRAD, HIDDEN_OUT, HIDDEN_IN_GRAD = "hidden", "hidden.grad", "hidden.out", "hidden.in.grad"
CONSTANT_PREFIX = "const."  # the step's constants, named by their content


def hidden_value(index: int) -> str:
    """The step's value that is block ``index``'s input (``index`` = the block count: the last block's output)."""
    return f"h{index}"


def grad_value(index: int) -> str:
    """The gradient of the loss with respect to ``hidden_value(index)``."""
    return f"g{index}"


class _Stop(Exception):
    """Raised by the stand-in of the block being traced: carries the arguments the model passed it."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args, self.kwargs = args, kwargs


class _StandIn(nn.Module):
    """Takes a block's place while the model's code around the blocks runs: passes its input on, returns
    ``value[0]`` instead, or stops the model (``stop``)."""

    def __init__(self, stop: bool = False, value: list | None = None):
        super().__init__()
        self.stop, self.value = stop, value

    def forward(self, hidden, *args, **kwargs):
        if self.stop:
            raise _Stop((hidden, *args), kwargs)
        return self.value[0] if self.value else hidden


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's list of transformer blocks (``model.layers``, ``transformer.h``, ``encoder.layer``) and its path."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                layer_index(f"{name}.{i}.x") == i for i in range(len(module))):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    return (best[0], best[1]) if best else None


@dataclass
class _Group:
    """Blocks alike in structure, trained tensors and the arguments the model passes them."""

    template: int
    members: list[int] = field(default_factory=list)


@dataclass
class _Instance:
    """One traced graph placed in the step: its inputs and outputs bound to step value names."""

    proto: onnx.ModelProto
    tag: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    late: dict[str, str] = field(default_factory=dict)  # input -> the step value it waits for


class BlockwiseExport:
    """Traces and stitches the step graph of ``model`` (adapters injected) for the ``trainable`` tensors."""

    def __init__(self, model: nn.Module, causal: bool, trainable: list[str], max_seq_len: int, loss_chunks: int = 0):
        found = find_blocks(model)
        if found is None:
            raise ValueError("the model has no list of transformer blocks")
        self.model, self.causal, self.max_seq_len = model, causal, max_seq_len
        self.path, self.blocks = found
        self.trainable = list(trainable)
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.outside = {n: p for n, p in self.params.items() if not n.startswith(f"{self.path}.")}
        self.outside_trainable = [n for n in trainable if n in self.outside]
        in_blocks = [layer_index(n) for n in trainable if n not in self.outside]
        self.lowest = min(in_blocks, default=len(self.blocks))
        groups: dict[tuple, _Group] = {}
        for i in range(len(self.blocks)):
            groups.setdefault(self._signature(i), _Group(template=i)).members.append(i)
        self.groups = list(groups.values())
        self.head = self._chunkable_head() if causal and loss_chunks > 0 else None
        self.loss_chunks = loss_chunks

    def _prefix(self, index: int) -> str:
        return f"{self.path}.{index}."

    def _signature(self, index: int) -> tuple:
        block, wanted = self.blocks[index], set(self.trainable)
        layer_types = getattr(self.model.config, "layer_types", None)
        return (type(block).__name__, layer_types[index] if layer_types else None,
                tuple((n, tuple(p.shape), f"{self._prefix(index)}{n}" in wanted) for n, p in block.named_parameters()))

    # -- running the model around the blocks -------------------------------------------------------------------

    @contextlib.contextmanager
    def _stand_ins(self, make: Callable[[int], nn.Module]) -> Iterator[None]:
        saved = list(self.blocks)
        try:
            for i in range(len(saved)):
                self.blocks[i] = make(i)
            yield
        finally:
            for i, module in enumerate(saved):
                self.blocks[i] = module

    def _run_model(self, weights: dict, input_ids, attention_mask):
        extra = {"use_cache": False} if self.causal else {}
        return functional_call(self.model, weights, args=(), kwargs={
            "input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True, **extra})

    def _block_arguments(self, index: int, weights: dict, input_ids, attention_mask) -> tuple[tuple, dict]:
        """The arguments the model passes block ``index`` for this batch."""
        with self._stand_ins(lambda i: _StandIn(stop=i == index)):
            try:
                self._run_model(weights, input_ids, attention_mask)
            except _Stop as stop:
                return stop.args, stop.kwargs
        raise RuntimeError(f"the model never called block {index}")

    # -- traced graphs ---------------------------------------------------------------------------------------

    def _tokens(self) -> list[Input]:
        tokens = {0: BATCH, 1: SEQUENCE}
        return [Input(BATCH_INPUTS[0], torch.ones(2, 8, dtype=torch.long), tokens),
                Input(BATCH_INPUTS[1], torch.ones(2, 8, dtype=torch.long), tokens)]

    def _hidden(self, name: str) -> Input:
        config = self.model.config
        width = int(getattr(config, "hidden_size", None) or config.n_embd)
        return Input(name, torch.zeros(2, 8, width), {0: BATCH, 1: SEQUENCE})

    def prologue(self) -> onnx.ModelProto:
        names = list(self.outside)

        def fn(input_ids, attention_mask, *values):
            args, _ = self._block_arguments(0, dict(zip(names, values)), input_ids, attention_mask)
            return (args[0],)

        return trace(fn, self._tokens(), [(n, self.outside[n]) for n in names], [HIDDEN], self.max_seq_len)

    def block(self, index: int, backward: bool) -> onnx.ModelProto:
        """Block ``index``'s forward, or (``backward``) its forward and vector-Jacobian product; its weights are
        inputs named relative to the block."""
        block, prefix = self.blocks[index], self._prefix(index)
        own = {n: p.detach() for n, p in block.named_parameters()}
        train = [n for n in own if f"{prefix}{n}" in set(self.trainable)]
        fixed = [n for n in own if n not in set(train)]
        outside = list(self.outside)
        split = (len(train), len(train) + len(fixed))

        def run(hidden, train_values: dict, values, input_ids, attention_mask):
            args, kwargs = self._block_arguments(index, dict(zip(outside, values[split[1]:])), input_ids,
                                                 attention_mask)
            weights = {**dict(zip(fixed, values[split[0]: split[1]])), **train_values}
            out = functional_call(block, weights, args=(hidden, *args[1:]), kwargs=kwargs)
            return out[0] if isinstance(out, tuple) else out

        def forward(input_ids, attention_mask, hidden, *values):
            return (run(hidden, dict(zip(train, values[: split[0]])), values, input_ids, attention_mask),)

        def step(input_ids, attention_mask, hidden, grad_out, *values):
            out, pull = vjp(lambda h, t: run(h, t, values, input_ids, attention_mask), hidden,
                            dict(zip(train, values[: split[0]])))
            d_hidden, d_train = pull(grad_out)
            return (out, d_hidden, *[d_train[n] for n in train])

        weights = [(n, own[n]) for n in (*train, *fixed)] + [(n, self.outside[n]) for n in outside]
        if not backward:
            return trace(forward, [*self._tokens(), self._hidden(HIDDEN)], weights, [HIDDEN_OUT], self.max_seq_len)
        return trace(step, [*self._tokens(), self._hidden(HIDDEN), self._hidden(HIDDEN_GRAD)], weights,
                     [HIDDEN_OUT, HIDDEN_IN_GRAD, *[grad_name(n) for n in train]], self.max_seq_len)

    def epilogue(self, batch: list[Input]) -> onnx.ModelProto:
        train = list(self.outside_trainable)
        fixed = [n for n in self.outside if n not in set(train)]

        def loss_of(train_values, hidden, fixed_values, input_ids, attention_mask, labels, loss_scale):
            with self._stand_ins(lambda i: _StandIn(value=[hidden])):
                out = self._run_model({**fixed_values, **train_values}, input_ids, attention_mask)
            loss = mean_cross_entropy(out.logits, labels)
            return loss * loss_scale, loss

        def fn(input_ids, attention_mask, labels, loss_scale, hidden, *values):
            (d_train, d_hidden), (_, loss) = grad_and_value(loss_of, argnums=(0, 1), has_aux=True)(
                dict(zip(train, values[: len(train)])), hidden, dict(zip(fixed, values[len(train):])),
                input_ids, attention_mask, labels, loss_scale)
            return (loss, d_hidden, *[d_train[n] for n in train])

        return trace(fn, [*batch, self._hidden(HIDDEN)], [(n, self.outside[n]) for n in (*train, *fixed)],
                     [LOSS, HIDDEN_GRAD, *[grad_name(n) for n in train]], self.max_seq_len)

    def _chunkable_head(self) -> tuple[str, str] | None:
        """(module path, weight name) of a bias-free linear LM head nothing trains, or None."""
        head = self.model.get_output_embeddings()
        if self.outside_trainable or not isinstance(head, nn.Linear) or head.bias is not None:
            return None
        path = next(n for n, m in self.model.named_modules() if m is head)
        weight = next(n for n, p in self.model.named_parameters() if p is head.weight)
        return path, weight

    def norm_step(self) -> onnx.ModelProto:
        """``(input_ids, attention_mask, hidden, normed.grad) -> (normed, hidden.in.grad)``: from the last block's
        output to the LM head's input (the final norm) and its vector-Jacobian product."""
        parent_path, _, child = self.head[0].rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        names = list(self.outside)

        def run(hidden, values, input_ids, attention_mask):
            head = getattr(parent, child)
            setattr(parent, child, _StandIn(stop=True))
            try:
                with self._stand_ins(lambda i: _StandIn(value=[hidden])):
                    self._run_model(dict(zip(names, values)), input_ids, attention_mask)
            except _Stop as stop:
                return stop.args[0]
            finally:
                setattr(parent, child, head)
            raise RuntimeError("the model never called its LM head")

        def step(input_ids, attention_mask, hidden, grad_out, *values):
            out, pull = vjp(lambda h: run(h, values, input_ids, attention_mask), hidden)
            return (out, pull(grad_out)[0])

        return trace(step, [*self._tokens(), self._hidden(HIDDEN), self._hidden(HIDDEN_GRAD)],
                     [(n, self.outside[n]) for n in names], [HIDDEN_OUT, HIDDEN_IN_GRAD], self.max_seq_len)

    def _head_loss(self, hidden: str, grad: str) -> tuple[_Instance, list[onnx.NodeProto]]:
        """The final norm's instance and the chunked head-and-loss nodes, from ``hidden`` (the last block's output)
        to ``loss`` and ``grad`` (its gradient)."""
        config = self.model.config
        norm = _Instance(self.norm_step(), "norm", {**self._shared(), HIDDEN: hidden,
                                                    HIDDEN_GRAD: "normed.grad"},
                         {HIDDEN_OUT: "normed", HIDDEN_IN_GRAD: grad})
        width = self._hidden("x").example.shape[-1]
        rows = int(self.model.get_output_embeddings().weight.shape[0])
        nodes = head_loss_nodes("normed", BATCH_INPUTS[2], BATCH_INPUTS[3], self.head[1], width,
                                rows, getattr(config, "final_logit_softcapping", None),
                                self.loss_chunks, LOSS, "normed.grad")
        return norm, nodes

    def _shared(self) -> dict[str, str]:
        """The inputs every traced graph binds to the step's own names: the batch and the weights outside the blocks."""
        return {name: name for name in (*BATCH_INPUTS, *self.outside)}

    # -- the step --------------------------------------------------------------------------------------------

    def export(self, batch: list[Input], checkpointing: bool) -> onnx.ModelProto:
        """The step graph: batch inputs and every parameter as inputs, ``loss`` and the trainable tensors'
        gradients as outputs (as ``portable.export_gradient_model`` gives for the whole model)."""
        n = len(self.blocks)
        hidden = [hidden_value(i) for i in range(n + 1)]
        grads = [grad_value(i) for i in range(n + 1)]
        shared = self._shared()
        instances = [_Instance(self.prologue(), "prologue", shared, {HIDDEN: hidden[0]})]
        traced: dict[tuple[int, bool], onnx.ModelProto] = {}
        group_of = {m: g for g in self.groups for m in g.members}

        def graph_of(index: int, backward: bool) -> onnx.ModelProto:
            key = (group_of[index].template, backward)
            if key not in traced:
                traced[key] = self.block(*key)
            return traced[key]

        def bind(index: int) -> dict[str, str]:
            prefix = self._prefix(index)
            return {**shared, **{name: f"{prefix}{name}" for name, _ in self.blocks[index].named_parameters()}}

        for i in range(n):
            if i < self.lowest or checkpointing:
                instances.append(_Instance(graph_of(i, False), f"f{i}", {**bind(i), HIDDEN: hidden[i]},
                                           {HIDDEN_OUT: hidden[i + 1]}))
        extra: list[onnx.NodeProto] = []
        if self.head:
            norm, extra = self._head_loss(hidden[n], grads[n])
            instances.append(norm)
        else:
            instances.append(_Instance(self.epilogue(batch), "epilogue", {**shared, HIDDEN: hidden[n]},
                                       {LOSS: LOSS, HIDDEN_GRAD: grads[n],
                                        **{grad_name(t): grad_name(t) for t in self.outside_trainable}}))
        for i in range(self.lowest, n):
            prefix = self._prefix(i)
            outputs = {HIDDEN_IN_GRAD: grads[i],
                       **{grad_name(name): grad_name(f"{prefix}{name}") for name, _ in self.blocks[i].named_parameters()
                          if f"{prefix}{name}" in set(self.trainable)}}
            if not checkpointing:
                outputs[HIDDEN_OUT] = hidden[i + 1]
            instances.append(_Instance(graph_of(i, True), f"b{i}", {**bind(i), HIDDEN: hidden[i],
                                                                    HIDDEN_GRAD: grads[i + 1]}, outputs,
                                       late={HIDDEN: grads[i + 1]} if checkpointing else {}))
        outputs = [LOSS, *[grad_name(t) for t in self.trainable]]
        return stitch(instances, [*batch], self.params, outputs, extra)


def stitch(instances: list[_Instance], batch: list[Input], params: dict[str, torch.Tensor],
           outputs: list[str], extra: list[onnx.NodeProto]) -> onnx.ModelProto:
    """One graph of the instances' nodes and the ``extra`` ones, their values renamed apart, identical work merged
    and unread work dropped. Inputs: the batch and every parameter by name; outputs: ``outputs`` (``loss``, then
    gradients of parameters)."""
    nodes: list[onnx.NodeProto] = list(extra)
    constants: dict[str, onnx.TensorProto] = {}
    value_info: dict[str, onnx.ValueInfoProto] = {}
    opsets: dict[str, int] = {}
    for inst in instances:
        g = inst.proto.graph
        for o in inst.proto.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        names = dict(inst.inputs)
        for init in g.initializer:
            key = CONSTANT_PREFIX + hashlib.sha256(init.SerializeToString().replace(init.name.encode(), b"")).hexdigest()[:16]
            names[init.name] = key
            if key not in constants:
                copy = onnx.TensorProto()
                copy.CopyFrom(init)
                copy.name = key
                constants[key] = copy
        for out in g.output:
            if out.name in inst.outputs:
                names[out.name] = inst.outputs[out.name]
        for name, trigger in inst.late.items():
            pin = f"{inst.tag}/{name}.late"
            nodes += recompute.late_value(names[name], trigger, pin)
            names[name] = pin

        def rename(value: str) -> str:
            if not value:
                return value
            if value not in names:
                names[value] = f"{inst.tag}/{value}"
            return names[value]

        for node in g.node:
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = f"{inst.tag}/{node.name}"
            clone.input[:] = [rename(v) for v in node.input]
            clone.output[:] = [rename(v) for v in node.output]
            nodes.append(clone)
        for vi in g.value_info:
            if vi.name in names and names[vi.name] not in value_info:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(vi)
                copy.name = names[vi.name]
                value_info[copy.name] = copy
    graph_inputs = [*(i.name for i in batch), *params]
    nodes.insert(0, recompute.zero_constant())  # what pins read (dropped below when nothing does)
    nodes = _merge_duplicates(recompute.topological(nodes, {*graph_inputs, *constants}))
    nodes = _live(nodes, outputs)
    used = {v for node in nodes for v in node.input}
    inputs = [i.name for i in batch] + [n for n in params if n in used]
    graph = helper.make_graph(
        nodes, "portable_step",
        [_input_info(name, batch, params) for name in inputs],
        [_output_info(name, params) for name in outputs],
        [c for k, c in constants.items() if k in used],
        value_info=[v for k, v in value_info.items() if k in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = instances[0].proto.ir_version
    return model


def _merge_duplicates(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Drop nodes that repeat an earlier node's op, attributes and inputs; readers take the earlier outputs."""
    seen: dict[tuple, onnx.NodeProto] = {}
    alias: dict[str, str] = {}
    kept = []
    for node in nodes:
        node.input[:] = [alias.get(v, v) for v in node.input]
        key = (node.domain, node.op_type, tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))
        first = seen.get(key)
        if first is not None and len(first.output) == len(node.output):
            alias.update({o: f for o, f in zip(node.output, first.output) if o})
            continue
        seen[key] = node
        kept.append(node)
    return kept


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the ``outputs`` depend on, in order."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]


def _input_info(name: str, batch: list[Input], params: dict[str, torch.Tensor]) -> onnx.ValueInfoProto:
    """A parameter (float, its shape) or a batch input (its dtype, batch and sequence axes named)."""
    if name in params:
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(params[name].shape))
    given = next(i for i in batch if i.name == name)
    dtype = onnx.TensorProto.INT64 if given.example.dtype == torch.long else onnx.TensorProto.FLOAT
    return helper.make_tensor_value_info(name, dtype, [given.axes.get(k, size) for k, size in enumerate(given.example.shape)])


def _output_info(name: str, params: dict[str, torch.Tensor]) -> onnx.ValueInfoProto:
    """``loss`` (a float scalar) or a parameter's gradient (the parameter's shape)."""
    if name == LOSS:
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [])
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                         list(next(p for n, p in params.items() if grad_name(n) == name).shape))
