"""DoRA (weight-decomposed LoRA) as a registered variant: it exports, trains on both backends, loads in PEFT
with the same logits, and the store refuses to average it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_peft.adapters.peft_format import load_adapter
from edge_peft.artifact.manifest import load_manifest
from edge_peft.artifact.names import a_name, magnitude_name, peft_key
from edge_peft.device.adapter_io import save_run_adapter
from edge_peft.device.inference import Predictor
from edge_peft.device.trainer import TrainConfig, open_run
from edge_peft.errors import UserError
from edge_peft.store.aggregate import require_exact
from edge_peft.store.testing import make_manifest
from edge_peft.variants import lora_a_from_seed


def _train(artifact, data_path, out, backend: str, steps: int = 24) -> list[float]:
    config = TrainConfig(data=str(data_path), steps=steps, batch_size=8, lr=1e-2, eval_every=0, checkpoint_every=steps,
                         threads=2, backend=backend)
    open_run(artifact, config, out).run()
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dora_trains_the_same_on_both_backends(models, artifacts, data, tmp_path):
    from edge_peft.exporter.load import load_model_dir

    artifact = artifacts("llama", "int8", "dora-fa", backend="both")
    spec = load_manifest(artifact).adapter
    runs = {b: tmp_path / b for b in ("ort", "portable")}
    history = {b: _train(artifact, data["lm"], run, b) for b, run in runs.items()}
    np.testing.assert_allclose(history["ort"][:5], history["portable"][:5], rtol=1e-4)  # one arithmetic, two backends
    for b, losses in history.items():
        assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), (b, losses)
    base_norms = _row_norms(load_model_dir(models["llama"], None).model, spec)
    for run in runs.values():
        tensors = load_adapter(run / "adapter", spec)
        for m in spec.modules:  # A stays the seeded one, bit for bit
            assert np.array_equal(tensors[peft_key(a_name(m.name))], lora_a_from_seed(m.a_seed, m.rank, m.in_features))
        magnitudes = {m.name: tensors[peft_key(magnitude_name(m.name))] for m in spec.modules}
        assert all(v.shape == (m.out_features,) for m, v in zip(spec.modules, magnitudes.values()))
        assert any(not np.allclose(magnitudes[n], base_norms[n], atol=1e-4) for n in base_norms)  # m is trained


@pytest.mark.slow
@pytest.mark.parametrize("kind,variant", [("llama", "dora"), ("gpt2", "dora-fa")])
def test_peft_loads_a_dora_adapter_with_the_same_logits(kind, variant, models, artifacts, data, tmp_path):
    import torch
    from peft import PeftModel

    from edge_peft.exporter.load import load_model_dir

    artifact = artifacts(kind, "none", variant)
    _train(artifact, data["lm"], tmp_path / "run", "ort", steps=12)
    adapter = save_run_adapter(tmp_path / "run", tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(load_model_dir(models[kind], None).model, str(adapter)).eval()
    ids = np.array([[5, 9, 12, 7, 3, 11], [8, 6, 10, 14, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours = Predictor(tmp_path / "run").logits(ids, mask)
    assert not np.allclose(ours, Predictor(artifact).logits(ids, mask), atol=1e-3)  # the adapter changes the output
    np.testing.assert_allclose(ours[mask == 1], expected[mask == 1], rtol=1e-4, atol=1e-4)


def _row_norms(model, spec) -> dict[str, np.ndarray]:
    """Row norms of each adapted module's base weight as [out, in]."""
    import torch

    out = {}
    for m in spec.modules:
        layer = model.get_submodule(m.name)
        w = layer.weight.detach()
        w = w.t() if type(layer).__name__ == "Conv1D" else w
        out[m.name] = torch.linalg.norm(w, dim=1).numpy()
    return out


@pytest.mark.parametrize("variant", ["dora", "dora-fa"])
def test_the_store_refuses_to_average_dora(variant):
    spec = make_manifest(variant=variant).adapter
    with pytest.raises(UserError, match="cannot be averaged exactly: the magnitude divides each update"):
        require_exact(spec)
