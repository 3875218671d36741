"""Trade compute for memory in training graphs (the ORT training and eval models, the portable step).

- ``dequantize_at_use``: every reader of a frozen quantized weight (the forward's product, the backward's
  input-gradient ``dX = dY W^T``) gets its own dequantization (int8: a ``DequantizeLinear``; int4: a copy of
  the weight's ``int4.dequantize_nodes`` chain), made just before it: at any time the base costs its
  quantized bytes plus the fp32 copies in use, not the whole base in fp32.
- ``checkpoint_blocks``: the forward activations a transformer block's backward reads are recomputed
  from the block's inputs when the backward reaches the block (activation checkpointing per block);
  between forward and backward only the block's inputs stay alive.
- ``recompute_attention``: each attention's probabilities (``heads x T x T`` a row, the largest activation of
  a block at long sequences) are recomputed from its saved queries and keys when the backward reaches the
  attention, as a fused attention kernel's backward does; between forward and backward only Q and K stay.

ONNX Runtime orders nodes by their data dependencies, not by their place in the file, and runs a node
whose inputs are all ready (stored weights, the block's input) at the start of the step. Each copy's
inputs therefore pass through a no-op ``Reshape`` whose target shape depends on a value that exists only
when its reader runs (``Shape(v)[0] * 0`` added to the input's own shape; ``v`` is the reader's latest
input, a gradient in the backward), which pins the copy to that point at the cost of a few integer ops.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import int4

BLOCK = re.compile(r"/(?:layers|layer|h)\.(\d+)/")  # the node scope of a transformer block: Llama-like, BERT, GPT-2
ZERO = "recompute.zero"
# Readers that get their own copy. Others (DoRA's weight norm reads it through a Transpose) keep the shared
# one: ORT 1.19's transpose optimizer would push their Transpose through a copy and insert a uint8 QuantizeLinear.
PRODUCTS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
# What may lie between an attention's score product ``Q K^T`` and its Softmax: scaling, masks, views and casts.
VIEW_OPS = ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze")
SCORE_OPS = ("Mul", "Div", "Add", "Sub", "Where", "Max", "Min", *VIEW_OPS)


class _Graph:
    """Indexes of one graph: producers, consumers, the forward part and the names of constants."""

    def __init__(self, graph: onnx.GraphProto, loss: str | None = None):
        self.graph = graph
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self.constants = ({i.name for i in graph.initializer} |
                          {n.output[0] for n in self.nodes if n.op_type == "Constant"})
        self.stored = {i.name for i in graph.initializer} | {i.name for i in graph.input}
        self.forward = self._ancestors([loss]) if loss else set()

    def _ancestors(self, names: list[str]) -> set[int]:
        seen: set[int] = set()
        stack = [self.producer[n] for n in names if n in self.producer]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(self.producer[i] for i in node.input if i in self.producer)
        return seen

    def is_forward(self, node: onnx.NodeProto) -> bool:
        return id(node) in self.forward


class _Rewriter:
    """Collects the copies and the late inputs, then writes the graph back in a valid order."""

    def __init__(self, g: _Graph):
        self.g = g
        self.before: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # id(node) -> copies to run before it
        self.count = 0  # late values made
        self.zeros: dict[str, str] = {}  # trigger -> its zero (``late_zero``), made once
        # names in use: the graph's, and those an earlier rewrite of it made (each pass is its own _Rewriter)
        self.taken = set(g.producer) | g.stored | {n.name for n in g.nodes}

    def fresh(self, base: str) -> str:
        """``base`` followed by the smallest number that makes a name not yet in the graph."""
        k = 0
        while f"{base}{k}" in self.taken:
            k += 1
        self.taken.add(f"{base}{k}")
        return f"{base}{k}"

    def late(self, name: str, trigger: str, at: onnx.NodeProto) -> str:
        """``name`` as a value that exists only once ``trigger`` does (a no-op Reshape)."""
        self.count += 1
        t = self.fresh(f"{name}.late")
        if trigger not in self.zeros:
            self.zeros[trigger] = f"{t}.zero"
            self.before[id(at)] += late_zero(trigger, f"{t}.zero")
        self.before[id(at)] += late_reshape(name, self.zeros[trigger], t)
        return t

    def copy(self, nodes: list[onnx.NodeProto], trigger: str, at: onnx.NodeProto, suffix: str) -> dict[str, str]:
        """Copies of ``nodes`` (in order) before ``at``, their outside inputs made late; old -> new output names."""
        made = {o for n in nodes for o in n.output}
        renames: dict[str, str] = {}
        late: dict[str, str] = {}
        for node in nodes:
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = f"{node.name}{suffix}"
            for k, name in enumerate(clone.input):
                if name in renames:
                    clone.input[k] = renames[name]
                elif name and name not in made and _pins(clone, k, name in self.g.constants):
                    if name not in late:
                        late[name] = self.late(name, trigger, at)
                    clone.input[k] = late[name]
            for k, name in enumerate(clone.output):
                if name:
                    renames[name] = clone.output[k] = f"{name}{suffix}"
            self.before[id(at)].append(clone)
        return renames

    def write(self, dead: set[int] = frozenset()) -> None:
        graph = self.g.graph
        ordered = [] if ZERO in self.g.constants else [zero_constant()]
        for node in self.g.nodes:
            ordered += self.before.get(id(node), [])
            if id(node) not in dead:
                ordered.append(node)
        del graph.node[:]
        graph.node.extend(topological(ordered, {i.name for i in graph.input} | self.g.constants))


def late_value(name: str, trigger: str, out: str) -> list[onnx.NodeProto]:
    """Nodes making ``out``: ``name`` unchanged (a no-op ``Reshape``), but only once ``trigger`` exists. They read
    ``ZERO`` (``zero_constant``)."""
    return late_zero(trigger, f"{out}.zero") + late_reshape(name, f"{out}.zero", out)


def late_zero(trigger: str, out: str) -> list[onnx.NodeProto]:
    """Nodes making ``out``: int64 [0] that exists only once ``trigger`` does (it reads ``ZERO``)."""
    return [helper.make_node("Shape", [trigger], [f"{out}.trigger"], end=1),
            helper.make_node("Mul", [f"{out}.trigger", ZERO], [out])]


def late_reshape(name: str, zero: str, out: str) -> list[onnx.NodeProto]:
    """Nodes making ``out``: ``name`` unchanged (a no-op ``Reshape``) once ``zero`` (``late_zero``) exists."""
    return [
        helper.make_node("Shape", [name], [f"{out}.shape"]),
        helper.make_node("Add", [f"{out}.shape", zero], [f"{out}.same"]),
        helper.make_node("Reshape", [name, f"{out}.same"], [out]),
    ]


def zero_constant() -> onnx.NodeProto:
    """The int64 zero ``late_value`` reads."""
    return helper.make_node("Constant", [], [ZERO], value=numpy_helper.from_array(np.array(0, np.int64)))


def _pins(node: onnx.NodeProto, k: int, constant: bool) -> bool:
    """Whether input ``k`` of a copy goes through a late Reshape: every computed input, a
    ``DequantizeLinear``'s scale (stored or not), which pins the copy late without copying its int8 tensor,
    and in an int4 or Q8_0 chain the small input of each root (``int4.pinned``), never the stored codes."""
    if int4.is_chain_node(node):
        return int4.pinned(node, k)
    if node.op_type == "DequantizeLinear":
        return k == 1
    return not constant


def _dequantizes(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is (part of) a stored weight's dequantization: int8's ``DequantizeLinear`` or an int4 chain."""
    return node.op_type == "DequantizeLinear" or int4.is_chain_node(node)


def topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is produced before it is read (stable otherwise)."""
    ready = set(available) | {""}
    produced_by_graph = {o for n in nodes for o in n.output}
    pending = list(nodes)
    out: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready or i not in produced_by_graph for i in node.input):
                out.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"recompute made a cycle at {rest[0].name or rest[0].op_type}")
        pending = rest
    return out


def _latest_input(g: _Graph, node: onnx.NodeProto, position: dict[int, int], skip: str) -> str | None:
    """The computed input of ``node`` (not ``skip``) made last in graph order: a gradient for a backward node."""
    computed = [i for i in node.input if i and i != skip and i in g.producer and i not in g.constants]
    return max(computed, key=lambda i: position[id(g.producer[i])], default=None)


def accumulate_in_backward_order(proto: onnx.ModelProto) -> int:
    """Move the training graph's gradient accumulators (``InPlaceAccumulatorV2``) to its end, ordered by where
    their parameter is first read (the forward's order); returns how many.

    ONNX Runtime's default execution order is a depth-first walk back from the graph's leaves, the last leaf
    first. The generated graph lists the last block's accumulators first, so the walk reached the first block's
    through the whole backward and left every other block's weight gradient (``dB = dY^T (A x)``) to the end of
    the step, keeping what it reads, recomputed activations included, alive until then. In forward order the
    walk starts at the last block's and computes each block's weight gradients as soon as its backward has run."""
    nodes = list(proto.graph.node)
    first_read: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for name in node.input:
            first_read.setdefault(name, k)
    accumulators = [n for n in nodes if n.op_type == "InPlaceAccumulatorV2"]
    if not accumulators:
        return 0
    param = lambda n: n.input[1].removesuffix("_grad")
    accumulators.sort(key=lambda n: first_read.get(param(n), len(nodes)))
    del proto.graph.node[:]
    proto.graph.node.extend([n for n in nodes if n.op_type != "InPlaceAccumulatorV2"] + accumulators)
    return len(accumulators)


def dequantize_at_use(proto: onnx.ModelProto) -> int:
    """Give every product reader of a stored weight's dequantization its own copy, made just before it; returns how
    many late values were made (0: nothing changed).

    Left alone, ONNX Runtime runs every such dequantization at the start of the step (its inputs are ready) and
    keeps each fp32 copy until its last reader: the whole base in fp32, the backward's readers keeping it to the end."""
    g = _Graph(proto.graph)
    rw = _Rewriter(g)
    position = {id(n): k for k, n in enumerate(g.nodes)}
    dead: set[int] = set()
    outputs = {o.name for o in proto.graph.output}
    stored_dq = [[n] for n in g.nodes if n.op_type == "DequantizeLinear" and all(i in g.stored for i in n.input if i)]
    chains = [_chain(g, n) for n in g.nodes if int4.is_chain_end(n)]
    for chain in stored_dq + chains:
        weight, pinned = chain[-1].output[0], 0
        readers = g.consumers[weight]
        for reader in readers:
            trigger = _latest_input(g, reader, position, weight) if reader.op_type in PRODUCTS else None
            if trigger is None:
                continue
            copy = rw.copy(chain, trigger, reader, rw.fresh(f"{weight}.use")[len(weight):])[weight]
            reader.input[:] = [copy if name == weight else name for name in reader.input]
            pinned += 1
        if readers and pinned == len(readers) and weight not in outputs:
            dead.update(id(n) for n in chain)
    rw.write(dead)
    return rw.count


def _chain(g: _Graph, end: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The nodes of the int4 dequantization chain ending in ``end``, in graph order."""
    members: set[int] = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if id(node) in members:
            continue
        members.add(id(node))
        stack.extend(p for i in node.input if (p := g.producer.get(i)) is not None and int4.is_chain_node(p))
    return [n for n in g.nodes if id(n) in members]


def recompute_attention(proto: onnx.ModelProto, loss: str) -> int:
    """Recompute each forward ``Softmax`` whose output the backward reads (attention probabilities) from the
    score product that feeds it, once the backward reaches that attention; returns how many were rewritten.

    The chain recomputed is ``MatMul(Q, K^T)``, then the scaling, mask and view ops up to the ``Softmax``
    (``SCORE_OPS``), and the views of its output the backward reads (``VIEW_OPS``); its computed inputs (Q, K^T,
    the mask) are read again in the backward, so they stay alive instead of the probabilities. A Softmax not fed
    that way (no such product within a few ops) is left alone."""
    g = _Graph(proto.graph, loss)
    rw = _Rewriter(g)
    position = {id(n): k for k, n in enumerate(g.nodes)}
    done = 0
    for softmax in [n for n in g.nodes if n.op_type == "Softmax" and g.is_forward(n)]:
        views = [c for c in g.consumers[softmax.output[0]] if c.op_type in VIEW_OPS and g.is_forward(c)]
        saved = {o: readers for n in [softmax, *views] for o in n.output[:1]
                 if (readers := [c for c in g.consumers[o] if not g.is_forward(c)])}
        chain = _score_chain(g, softmax)
        if not saved or chain is None:
            continue
        triggers = [t for name, readers in saved.items() for r in readers
                    if (t := _latest_input(g, r, position, name)) is not None]
        if not triggers:
            continue
        trigger = min(triggers, key=lambda t: position[id(g.producer[t])])
        first = min((r for readers in saved.values() for r in readers), key=lambda n: position[id(n)])
        renames = rw.copy(chain + [v for v in views if v.output[0] in saved], trigger, first, f".ra{done}")
        for name, readers in saved.items():
            for reader in readers:
                reader.input[:] = [renames[name] if i == name else i for i in reader.input]
        done += 1
    rw.write()
    return done


def _score_chain(g: _Graph, softmax: onnx.NodeProto, longest: int = 6) -> list[onnx.NodeProto] | None:
    """The nodes from an attention's score product to ``softmax``, in graph order: a product of two computed
    values, then only ``SCORE_OPS`` (their other inputs, a mask or a scale, are read as they are); None if
    ``softmax`` is not fed so within ``longest`` nodes."""

    def back(name: str, depth: int) -> list[onnx.NodeProto] | None:
        node = g.producer.get(name)
        if node is None or name in g.constants or not g.is_forward(node) or depth > longest:
            return None
        if node.op_type in PRODUCTS:
            operands = [i for i in node.input[:2] if i]
            computed = len(operands) == 2 and all(i in g.producer and i not in g.constants for i in operands)
            return [node] if computed else None
        if node.op_type not in SCORE_OPS:
            return None
        for i in node.input:
            if (below := back(i, depth + 1)) is not None:
                return below + [node]
        return None

    chain = back(softmax.input[0], 1)
    return None if chain is None else chain + [softmax]


def checkpoint_blocks(proto: onnx.ModelProto, loss: str) -> int:
    """Recompute each transformer block's saved activations in the backward; returns the blocks rewritten."""
    g = _Graph(proto.graph, loss)
    rw = _Rewriter(g)
    blocks: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for node in g.nodes:
        match = BLOCK.search(node.name)
        if match and g.is_forward(node):
            blocks[int(match.group(1))].append(node)
    done = 0
    for index, members in sorted(blocks.items()):
        inside = {id(n) for n in members}
        outputs = {o for n in members for o in n.output if o}
        block_out = [o for o in outputs if any(id(c) not in inside and g.is_forward(c) for c in g.consumers[o])]
        outputs -= set(block_out)  # what later blocks read stays: the checkpoints
        readers = [n for n in g.nodes if not g.is_forward(n) and any(i in outputs for i in n.input)]
        if not readers:
            continue
        trigger = _block_trigger(g, block_out, readers)
        if trigger is None:
            continue
        saved = {i for n in readers for i in n.input if i in outputs}
        needed = _needed(g, saved, inside)
        renames = rw.copy(needed, trigger, readers[0], f".rc{index}")
        for node in readers:
            for k, name in enumerate(node.input):
                if name in saved:
                    node.input[k] = renames[name]
        done += 1
    rw.write()
    return done


def _block_trigger(g: _Graph, block_out: list[str], readers: list[onnx.NodeProto]) -> str | None:
    """The gradient of one of the block's outputs that the block's own backward does not feed into."""
    reader_ids = {id(n) for n in readers}
    for name in sorted(block_out):
        grad = f"{name}_grad"  # ORT's gradient builder names the gradient of tensor T ``T_grad``
        if grad in g.producer and not (g._ancestors([grad]) & reader_ids):
            return grad
    return None


def _needed(g: _Graph, saved: set[str], inside: set[int]) -> list[onnx.NodeProto]:
    """The block's nodes (and the weight dequantizations they read) that ``saved`` depends on, in graph order."""
    wanted: set[int] = set()
    stack = [g.producer[s] for s in saved]
    while stack:
        node = stack.pop()
        if id(node) in wanted:
            continue
        wanted.add(id(node))
        for name in node.input:
            producer = g.producer.get(name)
            if producer is not None and (id(producer) in inside or _dequantizes(producer)):
                stack.append(producer)
    return [n for n in g.nodes if id(n) in wanted]
