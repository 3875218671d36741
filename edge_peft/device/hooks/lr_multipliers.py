"""Per-tensor learning-rate multipliers: layer-wise decay and a B-vs-A ratio (LoRA+)."""

from __future__ import annotations

import numpy as np

from ...artifact.adapter_section import AdapterSpec
from ...artifact.names import a_name, b_name, layer_index
from ...backends import TrainingBackend
from ...errors import UserError


class LearningRateMultipliers:
    """Per-tensor learning-rate multipliers: layer-wise decay and a B-vs-A ratio (LoRA+).

    AdamW's update is linear in the learning rate, so scaling a tensor's update after the step by
    ``m`` is exactly training it with learning rate ``m * lr``.
    """

    def __init__(self, backend: TrainingBackend, spec: AdapterSpec, layer_decay: float = 1.0, b_ratio: float = 1.0):
        if not 0 < layer_decay <= 1:
            raise UserError(f"--layer-lr-decay {layer_decay} must be in (0, 1] (1: no decay)")
        if b_ratio <= 0:
            raise UserError(f"--lr-ratio-b {b_ratio} must be positive")
        if b_ratio != 1 and not spec.kind.trains_a:
            raise UserError(f"--lr-ratio-b needs a trained A: export with --variant lora ({spec.variant} trains only B)")
        self.backend = backend
        depth = max((layer_index(m.name) or 0) for m in spec.modules) if spec.modules else 0
        self.multipliers: dict[str, float] = {}
        for m in spec.modules:
            layer = layer_index(m.name)
            decay = layer_decay ** (depth - layer) if layer is not None else 1.0
            self.multipliers[b_name(m.name)] = decay
            if spec.kind.trains_a:
                self.multipliers[a_name(m.name)] = decay / b_ratio
        self.multipliers = {k: v for k, v in self.multipliers.items() if v != 1.0}
        self._before: dict[str, np.ndarray] = {}

    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        current = self.backend.trainable()
        self._before = {k: current[k] for k in self.multipliers}

    def after_update(self, step: int) -> None:
        current = self.backend.trainable()
        self.backend.set_trainable({k: (old + self.multipliers[k] * (current[k] - old)).astype(np.float32)
                                    for k, old in self._before.items()})
        self._before = {}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        pass
