"""The variant interface, and the seeded A every frozen-A variant shares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from ..artifact.names import a_name, b_name, is_a, peft_key
from ..errors import UserError

if TYPE_CHECKING:
    from ..artifact.adapter_section import AdapterModule


def lora_a_from_seed(seed: int, rank: int, in_features: int) -> np.ndarray:
    """Regenerate the frozen LoRA-FA ``A`` [rank, in] from its seed.

    Same distribution as PEFT's default init (kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))),
    drawn with numpy's PCG64 so the device and the store rebuild it bit-identically without torch.
    """
    bound = 1.0 / np.sqrt(in_features)
    rng = np.random.default_rng(seed)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


class Variant:
    """A low-rank adapter ``y = W x + (alpha/r) B A x`` on each adapted linear layer (LoRA family).

    Subclasses set the class attributes and extend ``tensor_shapes``/``trained``/``peft_options``/
    ``torch_layer`` where they add tensors or change the layer.
    """

    name: ClassVar[str]  # as written in manifests, adapter files and ``--variant``
    title: ClassVar[str]  # as written in messages
    description: ClassVar[str]
    trains_a: ClassVar[bool]  # False: A is frozen and regenerated from its seed (may be left out of files)
    exact_average: ClassVar[bool] = False  # whether averaging each tensor averages the weight updates exactly
    inexact_because: ClassVar[str] = ""  # why not, for the store's refusal

    def tensor_shapes(self, module: "AdapterModule") -> dict[str, tuple[int, ...]]:
        """ONNX name -> shape of every adapter tensor of ``module``."""
        return {a_name(module.name): (module.rank, module.in_features),
                b_name(module.name): (module.out_features, module.rank)}

    def trained(self, module: "AdapterModule") -> list[str]:
        """ONNX names of the tensors of ``module`` that training updates."""
        return [n for n in self.tensor_shapes(module) if self.trains_a or not is_a(n)]

    def is_seeded(self, name: str) -> bool:
        """True for a tensor regenerated from its seed (a frozen A), by ONNX name or PEFT key."""
        return not self.trains_a and is_a(name)

    def complete(self, modules: list["AdapterModule"], tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """PEFT-keyed tensors with every left-out seeded A regenerated; a missing trained tensor is refused."""
        full = dict(tensors)
        for m in modules:
            key = peft_key(a_name(m.name))
            if key not in full:
                if self.trains_a:
                    raise UserError(f"adapter lacks {key}: only variants with a frozen A may omit it")
                full[key] = lora_a_from_seed(m.a_seed, m.rank, m.in_features)
        return full

    def check_seeded(self, modules: list["AdapterModule"], tensors: Mapping[str, np.ndarray], source: str) -> None:
        """Refuse a frozen A that is not the one its seed regenerates."""
        if self.trains_a:
            return
        for m in modules:
            key = peft_key(a_name(m.name))
            a = tensors.get(key)
            if a is not None and not np.array_equal(a, lora_a_from_seed(m.a_seed, m.rank, m.in_features)):
                raise UserError(f"{source}: {key} is not the frozen {self.title} A of seed {m.a_seed}: a {self.title} "
                                "adapter must keep A as regenerated from its seed (an adapter with a trained A needs "
                                "an artifact exported with --variant lora)")

    def peft_options(self) -> dict[str, Any]:
        """Keys of ``adapter_config.json`` that depend on the variant."""
        return {"use_dora": False}

    def torch_layer(self, base: Any, module: "AdapterModule", alpha: float) -> Any:
        """The torch module that replaces the linear layer ``base`` at export (imports torch)."""
        from ..exporter.adapter_layers import LoraLinear

        return LoraLinear(base, module.rank, alpha, module.a_seed, train_a=self.trains_a)
