"""The generation graph: one forward step of a causal LM with past keys/values in and out (a KV cache).

``generation_model.onnx`` takes ``input_ids`` [batch, new], ``attention_mask`` [batch, past + new],
``position_ids`` [batch, new] and per layer ``past.<i>.key`` / ``past.<i>.value`` [batch, kv_heads, past,
head_dim]; it returns ``logits`` of the last position only [batch, vocab] and ``present.<i>.key`` /
``present.<i>.value`` [batch, kv_heads, past + new, head_dim]. Prefill feeds the prompt with an empty past
(length 0); each further token feeds one position. The adapter tensors stay graph inputs (as in the
inference model), so any adapter of the artifact is fed at run time; the frozen base goes through the same
transpose folding and quantization (int8 or int4) as the other graphs (``graph.prepare_frozen``).

Traced with the legacy exporter (``dynamo=False``, opset 17): the wrapper builds transformers'
``DynamicCache`` from the flat tensors inside ``forward`` and flattens the updated cache back.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import DynamicCache

from ..artifact.files import GENERATION_MODEL
from ..artifact.names import (ATTENTION_MASK, CONTEXT_LENGTH_KEY, INPUT_IDS, LOGITS, POSITION_IDS, past_key,
                              past_value, present_key, present_value)
from . import graph
from .onnx_files import WeightsFile
from .to_onnx import trace

WRAPPER_PREFIX = "model."


class CachedStep(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (last-position logits, *present)."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits[:, -1, :], *flat)


def cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's cache, read from one tiny forward pass."""
    with torch.no_grad():
        out = model(input_ids=torch.ones(1, 2, dtype=torch.long), use_cache=True, return_dict=True)
    layers = out.past_key_values.layers
    _, heads, _, dim = layers[0].keys.shape
    return len(layers), int(heads), int(dim)


def export_generation_model(model: nn.Module, trainable: dict[str, torch.Tensor], quantize: str, block: int,
                            context_length: int, out: Path, weights: WeightsFile) -> None:
    """Write ``GENERATION_MODEL`` into ``out`` (its weights into ``weights``): trace, restore trainable values,
    quantize, adapters as inputs."""
    num_layers, heads, dim = cache_shape(model)
    wrapper = CachedStep(model, num_layers).eval()
    past_len, new_len = 3, 2
    ids = torch.ones(1, new_len, dtype=torch.long)
    mask = torch.ones(1, past_len + new_len, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new_len, dtype=torch.long)[None]
    past = [torch.randn(1, heads, past_len, dim) for _ in range(2 * num_layers)]
    past_names = [n for i in range(num_layers) for n in (past_key(i), past_value(i))]
    present_names = [n for i in range(num_layers) for n in (present_key(i), present_value(i))]
    axes = {INPUT_IDS: {0: "batch", 1: "new"}, ATTENTION_MASK: {0: "batch", 1: "total"},
            POSITION_IDS: {0: "batch", 1: "new"}, LOGITS: {0: "batch"},
            **{n: {0: "batch", 2: "past"} for n in past_names}, **{n: {0: "batch", 2: "total"} for n in present_names}}
    proto = trace(wrapper, (ids, mask, positions, *past), trainable,
                  input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names],
                  output_names=[LOGITS, *present_names], dynamic_axes=axes)
    graph.strip_prefix(proto, WRAPPER_PREFIX)
    graph.prepare_frozen(proto, list(trainable), quantize, block)
    graph.initializers_to_inputs(proto, list(trainable))
    onnx.helper.set_model_props(proto, {CONTEXT_LENGTH_KEY: str(context_length)})
    weights.save(proto, out / GENERATION_MODEL)
