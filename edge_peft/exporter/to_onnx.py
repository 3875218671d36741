"""Trace a LoRA-injected transformers model to ONNX with the legacy TorchScript exporter.

Facts this relies on (the export pitfalls in ``docs/architecture.md``): opset 17, ``dynamo=False``,
eager attention, ``attention_mask`` passed explicitly, no constant folding (it would rename transposed
trainable weights), and initializers with identical values get merged: trainable tensors are made
unique while tracing and frozen ones are split again (``undo_value_dedup``).

The tracer runs without the weights (``export_params=False``): it would otherwise serialize the whole
model into one protobuf string and parse it again, four copies of a large model at once. Each weight the
traced graph reads becomes an initializer made from the module's own tensor afterwards.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .graph import undo_value_dedup

OPSET = 17
INPUT_NAMES = ["input_ids", "attention_mask"]


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits, the graph both training and inference start from."""

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"use_cache": False} if self.causal else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra).logits


def export_logits_model(model: nn.Module, causal: bool, trainable: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """Trace ``model`` to ONNX; trainable initializers keep their names and true values."""
    wrapper = LogitsOnly(model, causal).eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"} if causal else {0: "batch"}}
    return trace(wrapper, (ids, mask), trainable, input_names=INPUT_NAMES, output_names=["logits"],
                 dynamic_axes=axes)


def trace(wrapper: nn.Module, args: tuple, trainable: dict[str, torch.Tensor], input_names: list[str],
          **export_args) -> onnx.ModelProto:
    """``wrapper`` traced to ONNX (opset ``OPSET``, no constant folding), its weights initializers named by their
    path in ``wrapper``: trainable tensors each their own, equal-valued frozen copies split again, tied ones
    read once."""
    buffer = io.BytesIO()
    with distinct_values(trainable), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, buffer, input_names=input_names, export_params=False, opset_version=OPSET,
                          do_constant_folding=False, dynamo=False, **export_args)
    proto = onnx.load_from_string(buffer.getvalue())
    del buffer
    attach_weights(proto, wrapper, set(input_names))
    undo_value_dedup(proto, tied_names(wrapper))
    return proto


def attach_weights(proto: onnx.ModelProto, module: nn.Module, data_inputs: set[str]) -> None:
    """Turn every graph input outside ``data_inputs`` (the weights a trace without parameters reads) into an
    initializer holding ``module``'s tensor of that name, one tensor copied at a time."""
    tensors = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
    weights = [value.name for value in proto.graph.input if value.name not in data_inputs]
    unknown = [name for name in weights if name not in tensors]
    if unknown:
        raise RuntimeError(f"the traced graph reads tensors the model does not hold: {unknown[:3]}")
    for name in weights:
        array = np.ascontiguousarray(tensors[name].detach().numpy())
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    kept = [value for value in proto.graph.input if value.name in data_inputs]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)


@contextlib.contextmanager
def distinct_values(trainable: dict[str, torch.Tensor]) -> Iterator[None]:
    """Shift every trainable tensor by a distinct constant while tracing (so the exporter merges none of
    them); put their true values back afterwards."""
    true_values = {name: t.detach().clone() for name, t in trainable.items()}
    with torch.no_grad():
        for i, t in enumerate(trainable.values()):
            t.add_(torch.full_like(t, 1e-3 * (i + 1)))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, t in trainable.items():
                t.copy_(true_values[name])


def tied_names(module: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier parameter (tied weights)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        else:
            seen[p.data_ptr()] = name
    return tied
