"""Trace a PyTorch function of (batch tensors, weights) into a standard ONNX graph with dynamic batch and
sequence axes: the route the portable step graphs take.

``make_fx(tracing_mode="symbolic")`` turns the function (forward and ``torch.func`` gradients) into plain aten
ops, functionalized and decomposed as the dynamo ONNX exporter wants them; ``torch.export.export(strict=False)``
and that exporter (opset 18, its decomposition pass skipped: nothing is left for it) turn that into ONNX. Weights
are inputs of the traced function and of the exported graph (so the exporter's optimizer cannot fold them
into new constants); callers make them initializers under their own names.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator
from unittest import mock

import onnx
import torch
from torch import nn

from ..artifact.manifest import IGNORE_INDEX

PORTABLE_OPSET = 18
BATCH, SEQUENCE = "batch", "sequence"


@dataclass
class Input:
    """A graph input: its name, an example value and which axes are the batch and sequence axes."""

    name: str
    example: torch.Tensor
    axes: dict[int, str]


class _Call(nn.Module):
    """(inputs, weights) -> the traced function's outputs (what ``torch.export`` exports)."""

    def __init__(self, traced: nn.Module):
        super().__init__()
        self.traced = traced

    def forward(self, inputs, weights):
        return self.traced(*inputs, *weights)


def trace(fn: Callable, inputs: list[Input], weights: list[tuple[str, torch.Tensor]], outputs: list[str],
          max_seq_len: int) -> onnx.ModelProto:
    """ONNX graph of ``fn(*inputs, *weights)`` (a tuple of tensors named ``outputs``); every input, the weights
    included, is a graph input under its name."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with warnings.catch_warnings(), _tracing_for_transformers(), _registry_quiet():
        warnings.simplefilter("ignore")
        # decomposed and functionalized here, in the one trace that must run anyway, so the ONNX exporter's own
        # decomposition pass (a third full re-trace: about a third of the time) is skipped below
        traced = make_fx(torch.func.functionalize(fn, remove="mutations"), tracing_mode="symbolic",
                         _allow_non_fake_inputs=True, decomposition_table=_onnx_decompositions())(
            *_symbolic_inputs(inputs, [w for _, w in weights]))
        dims = {BATCH: torch.export.Dim(BATCH), SEQUENCE: torch.export.Dim(SEQUENCE, max=max_seq_len)}
        dynamic = (tuple({axis: dims[kind] for axis, kind in i.axes.items()} or None for i in inputs),
                   (None,) * len(weights))
        program = torch.export.export(_Call(traced), (tuple(i.example for i in inputs), tuple(w for _, w in weights)),
                                      dynamic_shapes=dynamic, strict=False)
        with mock.patch("torch.onnx._internal.exporter._fx_passes.decompose_with_registry", lambda ep, _: ep):
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=PORTABLE_OPSET,
                                             input_names=[*(i.name for i in inputs), *(n for n, _ in weights)],
                                             output_names=outputs, optimize=True, verbose=False)
    return drop_node_metadata(onnx_program.model_proto)


def drop_node_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without what the exporter records on each node for debugging (``metadata_props``: the FX node,
    its module path and the exporting machine's stack trace with its file paths; ``doc_string``), which ONNX
    Runtime would keep in memory for every node of the step graph."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.ClearField("doc_string")
    return proto


def _onnx_decompositions() -> dict:
    """The decompositions the dynamo ONNX exporter applies (to the ops it has no ONNX function for)."""
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib(PORTABLE_OPSET)
    return _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))


@contextlib.contextmanager
def _registry_quiet() -> Iterator[None]:
    """Hold back the dynamo exporter's per-trace warnings that torchvision's operators are not registered
    (nothing traced here uses them)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets that are not -100, written out in elementwise ops: the exported
    gradient of ``aten.nll_loss`` drops the division by the number of targets."""
    flat = logits.reshape(-1, logits.shape[-1])
    targets = labels.reshape(-1)
    valid = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(flat, dim=-1)
    picked = log_probs.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    count = valid.sum().clamp(min=1).to(flat.dtype)
    return -(picked * valid.to(flat.dtype)).sum() / count


def _symbolic_inputs(inputs: list[Input], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fake inputs for ``make_fx``: batch and sequence axes symbolic, every other size (weights included) fixed.

    Symbolic weight sizes would turn every head split (``view(b, t, -1, head_dim)``) into floor divisions
    of symbols, whose guards make tracing time grow with the square of the layer count."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    dynamic = [mode.from_tensor(i.example, symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC if axis in i.axes else DimDynamic.STATIC for axis in range(i.example.ndim)]))
        for i in inputs]
    return [*dynamic, *(mode.from_tensor(w, static_shapes=True) for w in weights)]


@contextlib.contextmanager
def _tracing_for_transformers() -> Iterator[None]:
    """Tell transformers' mask code it is being traced: under ``grad_and_value`` the mask is a functorch
    wrapper its own check does not recognise, and it would branch on the mask's values (all ones?)."""
    from torch.fx.experimental import _config as fx_config

    # Without duck sizing a batch of 2 is not unified with some weight dimension that happens to be 2
    # (which the weights' shape guards would then specialise to a constant).
    # F.linear's C++ decomposition under functorch reads concrete sizes, which pins batch and sequence.
    with mock.patch("transformers.masking_utils.is_tracing", lambda *args, **kwargs: True), \
            mock.patch.object(fx_config, "use_duck_shape", False), \
            mock.patch.object(nn.functional, "linear", _linear):
        yield


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` as a matmul, which traces with symbolic batch and sequence sizes."""
    out = torch.matmul(x, weight.t())
    return out if bias is None else out + bias
