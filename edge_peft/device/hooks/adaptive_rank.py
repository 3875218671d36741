"""Adaptive rank allocation (AdaLoRA) as a step hook on adapter values.

AdaLoRA writes the update as ``P diag(lambda) Q`` and prunes the triplets of lowest importance under
a global budget. Here the update is ``B A`` with A frozen (LoRA-FA) or trained (LoRA); writing
``B = B' diag(lambda)`` shows that a channel's lambda-sensitivity ``|lambda_k dL/dlambda_k|`` equals
``|sum_j B_jk dL/dB_jk|``, computable from B and its gradient without changing the graph. As in the
paper, every sensitivity ``I = |w dL/dw|`` (of each lambda, each B entry and, when A is trained, each A
entry) is smoothed on its own, ``I_bar = b1 I_bar + (1-b1) I``, ``U_bar = b2 U_bar + (1-b2)|I - I_bar|``,
scored ``s = I_bar * U_bar``, and a channel's importance is ``s(lambda_k) + mean_j s(B_jk)
(+ mean_i s(A_ki))``. A pruned channel is a zero column of B (and row of A), re-zeroed after every
update, so it never comes back. The smoothed state is checkpointed, so a resumed run prunes the same.
"""

from __future__ import annotations

import numpy as np

from ...adapters.channels import zero_channels
from ...artifact.adapter_section import AdapterSpec
from ...artifact.names import a_name, b_name
from ...backends import TrainingBackend
from ...errors import UserError
from .base import substate


def budget_at(step: int, total_steps: int, initial: int, target: int, warmup: int, final: int) -> int:
    """AdaLoRA's global budget: ``initial`` for ``warmup`` steps, a cubic decrease to ``target``, then
    ``target`` for the last ``final`` steps."""
    decrease = total_steps - warmup - final
    if step < warmup or decrease <= 0 and step < total_steps - final:
        return initial
    if step >= total_steps - final:
        return target
    progress = (step - warmup) / decrease
    return target + int(round((initial - target) * (1 - progress) ** 3))


class AdaptiveRank:
    """Prunes rank channels across all modules down to ``target_rank`` per module on average."""

    def __init__(self, backend: TrainingBackend, spec: AdapterSpec, total_steps: int, target_rank: int,
                 warmup_fraction: float = 0.1, final_fraction: float = 0.2, beta1: float = 0.85, beta2: float = 0.85):
        if not 1 <= target_rank <= spec.rank:
            raise UserError(f"--target-rank {target_rank} must be between 1 and the exported rank {spec.rank}")
        self.backend, self.spec = backend, spec
        self.modules = [m.name for m in spec.modules]
        self.initial = spec.rank * len(self.modules)
        self.target = target_rank * len(self.modules)
        self.total_steps = total_steps
        self.warmup = int(round(warmup_fraction * total_steps))
        self.final = int(round(final_fraction * total_steps))
        self.beta1, self.beta2 = beta1, beta2
        self.active = {m: np.ones(spec.rank, bool) for m in self.modules}
        self.i_bar: dict[str, np.ndarray] = {}  # smoothed sensitivity, per element of B (and A) and per lambda
        self.u_bar: dict[str, np.ndarray] = {}  # its uncertainty

    def budget(self, step: int) -> int:
        return budget_at(step, self.total_steps, self.initial, self.target, self.warmup, self.final)

    def total_rank(self) -> int:
        return int(sum(a.sum() for a in self.active.values()))

    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        lora = self.spec.kind.trains_a
        values = self.backend.trainable()
        grads = self.backend.gradients([b_name(m) for m in self.modules]
                                       + ([a_name(m) for m in self.modules] if lora else []))
        for m in self.modules:
            b_sens = values[b_name(m)] * grads[b_name(m)]
            self._smooth(lambda_name(m), np.abs(b_sens.sum(axis=0)))
            self._smooth(b_name(m), np.abs(b_sens))
            if lora:
                self._smooth(a_name(m), np.abs(values[a_name(m)] * grads[a_name(m)]))

    def _smooth(self, name: str, sensitivity: np.ndarray) -> None:
        """The paper's EMA of the sensitivity and of its deviation from that EMA."""
        i_bar = self.i_bar.get(name, np.zeros_like(sensitivity))
        u_bar = self.u_bar.get(name, np.zeros_like(sensitivity))
        self.i_bar[name] = i_bar = self.beta1 * i_bar + (1 - self.beta1) * sensitivity
        self.u_bar[name] = self.beta2 * u_bar + (1 - self.beta2) * np.abs(sensitivity - i_bar)

    def scores(self, module: str) -> np.ndarray:
        """Each channel's importance: s(lambda_k) + mean_j s(B_jk) (+ mean_i s(A_ki)), with s = I_bar * U_bar."""
        def s(name: str) -> np.ndarray:
            return self.i_bar[name] * self.u_bar[name]

        score = s(lambda_name(module)) + s(b_name(module)).mean(axis=0)
        if self.spec.kind.trains_a:
            score = score + s(a_name(module)).mean(axis=1)
        return score

    def after_update(self, step: int) -> None:
        excess = self.total_rank() - self.budget(step)
        if excess > 0:
            self._prune(excess)
        self._zero_pruned()

    def _prune(self, count: int) -> None:
        """Drop the ``count`` active channels of lowest score, never a module's last one."""
        scores = {m: self.scores(m) for m in self.modules}
        candidates = sorted((float(scores[m][k]), m, int(k))
                            for m in self.modules for k in np.flatnonzero(self.active[m]))
        for _, m, k in candidates:
            if count == 0:
                break
            if self.active[m].sum() > 1:
                self.active[m][k] = False
                count -= 1

    def _zero_pruned(self) -> None:
        values, changed = self.backend.trainable(), {}
        for m in self.modules:
            dead = ~self.active[m]
            if dead.any():
                for n in [b_name(m)] + ([a_name(m)] if self.spec.kind.trains_a else []):
                    changed[n] = zero_channels(values[n], n, dead)
        if changed:
            self.backend.set_trainable(changed)

    def metrics(self, step: int) -> dict:
        return {"total_rank": self.total_rank(), "rank_budget": self.budget(step)}

    def channels(self) -> dict[str, list[int]]:
        return {m: [int(k) for k in np.flatnonzero(self.active[m])] for m in self.modules}

    def state(self) -> dict[str, np.ndarray]:
        return ({f"active/{m}": a for m, a in self.active.items()} | {f"i_bar/{n}": v for n, v in self.i_bar.items()}
                | {f"u_bar/{n}": v for n, v in self.u_bar.items()})

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.active = {m: a.astype(bool) for m, a in substate(state, "active/").items()}
        self.i_bar, self.u_bar = substate(state, "i_bar/"), substate(state, "u_bar/")


def lambda_name(module: str) -> str:
    """Key of a channel's lambda-sensitivity in the importance state (lambda itself is folded into B)."""
    return f"{module}.lambda"
