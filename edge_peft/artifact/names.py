"""Tensor and graph-value names shared by the exporter, the backends, the device loop and the store.

Three naming systems meet here:
- ONNX names: a parameter's path in the Hugging Face model (``model.layers.0.self_attn.q_proj.lora_B.weight``);
  the exporter keeps them as initializer and input names, and backends read and write tensors by them.
- PEFT keys: the same with PEFT's prefix (``base_model.model.``), as in ``adapter_model.safetensors``.
- graph values of the training graphs: batch inputs, the loss, and per trainable tensor its gradient,
  accumulated gradient, AdamW moments and updated value (the portable step graph).
"""

from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."
A, B = "A", "B"
LORA_SUFFIX = {A: ".lora_A.weight", B: ".lora_B.weight"}
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA's per-output-channel magnitude (PEFT's key, no ``.weight``)

INPUT_IDS, ATTENTION_MASK, LABELS, LOSS_SCALE = "input_ids", "attention_mask", "labels", "loss_scale"
BATCH_INPUTS = (INPUT_IDS, ATTENTION_MASK, LABELS, LOSS_SCALE)  # what a training graph is fed per micro-batch
INFERENCE_INPUTS = (INPUT_IDS, ATTENTION_MASK)
LOGITS = "logits"
POSITION_IDS = "position_ids"  # the generation graph's positions of the new tokens
CONTEXT_LENGTH_KEY = "context_length"  # the generation graph's metadata: the longest sequence its positions cover
LOSS = "loss"

_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


def peft_key(onnx_name: str) -> str:
    """PEFT safetensors key of an ONNX tensor name."""
    return PEFT_PREFIX + onnx_name


def onnx_name(key: str) -> str:
    """ONNX tensor name of a PEFT key (a name without the prefix is returned as is)."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def factor_name(module: str, factor: str) -> str:
    """ONNX name of LoRA factor ``A`` or ``B`` of ``module``."""
    return module + LORA_SUFFIX[factor]


def a_name(module: str) -> str:
    return factor_name(module, A)


def b_name(module: str) -> str:
    return factor_name(module, B)


def magnitude_name(module: str) -> str:
    """ONNX name of a DoRA module's magnitude vector."""
    return module + MAGNITUDE_SUFFIX


def lora_key(module: str, factor: str) -> str:
    """PEFT key of LoRA factor ``A`` or ``B`` of ``module``."""
    return peft_key(factor_name(module, factor))


def is_a(name: str) -> bool:
    """True for a LoRA A factor, by ONNX name or PEFT key."""
    return name.endswith(LORA_SUFFIX[A])


def is_b(name: str) -> bool:
    """True for a LoRA B factor, by ONNX name or PEFT key."""
    return name.endswith(LORA_SUFFIX[B])


def is_lora_factor(name: str) -> bool:
    return is_a(name) or is_b(name)


def layer_index(module_name: str) -> int | None:
    """Transformer block index of a module path (``...layers.3.self_attn.q_proj`` -> 3)."""
    match = _LAYER_INDEX.search(f".{module_name}.")
    return int(match.group(1)) if match else None


def past_key(layer: int) -> str:
    """Generation graph input: layer ``layer``'s cached keys [batch, kv_heads, past, head_dim]."""
    return f"past.{layer}.key"


def past_value(layer: int) -> str:
    return f"past.{layer}.value"


def present_key(layer: int) -> str:
    """Generation graph output: layer ``layer``'s keys after this step [batch, kv_heads, past + new, head_dim]."""
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def grad_name(name: str) -> str:
    """This micro-batch's gradient of trainable tensor ``name`` (a value inside the portable step graph)."""
    return f"{name}.grad"


def accumulated(name: str) -> str:
    """Gradient of ``name`` accumulated over the step's earlier micro-batches (input; zeros at first)."""
    return f"{name}.grad_acc"


def moment_names(name: str) -> tuple[str, str]:
    """First and second AdamW moments of trainable tensor ``name``."""
    return f"{name}.adam_m", f"{name}.adam_v"


def updated(name: str) -> str:
    """Graph output holding the new value of input ``name`` (values, moments, accumulated gradients)."""
    return f"{name}.new"
