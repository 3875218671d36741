"""The device loop learns, and touches nothing but the trainable tensors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import data_for, train

from edge_peft.backends.runtime import training_api

pytestmark = pytest.mark.slow  # every test exports an artifact and trains it


@pytest.mark.parametrize("kind,quantize", [("minilm", "none"), ("minilm", "int8"), ("gpt2", "none"),
                                           ("gpt2", "int8"), ("llama", "int8")])
def test_loss_falls_on_toy_task(kind, quantize, artifacts, data, tmp_path):
    history = train(artifacts(kind, quantize), data_for(kind, data), tmp_path / "run", steps=40)
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last < 0.6 * first, f"{kind}/{quantize}: loss {first:.3f} -> {last:.3f}"


def _state(path) -> dict[str, tuple[bool, np.ndarray]]:
    state = training_api().CheckpointState.load_checkpoint(os.fspath(path))
    return {name: (p.requires_grad, np.array(p.data)) for name, p in state.parameters}


@pytest.mark.parametrize("quantize,variant", [("int8", "lora-fa"), ("none", "lora")])
def test_only_trainable_tensors_change(quantize, variant, artifacts, data, tmp_path):
    artifact = artifacts("bert", quantize, variant)
    train(artifact, data["cls"], tmp_path / "run", steps=10)
    before, after = _state(artifact / "checkpoint"), _state(tmp_path / "run" / "checkpoint" / "state")
    assert before.keys() == after.keys()
    frozen = [n for n, (grad, _) in before.items() if not grad]
    trainable = [n for n, (grad, _) in before.items() if grad]
    assert any(n.endswith(".int8") for n in frozen) == (quantize == "int8")
    assert any(n.endswith("lora_A.weight") for n in (trainable if variant == "lora" else frozen))
    for name in frozen:  # base weights, int8 weights, scales, and A for LoRA-FA: bit-identical
        assert before[name][1].tobytes() == after[name][1].tobytes(), name
    changed = [n for n in trainable if not np.array_equal(before[n][1], after[n][1])]
    assert sorted(changed) == sorted(trainable)


def test_int8_weights_are_stored_as_int8(artifacts):
    state = _state(artifacts("gpt2", "int8") / "checkpoint")
    int8 = {n: a for n, (_, a) in state.items() if n.endswith(".int8")}
    assert int8 and all(a.dtype == np.int8 for a in int8.values())
    assert all(n[: -len(".int8")].removesuffix(".T") + ".scale" in state for n in int8)
    assert not any(a.dtype == np.float32 and a.ndim == 2 and a.size >= 1024 and not n.endswith("lora_A.weight") for n, (g, a) in state.items() if not g)


def test_gradient_accumulation_equals_full_batch(artifacts, data, tmp_path):
    """Micro-batches scaled by their share of targets give the same update as one batch."""
    artifact = artifacts("gpt2", "none")
    full = train(artifact, data["lm"], tmp_path / "full", steps=6, threads=1)
    split = train(artifact, data["lm"], tmp_path / "split", steps=6, threads=1, micro_batch_size=3)
    np.testing.assert_allclose(split, full, rtol=2e-4)
