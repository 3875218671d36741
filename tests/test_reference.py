"""edge-peft against PyTorch: the same model, adapters, data and optimizer give the same losses and logits."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import data_for, hf_adamw_step, reference_model, train

from edge_peft.device.adapter_io import save_run_adapter
from edge_peft.device.inference import Predictor
from edge_peft.device.trainer import TrainConfig, open_run
from edge_peft.artifact.manifest import IGNORE_INDEX, load_manifest


pytestmark = pytest.mark.slow  # exports and trains artifacts, builds torch models


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_first_losses_match_pytorch(kind, models, artifacts, data, tmp_path):
    import torch

    artifact = artifacts(kind, "none")
    steps = 5
    ort_losses = train(artifact, data_for(kind, data), tmp_path / "run", steps=steps, threads=1)

    config = TrainConfig(data=str(data_for(kind, data)), steps=steps, batch_size=8, lr=1e-2, eval_every=0,
                         checkpoint_every=steps, threads=1)
    batches = open_run(artifact, config, tmp_path / "batches")
    model, params, manifest = reference_model(models[kind], artifact)
    adam: dict = {}
    ref_losses = []
    for step in range(steps):
        batch, = batches.micro_batches(step)
        out = model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask))
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch.labels.reshape(-1)),
                                                 ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        hf_adamw_step(params, adam, batches.lr(step), step + 1)
        ref_losses.append(loss.item())
    np.testing.assert_allclose(ort_losses, ref_losses, rtol=1e-4)
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # the comparison covered real updates of every B


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_peft_loads_our_adapter_with_identical_logits(kind, models, artifacts, data, tmp_path):
    import torch
    from peft import PeftModel

    from edge_peft.exporter.load import load_model_dir

    artifact = artifacts(kind, "none")
    train(artifact, data_for(kind, data), tmp_path / "run", steps=8)
    adapter = save_run_adapter(tmp_path / "run", tmp_path / "adapter")
    manifest = load_manifest(artifact)
    base = load_model_dir(models[kind], manifest.labels or None).model
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()

    ids = np.array([[5, 9, 12, 7, 3, 11], [8, 6, 10, 14, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours = Predictor(tmp_path / "run").logits(ids, mask)
    zero = Predictor(artifact).logits(ids, mask)
    assert not np.allclose(ours, zero, atol=1e-3)  # the trained adapter really changes the output
    if kind == "gpt2":  # padded positions are masked out of the comparison
        expected, ours = expected[mask == 1], ours[mask == 1]
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
