"""The checkpointed portable step cut into pieces (``exporter/portable_pieces.py``, ``backends/pieces.py``): blocks
alike share one graph, the runtime loads a fraction of the step's nodes, and the pieces compute exactly what the
whole step graph computes, a fed frozen A included. (Where no cut pays, none is written: ``test_recompute.py``.)"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from families import make_family_model

from edge_peft.artifact.files import PORTABLE_INITIAL_STATE, PORTABLE_PIECES, PORTABLE_STEP_MODEL
from edge_peft.artifact.manifest import load_manifest
from edge_peft.artifact.names import BATCH_INPUTS, LOSS, accumulated
from edge_peft.backends.pieces import PieceSession
from edge_peft.backends.portable import DISABLED_OPTIMIZERS, PortableBackend
from edge_peft.backends.runtime import onnxruntime_module, session_options

pytestmark = pytest.mark.slow  # exports models

LAYERS = 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family_model("llama", tmp_path_factory.mktemp("llama") / "model", num_hidden_layers=LAYERS)


def _export(model, out, quantize: str):
    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    export_artifact(model, out, ExportOptions(rank=4, alpha=8, quantize=quantize, targets=["all-linear"],
                                              max_seq_len=32, seed=7, backend="portable", checkpointing=True,
                                              loss_chunks=2), quiet=True)
    return out


def _feeds(artifact, session) -> dict[str, np.ndarray]:
    """A batch with padding, the exported trainable tensors (B made non-zero) and zero accumulators."""
    from safetensors.numpy import load

    rng = np.random.default_rng(0)
    vocab = load_manifest(artifact).vocab_size
    ids = rng.integers(4, vocab, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    labels = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
    feeds = dict(zip(BATCH_INPUTS, (ids, mask, labels, np.array(0.5, np.float32))))
    inputs = {i.name for i in session.get_inputs()}
    for name, value in load((artifact / PORTABLE_INITIAL_STATE).read_bytes()).items():
        if accumulated(name) in inputs:
            feeds[name] = value + rng.normal(0, 0.05, value.shape).astype(np.float32)
            feeds[accumulated(name)] = np.zeros_like(value)
    return feeds


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_pieces_compute_the_whole_step_exactly(llama, tmp_path, quantize):
    artifact = _export(llama, tmp_path / quantize, quantize)
    plan = json.loads((artifact / PORTABLE_PIECES).read_text())
    graphs = [p["graph"] for p in plan["pieces"]]
    # prologue, a forward per block, the tail, a backward per block; blocks alike share their graphs (block 0's
    # forward orders its nodes otherwise, its backward computes no input gradient)
    assert len(graphs) == 2 * LAYERS + 2 and len(set(graphs)) == 6
    stitched = len(onnx.load(str(artifact / PORTABLE_STEP_MODEL), load_external_data=False).graph.node)
    memory = load_manifest(artifact).memory
    assert memory.step_nodes == sum(len(onnx.load(str(artifact / g)).graph.node) for g in set(graphs)) < stitched
    # the frozen bytes the memory model counts for this backend are those the pieces read (small constants inlined)
    read = sum(w["length"] for w in plan["weights"].values())
    assert read <= memory.step_frozen_bytes <= read + 64 * 1024
    # every piece reads its block's weights as inputs: no graph holds a weight of its own
    assert all(not i.external_data for g in set(graphs) for i in onnx.load(str(artifact / g)).graph.initializer)

    ort = onnxruntime_module()
    options = session_options(1)
    whole = ort.InferenceSession(str(artifact / PORTABLE_STEP_MODEL), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=DISABLED_OPTIMIZERS)
    pieces = PieceSession(artifact, options, ["CPUExecutionProvider"], DISABLED_OPTIMIZERS)
    assert [i.name for i in pieces.get_inputs()] == [i.name for i in whole.get_inputs()]
    overridable = [i.name for i in pieces.get_overridable_initializers()]
    assert overridable == [i.name for i in whole.get_overridable_initializers()] and overridable
    feeds = _feeds(artifact, whole)
    outputs = [o.name for o in whole.get_outputs()]
    assert outputs[0] == LOSS and len(outputs) > 1
    gated = {overridable[0]: np.zeros(_shape(whole, overridable[0]), np.float32)}  # a rank channel's A gated off
    for given in (feeds, {**feeds, **gated}):
        expected = whole.run(outputs, given)
        got = pieces.run(outputs, given)
        for name, e, g in zip(outputs, expected, got):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7, err_msg=name)
        assert any(np.abs(g).max() > 0 for g in got[1:])
    assert pieces.run([LOSS], feeds)[0] == pytest.approx(float(whole.run([LOSS], feeds)[0]), rel=1e-6)
    assert isinstance(PortableBackend(artifact, load_manifest(artifact))._session, PieceSession)


def _shape(session, name: str) -> list[int]:
    return next(i.shape for i in session.get_overridable_initializers() if i.name == name)
