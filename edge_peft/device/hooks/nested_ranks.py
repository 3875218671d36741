"""Nested ranks (DyLoRA) as a step hook: every prefix of the rank channels becomes a working adapter."""

from __future__ import annotations

import numpy as np

from ...adapters.ranks import nested_gain
from ...artifact.adapter_section import AdapterSpec
from ...backends import TrainingBackend


class NestedRanks:
    """DyLoRA: each step trains the first ``b`` channels of every module, ``b`` drawn uniformly from
    1..r (seeded by step, so a resumed run draws the same), at the prefix's rank-stabilised scale
    (``ranks.nested_gain``: ``sqrt(r / b)`` times the export's ``alpha / r``). The channels past ``b``
    sit the step out (``backend.gate_channels`` with gain 0: no contribution, no update), so any prefix
    ``k``, its B columns times ``nested_gain(r, k)``, is a working rank-``k`` adapter."""

    def __init__(self, backend: TrainingBackend, spec: AdapterSpec, seed: int):
        self.backend, self.spec, self.seed = backend, spec, seed
        self.prefix = spec.rank

    def draw(self, step: int) -> int:
        return int(np.random.default_rng([self.seed, 7919, step]).integers(1, self.spec.rank + 1))

    def gains(self, b: int) -> np.ndarray:
        """Per channel: ``nested_gain(r, b)`` for the first ``b``, 0 past them."""
        r = self.spec.rank
        return np.where(np.arange(r) < b, nested_gain(r, b), 0.0).astype(np.float32)

    def before_step(self, step: int) -> None:
        self.prefix = b = self.draw(step)
        if b < self.spec.rank:
            self.backend.gate_channels({m.name: self.gains(b) for m in self.spec.modules})

    def after_backward(self, step: int) -> None:
        pass

    def after_update(self, step: int) -> None:
        pass

    def metrics(self, step: int) -> dict:
        return {"rank_prefix": self.prefix}

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        pass
