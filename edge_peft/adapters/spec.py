"""The adapter part of a manifest: what the device, the store and PEFT files must agree on."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from ..manifest import AdapterModule, ExtraTensor, Manifest

PEFT_PREFIX = "base_model.model."
_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


@dataclass
class AdapterSpec:
    """Shapes, seeds and hyper-parameters of one base model's adapters (JSON-able)."""

    base_fingerprint: str
    model_type: str
    architecture: str
    task: str
    variant: str
    rank: int
    alpha: float
    seed: int
    target_modules: list[str]
    modules: list[AdapterModule]
    modules_to_save: list[ExtraTensor] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, m: Manifest) -> "AdapterSpec":
        return cls(
            m.base_fingerprint, m.model_type, m.architecture, m.task, m.variant, m.rank, m.alpha, m.seed,
            list(m.target_modules), list(m.modules), list(m.modules_to_save),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterSpec":
        try:
            raw = dict(data)
            raw["modules"] = [AdapterModule(**x) for x in raw["modules"]]
            raw["modules_to_save"] = [ExtraTensor(**x) for x in raw.get("modules_to_save", [])]
            return cls(**raw)
        except (KeyError, TypeError) as exc:
            raise UserError(f"adapter spec is malformed ({exc}): send the manifest's adapter section") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def expected_shapes(self, with_a: bool = True) -> dict[str, tuple[int, ...]]:
        """PEFT safetensors key -> shape for every tensor a full adapter file holds."""
        shapes: dict[str, tuple[int, ...]] = {}
        for m in self.modules:
            if with_a:
                shapes[lora_key(m.name, "A")] = (m.rank, m.in_features)
            shapes[lora_key(m.name, "B")] = (m.out_features, m.rank)
        for t in self.modules_to_save:
            shapes[PEFT_PREFIX + t.name] = tuple(t.shape)
        return shapes

    def compatibility_key(self) -> tuple:
        """Adapters can be averaged exactly only when this key is equal."""
        return (
            self.base_fingerprint, self.variant, self.seed, self.alpha,
            tuple((m.name, m.rank, m.a_seed) for m in self.modules),
        )


def layer_index(module_name: str) -> int | None:
    """Transformer block index of a module path (``...layers.3.self_attn.q_proj`` -> 3)."""
    match = _LAYER_INDEX.search(f".{module_name}.")
    return int(match.group(1)) if match else None


def lora_key(module: str, factor: str) -> str:
    """PEFT's safetensors key of a LoRA factor (``A`` or ``B``) of ``module``."""
    return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"


def lora_a_from_seed(seed: int, rank: int, in_features: int) -> np.ndarray:
    """Regenerate the frozen LoRA-FA ``A`` [rank, in] from its seed.

    Same distribution as PEFT's default init (kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))),
    drawn with numpy's PCG64 so the device and the store rebuild it bit-identically without torch.
    """
    bound = 1.0 / np.sqrt(in_features)
    rng = np.random.default_rng(seed)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
