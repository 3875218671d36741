"""Client-side DP-SGD: the DP step against the plain one, per-example clipping, the accountant against Opacus."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_peft.device.loop import train_step
from edge_peft.device.privacy import dp_step, epsilon, noise_for_epsilon
from edge_peft.device.trainer import TrainConfig, open_run
from edge_peft.errors import UserError


def open_toy(artifacts, data, out, backend="ort", **kw):
    config = TrainConfig(data=str(data["cls"]), steps=4, batch_size=4, lr=1e-2, eval_every=0, checkpoint_every=4,
                         threads=1, backend=backend, **kw)
    return open_run(artifacts("bert", "none", backend="both"), config, out)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ort", "portable"])
def test_dp_step_without_noise_or_clipping_is_the_plain_step(artifacts, data, tmp_path, backend):
    plain, private = (open_toy(artifacts, data, tmp_path / name, backend) for name in ("plain", "dp"))
    step = dp_step(math.inf, 0.0)
    for number in range(3):
        parts = plain.micro_batches(number)
        loss = train_step(plain.backend, plain.hooks, parts, 1e-2, number)[0]
        assert step(private.backend, private.hooks, parts, 1e-2, number)[0] == pytest.approx(loss, rel=1e-5)
    before = open_toy(artifacts, data, tmp_path / "fresh", backend).backend.trainable()
    for name, value in plain.backend.trainable().items():
        assert np.abs(value - before[name]).max() > 1e-4  # the steps moved every tensor
        np.testing.assert_allclose(private.backend.trainable()[name], value, rtol=0, atol=2e-6)


class OneHugeExample:
    """A real backend whose gradient for one example (the ``huge``-th micro-batch of a step) is 1e6 times larger,
    as an outlier example would be; records the gradient the optimizer is handed."""

    def __init__(self, backend, huge: int):
        self.backend, self.huge, self.calls, self.handed = backend, huge, 0, None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward_backward(self, batch, scale=1.0):
        self.calls += 1
        return self.backend.forward_backward(batch, scale)

    def gradients(self, names):
        grads = self.backend.gradients(names)
        return {n: g * 1e6 for n, g in grads.items()} if self.calls == self.huge + 1 else grads

    def set_gradients(self, tensors):
        self.handed = {n: v.copy() for n, v in tensors.items()}
        self.backend.set_gradients(tensors)


@pytest.mark.slow
def test_per_example_clipping_bounds_the_contribution_of_one_huge_example(artifacts, data, tmp_path):
    clip, size = 0.5, 4
    handed = {}
    for name, bound in (("clipped", clip), ("unclipped", math.inf)):
        run = open_toy(artifacts, data, tmp_path / name)
        parts = run.micro_batches(0)
        wrapped = OneHugeExample(run.backend, huge=2)
        dp_step(bound, 0.0)(wrapped, run.hooks, parts, 1e-2, 0)
        handed[name] = wrapped.handed
    # the others' clipped gradients, from the same starting point
    run = open_toy(artifacts, data, tmp_path / "others")
    rows = [p.rows(i, i + 1) for p in run.micro_batches(0) for i in range(p.input_ids.shape[0])]
    others = None
    for i, row in enumerate(rows):
        if i == 2:
            continue
        run.backend.start_step(1e-2)
        run.backend.clear_gradients()
        run.backend.forward_backward(row, 1.0)
        g = run.backend.gradients(run.backend.names)
        norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values()))
        scaled = {n: v * min(1.0, clip / (norm + 1e-6)) for n, v in g.items()}
        others = scaled if others is None else {n: others[n] + scaled[n] for n in g}
    huge_part = math.sqrt(sum(float(((handed["clipped"][n] * size - others[n]).astype(np.float64) ** 2).sum())
                              for n in others))
    assert huge_part <= clip * (1 + 1e-4)  # the outlier moved the sum by at most the bound
    assert huge_part > 0.9 * clip  # ... and was clipped to it, not dropped
    unclipped = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in handed["unclipped"].values()))
    assert unclipped > 1e3 * clip  # without clipping the outlier dominates


@pytest.mark.slow  # imports Opacus, hence torch
@pytest.mark.parametrize("sigma, rate, steps, delta", [
    (1.0, 0.01, 1000, 1e-5), (0.81, 0.08, 60, 1e-5), (2.83, 0.08, 60, 1e-5), (1.1, 0.1, 50, 1e-5),
    (4.0, 0.004, 10_000, 1e-6),
])
def test_epsilon_matches_opacus_for_the_same_schedule(sigma, rate, steps, delta):
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = [(sigma, rate, steps)]
    ours, theirs = epsilon(sigma, rate, steps, delta), reference.get_epsilon(delta)
    assert theirs <= ours <= theirs * 1.002  # Opacus' orders from 2: equal, or a hair more conservative


@pytest.mark.slow
def test_noise_calibration_reaches_the_target_epsilon():
    sigma = noise_for_epsilon(8.0, 0.08, 60, 1e-5)
    assert epsilon(sigma, 0.08, 60, 1e-5) <= 8.0 < epsilon(sigma * 0.99, 0.08, 60, 1e-5)


@pytest.mark.slow
def test_a_dp_run_records_its_epsilon_in_summary_without_torch_and_refuses_bad_options(artifacts, data, tmp_path):
    from helpers import cli

    proc = cli("train", artifacts("bert", "none", backend="both"), "--data", data["cls"], "--out", tmp_path / "run",
               "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--eval-every", "0", "--threads", "1", "--quiet",
               "--max-grad-norm", "1.0", "--dp-epsilon", "8", "--dp-delta", "1e-3")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]  # the NO_TORCH runner fails if torch was imported
    dp = json.loads((tmp_path / "run" / "summary.json").read_text())["dp"]
    assert dp["steps"] == 4 and dp["clip"] == 1.0 and dp["delta"] == 1e-3
    assert 7.9 < dp["epsilon"] <= 8.0 and dp["noise_multiplier"] > 0
    for kw, message in [({"noise_multiplier": 1.0}, "needs --max-grad-norm"),
                        ({"dp_clip": 1.0}, "add --noise-multiplier or --dp-epsilon"),
                        ({"dp_clip": 1.0, "noise_multiplier": 1.0, "dp_epsilon": 2.0}, "not both"),
                        ({"dp_clip": 1.0, "noise_multiplier": 1.0, "dp_delta": 0.5}, "must be in \\(0, 1/N\\)")]:
        with pytest.raises(UserError, match=message):
            open_toy(artifacts, data, tmp_path / "bad", **kw)
