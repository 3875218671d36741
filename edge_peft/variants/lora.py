"""LoRA-FA (A frozen from a seed, B trained: the default) and plain LoRA (A and B trained)."""

from __future__ import annotations

from .base import Variant


class LoraFA(Variant):
    """Every device shares the seeded A, so averaging B across devices averages their updates B·A exactly."""

    name = "lora-fa"
    title = "LoRA-FA"
    description = "A frozen from a recorded seed, B trained (averages exactly in the store)"
    trains_a = False
    exact_average = True


class Lora(Variant):
    """The mean of products is not the product of means: the store refuses to average it."""

    name = "lora"
    title = "LoRA"
    description = "A and B trained"
    trains_a = True
    inexact_because = "they train A, so averaging A and B separately is not the average of their updates B·A"
