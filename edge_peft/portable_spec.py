"""Files and tensor names of the portable training graphs: the contract between the exporter (which
writes them) and the portable device backend (which feeds them). No torch, no onnx imports."""

from __future__ import annotations

GRADIENT_MODEL = "portable_gradient.onnx"   # batch + adapters -> loss + adapter gradients
OPTIMIZER_MODEL = "portable_adamw.onnx"     # adapters + gradients + moments + lr + step -> updated ones
INITIAL_STATE = "portable_init.safetensors"  # the trainable tensors a fresh run starts from
BATCH_INPUTS = ("input_ids", "attention_mask", "labels", "loss_scale")
LOSS = "loss"
LR, STEP = "lr", "step"


def grad_name(name: str) -> str:
    """Gradient of trainable tensor ``name`` (gradient-graph output, optimizer-graph input)."""
    return f"{name}.grad"


def moment_names(name: str) -> tuple[str, str]:
    """First and second AdamW moments of trainable tensor ``name``."""
    return f"{name}.adam_m", f"{name}.adam_v"


def updated(name: str) -> str:
    """Optimizer-graph output holding the new value of input ``name``."""
    return f"{name}.new"
