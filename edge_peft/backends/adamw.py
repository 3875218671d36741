"""AdamW as ORT's training API runs it, in numpy: the portable backend's update of the adapter tensors.

Same arithmetic as ORT's ``AdamWOptimizer`` in Hugging Face mode (``adam_mode=1``: bias correction folded into
the learning rate, decoupled weight decay applied after the update), preceded by ``ClipGradNorm`` (global L2
norm over all gradients, coefficient ``max_norm / (norm + 1e-6)`` capped at 1), all in float32. The step graph
computes only the gradients; the update runs here, where its intermediates are short-lived numpy arrays of
adapter size instead of session nodes and buffers.
"""

from __future__ import annotations

import numpy as np

from ..artifact.manifest import ADAMW_BETAS

EPS = np.float32(1e-8)
CLIP_EPS = np.float32(1e-6)
ONE = np.float32(1.0)


def clip_coefficient(grads: dict[str, np.ndarray], max_norm: float) -> np.float32:
    """``min(max_norm / (global L2 norm + 1e-6), 1)``; 1 when ``max_norm`` is 0 (no clipping)."""
    if max_norm <= 0:
        return ONE
    norm = np.sqrt(np.float32(sum(np.float32(np.square(g, dtype=np.float32).sum(dtype=np.float32))
                                  for g in grads.values())))
    return min(np.float32(max_norm) / (norm + CLIP_EPS), ONE)


def adamw_step(values: dict[str, np.ndarray], m: dict[str, np.ndarray], v: dict[str, np.ndarray],
               grads: dict[str, np.ndarray], lr: float, step: int, weight_decay: float, max_norm: float) -> None:
    """Update ``values`` and the moments ``m``, ``v`` in place with the accumulated ``grads``; ``step`` is the
    1-based number of the update being made."""
    b1, b2 = np.float32(ADAMW_BETAS[0]), np.float32(ADAMW_BETAS[1])
    t, lr32 = np.float32(step), np.float32(lr)
    lr_corrected = lr32 * np.sqrt(ONE - b2 ** t) / (ONE - b1 ** t)
    lr_decay = lr32 * np.float32(weight_decay)
    coef = clip_coefficient(grads, max_norm)
    for name, g in grads.items():
        g = g * coef if coef != ONE else g
        m[name] = b1 * m[name] + (ONE - b1) * g
        v[name] = b2 * v[name] + (ONE - b2) * (g * g)
        moved = values[name] - lr_corrected * m[name] / (np.sqrt(v[name]) + EPS)
        values[name] = moved - lr_decay * moved
