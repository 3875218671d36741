"""Client-side differential privacy: DP-SGD in the device loop, and its privacy accountant.

One DP step runs each example of the batch as a micro-batch of one (``forward_backward`` on a single row), reads
its adapter gradient, scales it to an L2 norm of at most ``clip`` (Opacus' factor ``clip / (norm + 1e-6)``, capped
at 1), sums, adds Gaussian noise of standard deviation ``noise_multiplier * clip`` to every coordinate, divides by
the batch size and hands that to the backend's optimizer (``set_gradients``). The noise comes from the OS's
entropy, never from the run's seed.

The accountant is RDP for the Poisson-subsampled Gaussian mechanism, from Google's ``dp-accounting`` (the one
Flower's DP mods use; no torch, so it runs on the device), over Opacus' default RDP orders, imported only when a
run asks for DP.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backends import TrainingBackend
from ..errors import UserError
from .data import Batch
from .hooks import StepHooks
from .loop import targets

ORDERS = [1 + x / 10.0 for x in range(10, 100)] + list(range(12, 64))  # Opacus' default orders from 2 (below, dp-accounting's series need not converge)
CLIP_EPS = 1e-6  # as Opacus: factor = clip / (norm + 1e-6), at most 1


@dataclass(frozen=True)
class DPSettings:
    """One run's DP-SGD: per-example bound, noise, the accountant's inputs."""

    clip: float
    noise_multiplier: float
    sample_rate: float  # batch size / training examples
    delta: float

    def record(self, steps: int) -> dict:
        """What ``summary.json`` (and so the pushed metadata) records after ``steps`` steps."""
        spent = epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta)
        return {"epsilon": round(spent, 4) if math.isfinite(spent) else None,  # None: no noise, no guarantee
                "delta": self.delta, "noise_multiplier": round(self.noise_multiplier, 6), "clip": self.clip,
                "sample_rate": round(self.sample_rate, 6), "steps": steps,
                "accountant": "RDP, Poisson-subsampled Gaussian (dp-accounting)"}


def settings(clip: float | None, noise_multiplier: float | None, target_epsilon: float | None, delta: float,
             batch_size: int, examples: int, steps: int) -> DPSettings | None:
    """The run's DP settings from its options (None: no DP); the noise is calibrated when a target epsilon is given."""
    if noise_multiplier is None and target_epsilon is None:
        if clip is not None:
            raise UserError("--max-grad-norm clips each example for DP-SGD: add --noise-multiplier or --dp-epsilon "
                            "(--noise-multiplier 0 clips without noise)")
        return None
    checks = [
        (noise_multiplier is None or target_epsilon is None, "give --noise-multiplier or --dp-epsilon, not both"),
        (clip is not None and math.isfinite(clip) and clip > 0,
         "DP-SGD needs --max-grad-norm, a positive bound on each example's gradient norm (e.g. 1.0)"),
        (noise_multiplier is None or noise_multiplier >= 0, f"--noise-multiplier {noise_multiplier} must be >= 0"),
        (target_epsilon is None or target_epsilon > 0, f"--dp-epsilon {target_epsilon} must be positive"),
        (0 < delta < 1 / max(examples, 1),
         f"--dp-delta {delta} must be in (0, 1/N) for the N = {examples} training examples: lower it"),
        (batch_size <= examples, f"--batch-size {batch_size} exceeds the {examples} training examples"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    rate = batch_size / examples
    sigma = noise_multiplier if noise_multiplier is not None else noise_for_epsilon(target_epsilon, rate, steps, delta)
    return DPSettings(float(clip), float(sigma), rate, delta)


def _accounting():
    try:
        from dp_accounting import dp_event, rdp
    except ImportError:
        raise UserError("differential privacy needs its accountant: pip install 'edge-peft[dp]'") from None
    return dp_event, rdp


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """(epsilon, delta)-DP of ``steps`` DP-SGD steps by the RDP accountant (inf without noise)."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    dp_event, rdp = _accounting()
    accountant = rdp.RdpAccountant(ORDERS)
    accountant.compose(dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), steps)
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``steps`` steps stay within ``target`` epsilon."""
    low, high = 0.0, 1.0
    while epsilon(high, sample_rate, steps, delta) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise UserError(f"--dp-epsilon {target} cannot be reached in {steps} steps: raise it or train fewer steps")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if epsilon(mid, sample_rate, steps, delta) > target else (low, mid)
    return high


def dp_step(clip: float, noise_multiplier: float,
            rng: np.random.Generator | None = None) -> Callable[[TrainingBackend, StepHooks, list[Batch], float, int],
                                                                tuple[float, int, int]]:
    """A step function for ``loop.train`` that runs DP-SGD (``clip`` = inf and noise 0: the plain step's update)."""
    rng = rng or np.random.default_rng(secrets.randbits(128))

    def step(backend: TrainingBackend, hooks: StepHooks, parts: list[Batch], lr: float,
             number: int) -> tuple[float, int, int]:
        rows = [p.rows(i, i + 1) for p in parts for i in range(p.input_ids.shape[0])]
        rows = [r for r in rows if targets(r)]
        if not rows:
            return 0.0, 0, 0
        backend.start_step(lr)
        hooks.before_step(number)
        total = {n: np.zeros_like(v, dtype=np.float64) for n, v in backend.trainable().items()}
        loss, tokens = 0.0, 0
        for row in rows:
            backend.clear_gradients()
            loss += backend.forward_backward(row, 1.0)
            grads = backend.gradients(list(total))
            norm = math.sqrt(sum(float(np.einsum("i,i", g.ravel(), g.ravel())) for g in grads.values()))
            factor = min(1.0, clip / (norm + CLIP_EPS))
            for n, g in grads.items():
                total[n] += factor * g
            tokens += row.tokens
        size = sum(p.input_ids.shape[0] for p in parts)
        std = noise_multiplier * clip if noise_multiplier else 0.0
        backend.set_gradients({n: ((t + rng.normal(0.0, std, t.shape)) / size if std else t / size).astype(np.float32)
                               for n, t in total.items()})
        hooks.after_backward(number)
        backend.optimizer_step()
        hooks.after_update(number)
        return loss / len(rows), tokens, len(rows)

    return step
