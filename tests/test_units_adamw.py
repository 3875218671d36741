"""The portable backend's AdamW (``backends/adamw.py``) against the update written out by hand in float64."""

from __future__ import annotations

import numpy as np

from edge_peft.artifact.manifest import ADAMW_BETAS
from edge_peft.backends.adamw import adamw_step, clip_coefficient


def _reference(p, m, v, g, lr, t, wd, max_norm, total_norm):
    """ORT's AdamW in Hugging Face mode after global-norm clipping, in float64."""
    b1, b2 = ADAMW_BETAS
    g = g * min(max_norm / (total_norm + 1e-6), 1.0) if max_norm > 0 else g
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    moved = p - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + 1e-8)
    return moved - lr * wd * moved, m, v


def test_clipping_scales_by_the_global_norm_and_only_above_it():
    grads = {"a": np.full((2, 2), 3.0, np.float32), "b": np.full((1,), 4.0, np.float32)}  # norm sqrt(36 + 16)
    assert clip_coefficient(grads, 1.0) == np.float32(1 / (np.sqrt(52) + 1e-6))
    assert clip_coefficient(grads, 100.0) == 1 and clip_coefficient(grads, 0.0) == 1


def test_three_updates_equal_the_float64_reference():
    rng = np.random.default_rng(0)
    shapes = {"x": (4, 3), "y": (5,)}
    values = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    m = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    v = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    ref = {n: (values[n].astype(np.float64), m[n].astype(np.float64), v[n].astype(np.float64)) for n in shapes}
    for t in (1, 2, 3):
        grads = {n: rng.normal(scale=2.0, size=s).astype(np.float32) for n, s in shapes.items()}
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
        adamw_step(values, m, v, grads, lr=1e-2, step=t, weight_decay=0.1, max_norm=1.0)
        ref = {n: _reference(*ref[n], grads[n].astype(np.float64), 1e-2, t, 0.1, 1.0, norm) for n in shapes}
    for n in shapes:
        assert values[n].dtype == m[n].dtype == v[n].dtype == np.float32
        np.testing.assert_allclose(values[n], ref[n][0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m[n], ref[n][1], rtol=1e-5, atol=1e-7)
