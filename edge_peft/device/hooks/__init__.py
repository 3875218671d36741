"""Step hooks: adaptive rank (AdaLoRA), nested ranks (DyLoRA) and learning-rate multipliers (layer decay,
LoRA+). The command line and the Python API build them from the training options and pass them to the loop."""

from __future__ import annotations

from typing import Callable

from ...artifact.adapter_section import AdapterSpec
from ...backends import TrainingBackend
from ...errors import UserError
from .adaptive_rank import AdaptiveRank
from .base import StepHook, StepHooks
from .lr_multipliers import LearningRateMultipliers
from .nested_ranks import NestedRanks


HookFactory = Callable[[TrainingBackend], StepHook]


def build_hooks(config, spec: AdapterSpec, backend: TrainingBackend,
                extra: dict[str, HookFactory] | None = None) -> StepHooks:
    """The hooks a ``TrainConfig`` asks for (none for a plain run), then ``extra`` ones built on ``backend``."""
    if config.adaptive_rank and config.nested_ranks:
        raise UserError("--adaptive-rank and --nested-ranks exclude each other: choose one")
    if config.target_rank is not None and not config.adaptive_rank:
        raise UserError("--target-rank needs --adaptive-rank")
    hooks: dict[str, StepHook] = {}
    if config.layer_lr_decay != 1.0 or config.lr_ratio_b != 1.0:
        hooks["lr_multipliers"] = LearningRateMultipliers(backend, spec, config.layer_lr_decay, config.lr_ratio_b)
    if config.nested_ranks:
        hooks["nested_ranks"] = NestedRanks(backend, spec, config.seed)
    if config.adaptive_rank:
        target = config.target_rank if config.target_rank is not None else max(1, spec.rank // 2)
        hooks["adaptive_rank"] = AdaptiveRank(backend, spec, config.steps, target)
    hooks.update({name: make(backend) for name, make in (extra or {}).items()})
    return StepHooks(hooks)


__all__ = ["HookFactory", "StepHook", "StepHooks", "build_hooks"]
