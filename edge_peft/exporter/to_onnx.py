"""Trace a LoRA-injected transformers model to ONNX with the legacy TorchScript exporter.

Facts this relies on (the export pitfalls in ``docs/architecture.md``): opset 17, ``dynamo=False``,
eager attention, ``attention_mask`` passed explicitly, no constant folding (it would rename transposed
trainable weights), and initializers with identical values get merged: trainable tensors are made
unique before tracing (their true values restored by name afterwards) and frozen ones are split again
(``undo_value_dedup``).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .graph import undo_value_dedup
from .onnx_files import scratch_file

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


def export_logits_model(model: nn.Module, causal: bool, trainable: dict[str, torch.Tensor],
                        scratch: Path) -> onnx.ModelProto:
    """Trace ``model`` to ONNX (the tracer's files go to a scratch folder under ``scratch``, removed after);
    trainable initializers keep their names and true values."""
    wrapper = LogitsOnly(model, causal).eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"} if causal else {0: "batch"}}
    with distinct_values(trainable) as true_values, warnings.catch_warnings(), scratch_file(scratch) as path:
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, mask), str(path), input_names=INPUT_NAMES, output_names=["logits"],
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=False, dynamo=False)
        proto = onnx.load(str(path))
    undo_value_dedup(proto, tied_names(wrapper))
    restore_initializers(proto, {f"model.{k}": v.numpy() for k, v in true_values.items()})
    return proto


@contextlib.contextmanager
def distinct_values(trainable: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Shift every trainable tensor by a distinct constant while tracing (so the exporter merges none of
    them); yield their true values and put them back afterwards."""
    true_values = {name: t.detach().clone() for name, t in trainable.items()}
    with torch.no_grad():
        for i, t in enumerate(trainable.values()):
            t.add_(torch.full_like(t, 1e-3 * (i + 1)))
    try:
        yield true_values
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


def restore_initializers(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """Overwrite initializers by name; every name must be present exactly once."""
    by_name = {init.name: init for init in proto.graph.initializer}
    missing = sorted(set(values) - set(by_name))
    if missing:
        raise RuntimeError(f"exporter dropped or renamed trainable tensors: {missing[:3]}")
    for name, value in values.items():
        by_name[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
