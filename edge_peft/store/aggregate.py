"""Sample-weighted federated averaging of adapters whose variant averages exactly.

Every LoRA-FA device shares the same frozen A (regenerated from its seed), so the mean of the B
factors gives exactly the mean of the weight updates: sum_i w_i (s B_i A) = s (sum_i w_i B_i) A.
Variants that train A (LoRA, DoRA) do not: the mean of products is not the product of means, and
each refuses (``Variant.exact_average``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..adapters.peft_format import complete_tensors
from ..artifact.adapter_section import AdapterSpec
from ..errors import UserError


class FederatedAverage:
    """Running sample-weighted mean over adapters added one at a time (memory: one adapter plus the sum)."""

    def __init__(self, spec: AdapterSpec) -> None:
        _require_exact(spec)
        self.spec = spec
        self.a_keys = set(spec.expected_shapes()) - set(spec.expected_shapes(with_frozen=False))
        self.sums: dict[str, np.ndarray] = {}
        self.samples = 0
        self.count = 0

    def add(self, spec: AdapterSpec, tensors: Mapping[str, np.ndarray], samples: int, source: str) -> None:
        """Add one adapter trained on ``samples`` samples; refuse one that cannot be averaged exactly."""
        _require_exact(spec)
        if spec.compatibility_key() != self.spec.compatibility_key():
            raise UserError(f"{source} has other A seeds, ranks, targets or alpha than the first adapter: "
                            "only adapters exported from the same artifact can be averaged")
        averaged = {k: v for k, v in tensors.items() if k not in self.a_keys}
        if self.sums and (set(averaged) != set(self.sums)
                          or any(v.shape != self.sums[k].shape for k, v in averaged.items())):
            raise UserError(f"{source} holds other tensors or shapes than the first adapter: "
                            "only adapters exported from the same artifact can be averaged")
        if samples < 0:
            raise UserError(f"{source} reports {samples} samples: the sample count must be >= 0")
        for key, value in averaged.items():
            weighted = np.asarray(value, dtype=np.float64) * samples
            if key in self.sums:
                self.sums[key] += weighted
            else:
                self.sums[key] = weighted
        self.samples += samples
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        """The full averaged adapter (A regenerated from the seeds, averaged B and modules_to_save)."""
        if self.samples <= 0:
            raise UserError("the adapters to average report no training samples: push adapters from runs that trained")
        mean = {k: (v / self.samples).astype(np.float32) for k, v in self.sums.items()}
        return complete_tensors(self.spec, mean)


def _require_exact(spec: AdapterSpec) -> None:
    if not spec.kind.exact_average:
        raise UserError(f"adapters of variant {spec.variant!r} cannot be averaged exactly: {spec.kind.inexact_because}: "
                        "export with --variant lora-fa for federated averaging")
