"""The real SmolLM2-135M-Instruct (the bundled GGUF) exported with an int4 base and block checkpointing for the
portable backend, trained under a memory budget: the whole process's high-water mark stays under it."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from helpers import cli

from edge_peft.artifact.files import PORTABLE_STEP_MODEL
from edge_peft.artifact.manifest import load_manifest
from edge_peft.bundled import smollm2_dir
from edge_peft.device.memory_model import estimated_step_nodes

BUDGET_MB = 520  # SmolLM2-135M's int4 base is 84 MB; ORT's runtime and the 30-block session graph most of the rest
SEQ = 128

NOTES = [
    "The allotment opens at seven on weekdays; bring your own gloves and return the wheelbarrow to the shed.",
    "Pay the water bill before the fifth, and remember that the meter reading goes in the blue notebook.",
    "Tomatoes need staking once they reach knee height; pinch out the side shoots every few days.",
    "The choir meets on Thursday evenings in the church hall, and the new music folders are on the piano.",
    "Soak the beans overnight, then simmer them with bay leaves for an hour before adding the salt.",
    "The bicycle's back brake squeals in the rain: clean the rim and check the pads before the long ride.",
]


@pytest.mark.slow
def test_int4_smollm2_trains_under_a_small_memory_budget(tmp_path):
    artifact = tmp_path / "artifact"
    gguf = next(smollm2_dir().glob("*.gguf"))
    export = subprocess.run([sys.executable, "-m", "edge_peft.cli", "export", str(gguf), "--out", str(artifact),
                             "--quantize", "int4", "--checkpointing", "--backend", "portable", "--rank", "8",
                             "--targets", "all-linear", "--max-seq-len", str(SEQ)],
                            capture_output=True, text=True, timeout=900)
    assert export.returncode == 0, export.stderr[-2000:]
    # the memory model's load term counts the step graph's nodes: recorded exactly, and the estimate the
    # export-time planner uses is close to it
    memory = load_manifest(artifact).memory
    nodes = len(onnx.load(str(artifact / PORTABLE_STEP_MODEL), load_external_data=False).graph.node)
    assert memory.step_nodes == nodes
    assert abs(estimated_step_nodes(30, True, True) - nodes) < 0.05 * nodes
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(NOTES[i:] + NOTES[:i])}) + "\n" for i in range(6)))
    run = tmp_path / "run"
    proc = cli("train", artifact, "--data", data, "--out", run, "--steps", "3", "--batch-size", "2",
               "--memory-budget", f"{BUDGET_MB}MB", "--eval-every", "0", "--threads", "2", "--quiet")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    summary = json.loads((run / "summary.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert info["plan"]["backend"] == "portable" and info["plan"]["budget_mb"] == BUDGET_MB, info
    assert 0 < summary["peak_rss_mb"] <= BUDGET_MB, summary  # VmHWM of the whole training process
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["peak_rss_mb"] <= BUDGET_MB for r in records)
    assert all(r["loss"] == r["loss"] and 0 < r["loss"] < 20 for r in records)  # finite, a real LM's loss
