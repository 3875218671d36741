"""The adapter section of a manifest: what the device, the store and PEFT files must agree on.

It is nested in ``manifest.json`` under ``adapter`` and is also the store's description of a base
(pushes send it, the store keeps it): one dataclass, one JSON shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError
from ..variants import Variant, get_variant
from .names import PEFT_PREFIX


@dataclass
class AdapterModule:
    """One adapted linear layer: its path in the HF model, its shape and how A is regenerated."""

    name: str
    in_features: int
    out_features: int
    rank: int
    a_seed: int


@dataclass
class ExtraTensor:
    """A trainable tensor that is not an adapter factor (e.g. a new classification head)."""

    name: str
    shape: list[int]


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
    base_model: str | None = None  # the base's hub id when its config names one, else the exported directory

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter spec") -> "AdapterSpec":
        try:
            raw = dict(data)
            raw["modules"] = [AdapterModule(**x) for x in raw["modules"]]
            raw["modules_to_save"] = [ExtraTensor(**x) for x in raw.get("modules_to_save", [])]
            return cls(**raw)
        except (KeyError, TypeError) as exc:
            raise UserError(f"{source} is malformed ({exc}): send the manifest's adapter section") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kind(self) -> Variant:
        """The registered variant object (``variants.get_variant``)."""
        return get_variant(self.variant)

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / r applied to B(Ax)."""
        return self.alpha / self.rank

    def expected_shapes(self, with_frozen: bool = True) -> dict[str, tuple[int, ...]]:
        """PEFT key -> shape of every tensor a full adapter file holds (``with_frozen=False``: without the
        seeded A a frozen-A variant may leave out)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for m in self.modules:
            for name, shape in self.kind.tensor_shapes(m).items():
                if with_frozen or not self.kind.is_seeded(name):
                    shapes[PEFT_PREFIX + name] = shape
        for t in self.modules_to_save:
            shapes[PEFT_PREFIX + t.name] = tuple(t.shape)
        return shapes

    def trainable_values(self) -> int:
        """Number of values training updates."""
        shapes = {n: s for m in self.modules for n, s in self.kind.tensor_shapes(m).items()}
        count = sum(_prod(shapes[n]) for m in self.modules for n in self.kind.trained(m))
        return count + sum(_prod(t.shape) for t in self.modules_to_save)

    def compatibility_key(self) -> tuple:
        """Adapters can be averaged exactly only when this key is equal."""
        return (
            self.base_fingerprint, self.variant, self.seed, self.alpha,
            tuple((m.name, m.rank, m.a_seed) for m in self.modules),
        )

    def validate(self, problems: list[str]) -> None:
        """Append what is wrong with the section to ``problems``."""
        try:
            get_variant(self.variant)
        except UserError as exc:
            problems.append(str(exc).split(":")[0])
        if not self.modules:
            problems.append("no adapter modules")
        if not str(self.base_fingerprint).startswith("sha256:"):
            problems.append("base_fingerprint is not a sha256")
        for m in self.modules:
            if m.rank <= 0 or m.rank > min(m.in_features, m.out_features):
                problems.append(f"module {m.name} has rank {m.rank} outside 1..{min(m.in_features, m.out_features)}")


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out
