"""The step-hook interface: hooks act on adapter *values* between training steps.

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

    def __getitem__(self, name: str) -> StepHook:
        return self.hooks[name]

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
