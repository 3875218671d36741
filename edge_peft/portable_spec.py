"""Files and tensor names of the portable training-step graph: the contract between the exporter (which
writes it) and the portable device backend (which feeds it). No torch, no onnx imports.

One graph makes one micro-batch's contribution to an optimizer step: inputs are the batch, the
trainable tensors, the gradients accumulated by the step's earlier micro-batches, the AdamW moments,
the step number and the learning rate; outputs are the loss, the accumulated gradients including this
micro-batch, and the tensors and moments AdamW makes of them. The device loop keeps the update of the
step's last micro-batch (with one micro-batch per step, the common case, every output is used).
"""

from __future__ import annotations

STEP_MODEL = "portable_step.onnx"
INITIAL_STATE = "portable_init.safetensors"  # the trainable tensors a fresh run starts from
BATCH_INPUTS = ("input_ids", "attention_mask", "labels", "loss_scale")
LOSS = "loss"
BETAS = (0.9, 0.999)  # AdamW's, in the graph's update and wherever the device loop adjusts its moments
LR, STEP = "lr", "step"


def grad_name(name: str) -> str:
    """This micro-batch's gradient of trainable tensor ``name`` (an internal value of the graph)."""
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
