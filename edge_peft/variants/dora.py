"""DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT's ``use_dora``) with A trained or frozen from its seed.

Each adapted layer computes ``y = m / ||W + s B A||_row * (W + s B A) x (+ bias)``: a trained magnitude
``m`` per output channel (PEFT's ``lora_magnitude_vector``, initialised to the row norms of ``W``) times
the direction of the LoRA-updated weight. Unlike PEFT, which detaches the norm to save memory (the
paper's section 4.3), the exported graphs differentiate through it: both backends then compute the
same exact gradient. The store does not average DoRA adapters: the norm makes the update non-linear
in B and m.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..artifact.names import magnitude_name
from .base import Variant

if TYPE_CHECKING:
    from ..artifact.adapter_section import AdapterModule


class DoRA(Variant):
    name = "dora"
    title = "DoRA"
    description = "weight-decomposed LoRA (PEFT's use_dora): a trained magnitude per output channel, A and B trained"
    trains_a = True
    inexact_because = ("the magnitude divides each update by a norm that depends on B·A, so averaging their "
                       "tensors is not the average of their updates")

    def tensor_shapes(self, module: "AdapterModule") -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(module), magnitude_name(module.name): (module.out_features,)}

    def peft_options(self) -> dict[str, Any]:
        return {"use_dora": True}

    def torch_layer(self, base: Any, module: "AdapterModule", alpha: float) -> Any:
        from ..exporter.adapter_layers import DoraLinear

        return DoraLinear(base, module.rank, alpha, module.a_seed, train_a=self.trains_a)


class DoRAFA(DoRA):
    name = "dora-fa"
    title = "DoRA-FA"
    description = "DoRA with A frozen from a recorded seed: B and the magnitude trained"
    trains_a = False
