"""Per-step hooks that act on adapter *values* between training steps.

The ORT training graph has fixed shapes, so rank allocation, nested ranks and per-layer learning
rates work on values the loop reads and writes by name between steps (``backend.trainable()``,
``set_trainable()``, ``gradients()``): a dropped rank channel is a zero column of B, a learning-rate
multiplier rescales a tensor's AdamW update. The loop calls, in order, for every optimizer step:
``before_step`` -> forward/backward of all micro-batches -> ``after_backward`` -> optimizer ->
``after_update``. Hook state (arrays) goes into the checkpoint, so ``--resume`` continues exactly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..adapters.spec import AdapterSpec, layer_index
from ..errors import UserError
from .backend import TrainingBackend
from .channels import a_name, b_name


class StepHook(Protocol):
    def before_step(self, step: int) -> None: ...

    def after_backward(self, step: int) -> None: ...

    def after_update(self, step: int) -> None: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


class StepHooks:
    """The hooks of one run, called in a fixed order; their states are saved under their names."""

    def __init__(self, hooks: dict[str, StepHook]):
        self.hooks = hooks

    def before_step(self, step: int) -> None:
        for hook in self.hooks.values():
            hook.before_step(step)

    def after_backward(self, step: int) -> None:
        for hook in self.hooks.values():
            hook.after_backward(step)

    def after_update(self, step: int) -> None:
        for hook in self.hooks.values():
            hook.after_update(step)

    def state(self) -> dict[str, np.ndarray]:
        """All hooks' arrays, keyed ``<hook>/<key>`` (saved as safetensors in the checkpoint)."""
        return {f"{name}/{key}": value for name, hook in self.hooks.items() for key, value in hook.state().items()}

    def metrics(self, step: int) -> dict:
        """What the hooks report for ``metrics.jsonl`` (e.g. the adaptive total rank and its budget)."""
        out: dict = {}
        for hook in self.hooks.values():
            report = getattr(hook, "metrics", None)
            if report is not None:
                out.update(report(step))
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name, hook in self.hooks.items():
            mine = substate(state, f"{name}/")
            if mine:
                hook.load_state(mine)


def substate(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays of ``state`` under ``prefix``, keyed without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


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
        if b_ratio != 1 and spec.variant != "lora":
            raise UserError("--lr-ratio-b needs a trained A: export with --variant lora (LoRA-FA trains only B)")
        self.backend = backend
        depth = max((layer_index(m.name) or 0) for m in spec.modules) if spec.modules else 0
        self.multipliers: dict[str, float] = {}
        for m in spec.modules:
            layer = layer_index(m.name)
            decay = layer_decay ** (depth - layer) if layer is not None else 1.0
            self.multipliers[b_name(m.name)] = decay
            if spec.variant == "lora":
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


def build_hooks(config, manifest, backend: TrainingBackend) -> StepHooks:
    """The hooks a ``TrainConfig`` asks for (none for a plain run)."""
    from .rank_allocation import AdaptiveRank, NestedRanks

    spec = AdapterSpec.from_manifest(manifest)
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
    return StepHooks(hooks)
