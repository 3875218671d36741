"""The device loop as users run it: a separate process, without torch, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from helpers import cli, losses

from edge_peft.device.run_dir import find_checkpoint

pytestmark = pytest.mark.slow  # training processes on exported artifacts


def test_train_generate_and_save_without_torch(artifacts, data, tmp_path):
    artifact = artifacts("gpt2", "int8")
    run = tmp_path / "run"
    for args in (["train", artifact, "--data", data["lm"], "--out", run, "--steps", "6", "--batch-size", "4", "--quiet"],
                 ["generate", run, "--prompt", "the cat", "--max-new-tokens", "5"],
                 ["adapter", "save", run, "--out", tmp_path / "adapter"]):
        proc = cli(*args)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert out.strip()


STEPS = 64


def _train_args(artifact, data, run, backend, steps=STEPS):
    return ["train", artifact, "--data", data, "--out", run, "--steps", str(steps), "--batch-size", "4",
            "--checkpoint-every", "4", "--eval-every", "0", "--threads", "1", "--lr", "5e-3", "--quiet",
            "--backend", backend]


@pytest.mark.parametrize("backend", ["ort", "portable"])
def test_sigkill_then_resume_gives_the_same_losses(artifacts, data, tmp_path, backend):
    artifact, data_path = artifacts("gpt2", "int8", backend=backend), data["lm"]
    straight = tmp_path / "straight"
    proc = cli(*_train_args(artifact, data_path, straight, backend))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    killed = tmp_path / "killed"
    proc = cli(*_train_args(artifact, data_path, killed, backend))
    deadline = time.time() + 300
    while time.time() < deadline:  # kill mid-run, once a checkpoint exists (every 4 steps)
        metrics = killed / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    newest = find_checkpoint(killed)  # a kill mid-swap leaves it beside checkpoint/; --resume recovers it
    assert newest is not None, "no complete checkpoint after the kill"
    trainer_state = json.loads((newest / "trainer.json").read_text())
    assert 4 <= trainer_state["step"] < STEPS

    proc = cli(*_train_args(artifact, data_path, killed, backend) + ["--resume"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    resumed, reference = losses(killed), losses(straight)
    assert [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines()] == list(range(STEPS))
    np.testing.assert_allclose(resumed, reference, rtol=1e-6)
