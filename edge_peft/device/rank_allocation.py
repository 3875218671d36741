"""Adaptive rank allocation (AdaLoRA) and nested ranks (DyLoRA) as step hooks on adapter values.

AdaLoRA writes the update as ``P diag(lambda) Q`` and prunes the triplets of lowest importance under
a global budget. Here the update is ``B A`` with A frozen (LoRA-FA) or trained (LoRA); writing
``B = B' diag(lambda)`` shows that a channel's lambda-sensitivity ``|lambda_k dL/dlambda_k|`` equals
``|sum_j B_jk dL/dB_jk|``, computable from B and its gradient without changing the graph. A channel's
importance is that plus the mean element sensitivity of its B column (and of its A row when A is
trained), smoothed as in the paper: ``I_bar = b1 I_bar + (1-b1) I``, ``U_bar = b2 U_bar + (1-b2)|I - I_bar|``,
score ``I_bar * U_bar``. A pruned channel is a zero column of B (and row of A), re-zeroed after every
update, so it never comes back.
"""

from __future__ import annotations

import numpy as np

from ..adapters.spec import AdapterSpec
from ..errors import UserError
from .backend import TrainingBackend
from .step_hooks import a_name, b_name


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
        r = spec.rank
        self.active = {m: np.ones(r, bool) for m in self.modules}
        self.i_bar = {m: np.zeros(r) for m in self.modules}
        self.u_bar = {m: np.zeros(r) for m in self.modules}

    def budget(self, step: int) -> int:
        return budget_at(step, self.total_steps, self.initial, self.target, self.warmup, self.final)

    def total_rank(self) -> int:
        return int(sum(a.sum() for a in self.active.values()))

    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        values = self.backend.trainable()
        grads = self.backend.gradients([b_name(m) for m in self.modules]
                                       + ([a_name(m) for m in self.modules] if self.spec.variant == "lora" else []))
        for m in self.modules:
            b, gb = values[b_name(m)], grads[b_name(m)]
            score = np.abs((b * gb).sum(axis=0)) + np.abs(b * gb).mean(axis=0)
            if self.spec.variant == "lora":
                score = score + np.abs(values[a_name(m)] * grads[a_name(m)]).mean(axis=1)
            self.i_bar[m] = self.beta1 * self.i_bar[m] + (1 - self.beta1) * score
            self.u_bar[m] = self.beta2 * self.u_bar[m] + (1 - self.beta2) * np.abs(score - self.i_bar[m])

    def after_update(self, step: int) -> None:
        excess = self.total_rank() - self.budget(step)
        if excess > 0:
            self._prune(excess)
        self._zero_pruned()

    def _prune(self, count: int) -> None:
        """Drop the ``count`` active channels of lowest score, never a module's last one."""
        candidates = sorted((float(self.i_bar[m][k] * self.u_bar[m][k]), m, int(k))
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
                b = values[b_name(m)].copy()
                b[:, dead] = 0
                changed[b_name(m)] = b
                if self.spec.variant == "lora":
                    a = values[a_name(m)].copy()
                    a[dead, :] = 0
                    changed[a_name(m)] = a
        if changed:
            self.backend.set_trainable(changed)

    def metrics(self, step: int) -> dict:
        return {"total_rank": self.total_rank(), "rank_budget": self.budget(step)}

    def channels(self) -> dict[str, list[int]]:
        return {m: [int(k) for k in np.flatnonzero(self.active[m])] for m in self.modules}

    def state(self) -> dict:
        return {"active": {m: a.tolist() for m, a in self.active.items()},
                "i_bar": {m: v.tolist() for m, v in self.i_bar.items()},
                "u_bar": {m: v.tolist() for m, v in self.u_bar.items()}}

    def load_state(self, state: dict) -> None:
        self.active = {m: np.array(v, bool) for m, v in state["active"].items()}
        self.i_bar = {m: np.array(v) for m, v in state["i_bar"].items()}
        self.u_bar = {m: np.array(v) for m, v in state["u_bar"].items()}


class NestedRanks:
    """DyLoRA: each step trains the first ``b`` channels of every module, ``b`` drawn uniformly from
    1..r (seeded by step, so a resumed run draws the same); the channels past ``b`` are zeroed for the
    step and restored after it. Any prefix ``k`` is then a working rank-``k`` adapter."""

    def __init__(self, backend: TrainingBackend, spec: AdapterSpec, seed: int):
        self.backend, self.spec, self.seed = backend, spec, seed
        self.names = [b_name(m.name) for m in spec.modules]
        if spec.variant == "lora":
            self.names += [a_name(m.name) for m in spec.modules]
        self._saved: dict[str, np.ndarray] = {}
        self.prefix = spec.rank

    def draw(self, step: int) -> int:
        return int(np.random.default_rng([self.seed, 7919, step]).integers(1, self.spec.rank + 1))

    def before_step(self, step: int) -> None:
        self.prefix = b = self.draw(step)
        if b == self.spec.rank:
            return
        values = self.backend.trainable()
        self._saved = {n: values[n] for n in self.names}
        cut = {}
        for n, v in self._saved.items():
            v = v.copy()
            if n.endswith(".lora_B.weight"):
                v[:, b:] = 0
            else:
                v[b:, :] = 0
            cut[n] = v
        self.backend.set_trainable(cut)

    def after_backward(self, step: int) -> None:
        pass

    def metrics(self, step: int) -> dict:
        return {"rank_prefix": self.prefix}

    def after_update(self, step: int) -> None:
        if not self._saved:
            return
        b, values = self.prefix, self.backend.trainable()
        restored = {}
        for n, old in self._saved.items():
            v = values[n].copy()
            if n.endswith(".lora_B.weight"):
                v[:, b:] = old[:, b:]
            else:
                v[b:, :] = old[b:, :]
            restored[n] = v
        self.backend.set_trainable(restored)
        self._saved = {}

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

