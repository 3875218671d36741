"""The adapter layers on the torch side (export and reference tests only; never on the device).

``LoraLinear``: ``y = base(x) + (alpha / r) * B(A(x))``. ``A`` is drawn from a recorded seed (numpy,
``variants.lora_a_from_seed``) and frozen for LoRA-FA; ``B`` starts at zero and is trained.
Parameter names follow PEFT (``<module>.lora_A.weight`` [r, in], ``<module>.lora_B.weight`` [out, r])
so ONNX initializer names map one-to-one onto PEFT safetensors keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ..variants import lora_a_from_seed


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    raise TypeError(f"{type(module).__name__} is not a linear layer")


class LoraLinear(nn.Module):
    """A frozen linear layer plus a low-rank update ``(alpha/r) B A``."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, a_seed: int, train_a: bool = False):
        super().__init__()
        in_features, out_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.from_numpy(lora_a_from_seed(a_seed, rank, in_features)))
            self.lora_B.weight.zero_()
        self.lora_A.weight.requires_grad_(train_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


class DoraLinear(LoraLinear):
    """DoRA: ``m / ||W + s B A||_row`` rescales each output channel of the LoRA-updated layer (PEFT's formula,
    with the norm differentiated rather than detached). ``lora_magnitude_vector`` [out] starts at the row
    norms of ``W``, so a fresh layer equals the base layer."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, a_seed: int, train_a: bool = False):
        super().__init__(base_layer, rank, alpha, a_seed, train_a)
        with torch.no_grad():
            self.lora_magnitude_vector = nn.Parameter(_row_norm(self._weight()))

    def _weight(self) -> torch.Tensor:
        """The frozen weight as [out, in] (GPT-2's ``Conv1D`` stores it [in, out])."""
        w = self.base_layer.weight
        return w.t() if type(self.base_layer).__name__ == "Conv1D" else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = _row_norm(self._weight() + self.scaling * (self.lora_B.weight @ self.lora_A.weight))
        scale = self.lora_magnitude_vector / norm
        base = self.base_layer(x)
        bias = getattr(self.base_layer, "bias", None)
        unbiased = base if bias is None else base - bias
        return base + (scale - 1) * unbiased + scale * self.lora_B(self.lora_A(x)) * self.scaling


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, in ops every exporter supports."""
    return torch.sqrt((w * w).sum(dim=1))
