"""edge-peft against PyTorch: the same model, adapters, data and optimizer give the same losses and logits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import data_for
from test_training import losses, train

from edge_peft.exporter.inject import inject_adapters
from edge_peft.device.adapter_io import save_run_adapter
from edge_peft.device.inference import Predictor
from edge_peft.backends.runtime import training_api
from edge_peft.device.trainer import TrainConfig, open_run
from edge_peft.exporter.load import load_model_dir
from edge_peft.artifact.manifest import IGNORE_INDEX, load_manifest


def reference_model(model_dir, artifact):
    """The torch model with the same LoRA-FA adapters and the artifact's initial trainable values."""
    manifest = load_manifest(artifact)
    model = load_model_dir(model_dir, manifest.labels or None).model
    spec = manifest.adapter
    inject_adapters(model, [m.name for m in spec.modules], spec.kind, spec.rank, spec.alpha, spec.seed)
    state = training_api().CheckpointState.load_checkpoint(os.fspath(artifact / "checkpoint"))
    params = dict(model.named_parameters())
    trainable = []
    for name, p in state.parameters:
        if p.requires_grad:
            with torch.no_grad():
                params[name].copy_(torch.from_numpy(np.array(p.data)))
            params[name].requires_grad_(True)
            trainable.append(params[name])
    return model, trainable, manifest


def hf_adamw_step(params, state, lr, step, betas=(0.9, 0.999), eps=1e-8):
    """ORT's AdamWOptimizer in adam_mode=1 (Hugging Face AdamW): bias correction folded into the step size."""
    b1, b2 = betas
    for p in params:
        m, v = state.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        step_size = lr * (1 - b2**step) ** 0.5 / (1 - b1**step)
        with torch.no_grad():
            p.add_(-step_size * m / (v.sqrt() + eps))
        p.grad = None


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_first_losses_match_pytorch(kind, models, artifacts, data, tmp_path):
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
    from peft import PeftModel

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
