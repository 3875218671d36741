"""The memory section of a manifest: the byte counts of the artifact the memory model and planner need.

The exporter fills every field from the graphs it wrote (real byte counts, no estimates); an export
planned for a budget adds what it planned (``budget_mb``, ``margin``, ``profile``, ``export_plan``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import UserError


@dataclass
class MemoryFigures:
    frozen_bytes: int  # storage of every frozen tensor of the training graph (int8 weights, scales, fp32 rest)
    quantized_bytes: int  # of which quantized weights and their scales (0 for an fp32 base)
    trainable_values: int  # values training updates (each has a gradient and two AdamW moments)
    intermediate_size: int  # MLP width, for the activation term
    loss_chunks: int = 0  # > 0: the target-only LM head and loss in this many chunks (ORT training graph)
    checkpointing: bool = False  # the training graphs recompute each block's activations in the backward
    quantized_values: int = 0  # values stored int8 or int4 (their fp32 copies are what dequantizing makes); 0: unknown
    step_nodes: int = 0  # nodes the portable step loads (its graph, or its distinct pieces); 0: none written, or unknown
    step_frozen_bytes: int = 0  # of the frozen tensors, what the portable step reads; 0: none written, or unknown
    train_nodes: int = 0  # nodes of the ORT training graph; 0: none written, or unknown
    # the training graphs keep one attention's probabilities at a time: recomputed in the backward, or checkpointed
    attention_recompute: bool = False
    head_slices: int = 0  # vocabulary slices the ORT training graph reads its LM head in; 0: none written, or whole
    budget_mb: float | None = None
    margin: float | None = None
    profile: str | None = None
    export_plan: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "MemoryFigures":
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise UserError(f"{source}: the memory section has unexpected fields: re-export the artifact")
        try:
            return cls(**data)
        except TypeError as exc:
            raise UserError(f"{source}: the memory section is incomplete ({exc}): re-export the artifact") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
