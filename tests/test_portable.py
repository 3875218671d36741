"""The portable backend (plain onnxruntime graphs) trains like the ORT training-API backend."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import losses, reference_losses, train

from edge_peft.device.adapter_io import save_run_adapter
from edge_peft.backends import open_backend
from edge_peft.device.inference import Predictor
from edge_peft.backends.portable import PortableBackend
from edge_peft.device.trainer import TrainConfig, open_run
from edge_peft.errors import UserError
from edge_peft.artifact.manifest import load_manifest
from edge_peft.artifact.files import PORTABLE_STEP_MODEL as STEP_MODEL
from edge_peft.artifact.names import accumulated, moment_names, updated

ROOT = Path(__file__).resolve().parent.parent
PORTABLE_PYTHON = Path(os.environ.get("EDGE_PEFT_PORTABLE_VENV", ROOT / ".venv-portable")) / "bin" / "python"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("kind,quantize", [("bert", "none"), ("gpt2", "int8")])
def test_both_backends_give_the_same_losses(kind, quantize, artifacts, data, tmp_path):
    artifact = artifacts(kind, quantize, backend="both")
    data_path = data["cls"] if kind == "bert" else data["lm"]
    ort = train(artifact, data_path, tmp_path / "ort", steps=10, threads=1, backend="ort")
    portable = train(artifact, data_path, tmp_path / "portable", steps=10, threads=1, backend="portable")
    assert ort[0] == pytest.approx(portable[0], rel=1e-5)  # same graph before any update
    np.testing.assert_allclose(portable, ort, rtol=1e-4)


@pytest.mark.slow
def test_portable_loss_falls_and_touches_only_adapters(artifacts, data, tmp_path):
    import onnx
    from onnx import numpy_helper

    artifact = artifacts("gpt2", "int8", backend="portable")
    assert load_manifest(artifact).backends == ["portable"]
    before = {p.name: _sha(p) for p in artifact.iterdir() if p.is_file()}
    history = train(artifact, data["lm"], tmp_path / "run", steps=40)
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"
    assert {p.name: _sha(p) for p in artifact.iterdir() if p.is_file()} == before  # the artifact is read-only

    proto = onnx.load(str(artifact / STEP_MODEL))  # one graph: batch, adapters and gradients so far in; loss and
    trainable = list(PortableBackend.initial_trainable(artifact, load_manifest(artifact)))  # gradients out
    inputs, outputs = {i.name for i in proto.graph.input}, {o.name for o in proto.graph.output}
    assert {"input_ids", "attention_mask", "labels", *trainable, *map(accumulated, trainable)} <= inputs
    assert outputs == {"loss", *(updated(accumulated(n)) for n in trainable)}
    assert not inputs & {x for n in trainable for x in moment_names(n)}  # AdamW is the loop's (backends/adamw.py)
    # no tracer debug records (stack traces with the workstation's paths) or intermediate shapes for ORT to hold
    assert not any(node.metadata_props or node.doc_string for node in proto.graph.node) and not proto.graph.value_info
    assert {node.domain for node in proto.graph.node} <= {"", "pkg.onnxscript.torch_lib", "pkg.onnxscript.torch_lib.common"}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert any(a.dtype == np.int8 for a in inits.values())
    big_fp32 = [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim == 2 and a.size >= 1024
                and not n.endswith("lora_A.weight")]
    assert not big_fp32, f"frozen weights kept in fp32: {big_fp32[:3]}"  # int8 stays int8, no folded copies
    backend = open_backend(artifact, load_manifest(artifact), tmp_path / "run" / "checkpoint" / "state", threads=1)
    name = next(n for n in inits if n.endswith("lora_A.weight"))
    assert backend.frozen(name).tobytes() == inits[name].tobytes()
    trained = backend.trainable()
    assert all(np.any(v != 0) for n, v in trained.items() if n.endswith("lora_B.weight"))


@pytest.mark.slow
def test_gradient_accumulation_equals_full_batch(artifacts, data, tmp_path):
    artifact = artifacts("gpt2", "int8", backend="portable")
    full = train(artifact, data["lm"], tmp_path / "full", steps=6, threads=1)
    split = train(artifact, data["lm"], tmp_path / "split", steps=6, threads=1, micro_batch_size=3)
    np.testing.assert_allclose(split, full, rtol=2e-4)


@pytest.mark.slow
def test_first_losses_match_pytorch(models, artifacts, data, tmp_path):
    """Same LoRA-FA model, batches, clipping and HF AdamW in torch: the portable losses agree to 1e-4."""
    artifact, steps = artifacts("gpt2", "none", backend="both"), 5
    ours = train(artifact, data["lm"], tmp_path / "run", steps=steps, threads=1, backend="portable")
    expected = reference_losses(models["gpt2"], artifact, data["lm"], steps, tmp_path / "batches")
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


@pytest.mark.slow
def test_peft_logits_agree_between_backends(models, artifacts, data, tmp_path):
    import torch
    from peft import PeftModel

    from edge_peft.exporter.load import load_model_dir

    artifact = artifacts("bert", "none", backend="both")
    ids = np.array([[5, 9, 12, 7, 3, 11], [8, 6, 10, 14, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    logits = {}
    for backend in ("ort", "portable"):
        run = tmp_path / backend
        train(artifact, data["cls"], run, steps=8, backend=backend)
        adapter = save_run_adapter(run, tmp_path / f"{backend}-adapter")
        base = load_model_dir(models["bert"]).model
        peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
        with torch.no_grad():
            logits[backend] = peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        np.testing.assert_allclose(Predictor(run).logits(ids, mask), logits[backend], rtol=1e-4, atol=1e-4)
    assert not np.allclose(logits["ort"], Predictor(artifact).logits(ids, mask), atol=1e-3)
    np.testing.assert_allclose(logits["portable"], logits["ort"], atol=1e-3)


@pytest.mark.slow
def test_resume_continues_exactly(artifacts, data, tmp_path):
    """A run stopped after its step-4 checkpoint and resumed gives the uninterrupted run's losses."""
    artifact = artifacts("gpt2", "int8", backend="portable")
    straight = train(artifact, data["lm"], tmp_path / "straight", steps=8, threads=1, checkpoint_every=4)
    config = TrainConfig(data=str(data["lm"]), steps=8, batch_size=8, lr=1e-2, eval_every=0, checkpoint_every=4,
                         threads=1)
    stopped = tmp_path / "stopped"
    trainer = open_run(artifact, config, stopped)
    for step in range(4):
        trainer.train_step(step)
    trainer.checkpoint(4, 0.0, None)
    metrics = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[:4]
    (stopped / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    open_run(artifact, config, stopped, resume=True).run()
    np.testing.assert_allclose(losses(stopped), straight, rtol=1e-6)
    with pytest.raises(UserError, match="--backend portable"):
        open_backend(artifact, load_manifest(artifact), stopped / "checkpoint" / "state", choice="ort")


@pytest.mark.slow
def test_auto_refuses_an_artifact_without_usable_graphs(artifacts, tmp_path):
    artifact = artifacts("gpt2", "int8", backend="portable")
    with pytest.raises(UserError, match="re-export with `edge-peft export --backend ort`"):
        open_backend(artifact, load_manifest(artifact), choice="ort")


PORTABLE_CHECK = """
import importlib, sys
for name in ("torch", "onnxruntime.training"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    sys.exit(f"{name} is importable in the portable venv")
import onnxruntime
print(onnxruntime.__version__)
"""


@pytest.mark.slow
@pytest.mark.skipif(not PORTABLE_PYTHON.is_file(),
                    reason=f"{PORTABLE_PYTHON} missing: build it with scripts/portable_venv.sh (CI does)")
def test_trains_and_generates_on_plain_onnxruntime(artifacts, data, tmp_path):
    """The device loop in a venv with current onnxruntime only: no torch, no onnxruntime-training."""
    artifact = artifacts("gpt2", "int8", backend="both")
    check = subprocess.run([str(PORTABLE_PYTHON), "-c", PORTABLE_CHECK], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr + check.stdout
    assert not check.stdout.startswith("1.19"), "the portable venv must run a current onnxruntime"
    run = tmp_path / "run"
    cli = [str(PORTABLE_PYTHON), "-m", "edge_peft.cli"]
    for args in (["train", artifact, "--data", data["lm"], "--out", run, "--steps", "12", "--batch-size", "4",
                  "--checkpoint-every", "6", "--eval-every", "6", "--threads", "1", "--lr", "1e-2", "--quiet"],
                 ["generate", run, "--prompt", "the cat", "--max-new-tokens", "5"],
                 ["adapter", "save", run, "--out", tmp_path / "adapter"]):
        proc = subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    history = losses(run)
    assert len(history) == 12 and history[-1] < history[0]
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_adapter_load_warm_starts_a_portable_artifact(artifacts, data, tmp_path):
    import shutil

    from edge_peft.device.adapter_io import load_into_artifact

    artifact = tmp_path / "artifact"
    shutil.copytree(artifacts("gpt2", "int8", backend="portable"), artifact)
    train(artifact, data["lm"], tmp_path / "run", steps=6)
    assert load_into_artifact(artifact, tmp_path / "run" / "adapter") > 0
    ids = np.array([[5, 9, 12, 7]], dtype=np.int64)
    mask = np.ones_like(ids)
    np.testing.assert_allclose(Predictor(artifact).logits(ids, mask), Predictor(tmp_path / "run").logits(ids, mask),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # about 1 s: the profile check imports onnxruntime
def test_arm_board_profiles_choose_the_portable_backend():
    from edge_peft.cli import _apply_profile

    for name in ("jetson-orin-nano", "raspberry-pi-5"):
        options = {"backend": "auto", "threads": 0, "memory_budget": None, "memory_margin": None}
        _apply_profile(name, options)
        assert options["backend"] == "portable", name
    options = {"backend": "ort", "threads": 0, "memory_budget": None, "memory_margin": None}
    _apply_profile("raspberry-pi-5", options)
    assert options["backend"] == "ort"  # the command line wins
