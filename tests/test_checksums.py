"""Checksums (issue 20, item 6): a corrupted checkpoint, artifact file or adapter is refused in one line naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from edge_peft.store.local_server import StoreServer
from edge_peft.store.service import AdapterStore
from edge_peft.store.testing import make_manifest, random_tensors, write_run

pytestmark = pytest.mark.slow  # trains a toy model through the CLI


@dataclass
class Result:
    exit_code: int
    output: str


def run_cli(*args) -> Result:
    """``edge-peft ARGS`` in a fresh process: stdout and stderr together."""
    proc = subprocess.run([sys.executable, "-m", "edge_peft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    return Result(proc.returncode, proc.stdout + proc.stderr)


def flip_byte(path) -> None:
    """Corrupt one byte in the middle of ``path`` (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line_naming(result, path) -> bool:
    return result.exit_code == 2 and str(path) in result.output and result.output.strip().count("\n") == 0


def test_corrupted_files_are_refused_naming_them(artifacts, data, tmp_path):
    artifact = artifacts("bert", "none")
    run = tmp_path / "run"
    train = ["train", artifact, "--data", data["cls"], "--out", run, "--steps", "2", "--batch-size", "4",
             "--checkpoint-every", "1", "--eval-every", "0", "--threads", "1", "--quiet"]
    assert run_cli(*train).exit_code == 0
    recorded = json.loads((run / "checkpoint" / "trainer.json").read_text())["files"]
    assert set(recorded) == {"state"}
    assert set(json.loads((run / "adapter" / "checksums.json").read_text())) == {"adapter_model.safetensors",
                                                                                "adapter_config.json"}
    saved = tmp_path / "saved"
    assert run_cli("adapter", "save", run, "--out", saved).exit_code == 0
    assert (saved / "checksums.json").is_file()

    # An adapter: classify, push and `adapter load` refuse it.
    flip_byte(saved / "adapter_model.safetensors")
    result = run_cli("classify", artifact, "--adapter", saved, "--text", "hello")
    assert one_line_naming(result, saved / "adapter_model.safetensors"), result.output
    result = run_cli("adapter", "load", artifact, saved)
    assert one_line_naming(result, saved / "adapter_model.safetensors"), result.output
    flip_byte(run / "adapter" / "adapter_model.safetensors")
    result = run_cli("push", run, "--store", "http://127.0.0.1:9", "--token", "phone.x")
    assert one_line_naming(result, run / "adapter" / "adapter_model.safetensors"), result.output
    assert not (run / "outbox").exists()

    # A checkpoint: --resume refuses it.
    flip_byte(run / "checkpoint" / "state")
    result = run_cli(*train[:train.index("--steps") + 1], "4", *train[train.index("--steps") + 2:], "--resume")
    assert one_line_naming(result, run / "checkpoint" / "state"), result.output

    # An artifact file: train and classify refuse it (the manifest's files section).
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    flip_byte(copy / "inference_model.onnx")
    result = run_cli("classify", copy, "--text", "hello")
    assert one_line_naming(result, copy / "inference_model.onnx"), result.output


def test_pull_verifies_the_download_and_repairs_a_corrupted_copy(tmp_path):
    manifest = make_manifest()
    store, _ = AdapterStore.open(tmp_path / "store")
    store.add_base(manifest.adapter.to_dict())
    token = store.add_device("phone-1")
    run = write_run(tmp_path / "run", manifest, random_tensors(manifest.adapter, np.random.default_rng(0)), samples=3)
    with StoreServer(tmp_path / "store") as server:
        assert run_cli("push", run, "--store", server.url, "--token", token).exit_code == 0
        pull = ["pull", "--store", server.url, "--token", token, "--base", manifest.fingerprint, "--device", "phone-1",
                "--out", tmp_path / "pulled"]
        assert run_cli(*pull).exit_code == 0
        pulled = tmp_path / "pulled" / "adapter_model.safetensors"
        good = pulled.read_bytes()
        assert "up to date" in run_cli(*pull).output
        flip_byte(pulled)
        result = run_cli(*pull)  # the ETag would say "unchanged": the local copy is checked first
        assert result.exit_code == 0 and "pulled device phone-1 version 1" in result.output, result.output
        assert pulled.read_bytes() == good
