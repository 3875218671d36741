"""Recompute in the backward (``exporter/recompute.py``): int8 weights dequantized where the backward reads
them, and ``export --checkpointing`` (each block's activations recomputed). Both change the memory a step
holds, never its numbers: the losses equal those of the plain graph."""

from __future__ import annotations

import re

import onnx
import pytest
from families import make_family_model
from helpers import forward_of, train

from edge_peft.artifact.files import ORT_TRAINING_MODEL, PORTABLE_PIECES, PORTABLE_STEP_MODEL
from edge_peft.artifact.manifest import load_manifest
from edge_peft.artifact.names import LOSS

pytestmark = pytest.mark.slow  # exports and trains models

STEPS = 5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family_model("llama", tmp_path_factory.mktemp("llama") / "model")


def _export(model, out, quantize: str, checkpointing: bool, backend: str = "ort", attention_recompute: bool = True):
    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    export_artifact(model, out, ExportOptions(rank=4, alpha=8, quantize=quantize, targets=["all-linear"],
                                              max_seq_len=32, seed=7, backend=backend, checkpointing=checkpointing,
                                              attention_recompute=attention_recompute), quiet=True)
    return out


def _nodes(artifact) -> list:
    return list(onnx.load(str(artifact / ORT_TRAINING_MODEL)).graph.node)


@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_checkpointing_keeps_the_losses(llama, data, tmp_path, quantize):
    plain = _export(llama, tmp_path / "plain", quantize, checkpointing=False)
    recomputed = _export(llama, tmp_path / "ckpt", quantize, checkpointing=True)
    assert load_manifest(recomputed).memory.checkpointing and not load_manifest(plain).memory.checkpointing
    # the memory model's load term counts the nodes ORT loads: recorded exactly, the recompute copies included
    counts = [load_manifest(a).memory.train_nodes for a in (plain, recomputed)]
    assert counts == [len(_nodes(plain)), len(_nodes(recomputed))] and counts[0] < counts[1]
    names = [n.name for n in _nodes(recomputed)]
    for block in range(2):  # every block of the tiny model has its recompute copies
        assert any(f"/layers.{block}/" in n and n.endswith(f".rc{block}") for n in names)
    # ORT runs the graph depth-first from its last leaf: with the accumulators last, in forward order, it reaches
    # the last block's weight gradients first and computes each block's as soon as its backward has run
    nodes = _nodes(recomputed)
    accumulators = [n for n in nodes if n.op_type == "InPlaceAccumulatorV2"]
    assert accumulators and list(nodes[-len(accumulators):]) == accumulators
    blocks = [int(re.search(r"layers\.(\d+)\.", n.input[1]).group(1)) for n in accumulators]
    assert blocks == sorted(blocks) and blocks[0] < blocks[-1]
    expected = train(plain, data["lm"], tmp_path / "run-plain", steps=STEPS, threads=1)
    got = train(recomputed, data["lm"], tmp_path / "run-ckpt", steps=STEPS, threads=1)
    assert got == pytest.approx(expected, abs=1e-5)
    assert expected[-1] < expected[0]


def _probabilities_read_by_the_backward(model: onnx.ModelProto, loss: str) -> tuple[int, int]:
    """(forward Softmax nodes, other Softmax nodes) whose output a node outside the forward reads; the forward is
    every node the loss depends on."""
    nodes, _, forward = forward_of(model, loss)
    read = {i for n in nodes if id(n) not in forward for i in n.input}
    softmax = [n for n in nodes if n.op_type == "Softmax" and n.output[0] in read]
    return sum(id(n) in forward for n in softmax), sum(id(n) not in forward for n in softmax)


def test_attention_probabilities_are_recomputed_in_the_backward(llama, data, tmp_path):
    """By default no training graph keeps an attention's probabilities from its forward to its backward: each block's
    backward reads a Softmax of its own, recomputed from Q and K; the losses equal those of --keep-attention."""
    kept = _export(llama, tmp_path / "kept", "int8", checkpointing=False, backend="both", attention_recompute=False)
    recomputed = _export(llama, tmp_path / "recomputed", "int8", checkpointing=False, backend="both")
    assert load_manifest(recomputed).memory.attention_recompute and not load_manifest(kept).memory.attention_recompute
    for artifact, expected in ((kept, (2, 0)), (recomputed, (0, 2))):  # (forward, recomputed) for the 2 blocks
        training = onnx.load(str(artifact / ORT_TRAINING_MODEL))
        assert _probabilities_read_by_the_backward(training, training.graph.output[0].name) == expected
        step = onnx.load(str(artifact / PORTABLE_STEP_MODEL), load_external_data=False)
        assert _probabilities_read_by_the_backward(step, LOSS) == expected
    for backend in ("ort", "portable"):
        expected = train(kept, data["lm"], tmp_path / f"run-kept-{backend}", steps=STEPS, threads=1, backend=backend)
        got = train(recomputed, data["lm"], tmp_path / f"run-{backend}", steps=STEPS, threads=1, backend=backend)
        assert got == pytest.approx(expected, abs=1e-5)
        assert expected[-1] < expected[0]


def test_int8_backward_dequantizes_its_own_copies(llama, tmp_path):
    artifact = _export(llama, tmp_path / "int8", "int8", checkpointing=False)
    nodes = _nodes(artifact)
    late = [n for n in nodes if n.op_type == "DequantizeLinear" and ".use" in n.name]
    assert late, "the backward reads no dequantized copy of its own"
    produced_by = {o: n for n in nodes for o in n.output}
    # each late copy waits for a gradient: its scale goes through a Reshape whose shape reads one, or (a slice of
    # the LM head) it is sliced from the stored scales at a first index that does
    for node in late:
        scale = produced_by[node.input[1]]
        assert scale.op_type == "Reshape" or produced_by[scale.input[1]].op_type == "Reshape"


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_lm_head_is_dequantized_a_vocabulary_slice_at_a_time(llama, tmp_path, quantize):
    """Each part of the chunked loss reads the quantized head in vocabulary slices, each dequantized by its own copy
    at that read; the loss equals the cross-entropy of the inference model's logits, whose head is whole."""
    import numpy as np

    from edge_peft.backends import open_backend
    from edge_peft.device.data import Batch
    from edge_peft.device.inference import Predictor

    artifact = _export(llama, tmp_path / quantize, quantize, checkpointing=False)
    manifest = load_manifest(artifact)
    chunks = manifest.memory.loss_chunks
    assert manifest.memory.head_slices == chunks == 8
    nodes = _nodes(artifact)
    produced_by = {o: n for n in nodes for o in n.output}
    products = [n for n in nodes if n.name.startswith("target_loss.head_product.")]
    # every part of the rows times every slice of the vocabulary, in the forward and in the input-gradient
    assert len(products) == 2 * chunks * chunks
    read = {produced_by[p.input[1]].output[0].split(".use")[0] for p in products}
    assert len(read) == chunks and all(".vocab" in name for name in read)
    for product in products:  # made for this product alone, at its read
        assert ".use" in produced_by[product.input[1]].name
    rng = np.random.default_rng(0)
    ids = rng.integers(4, manifest.vocab_size, size=(2, 24), dtype=np.int64)
    labels = np.concatenate([ids[:, 1:], np.full((2, 1), -100, np.int64)], axis=1)
    loss = open_backend(artifact, manifest, threads=1, choice="ort").eval_loss(Batch(ids, np.ones_like(ids), labels))
    logits = Predictor(artifact, threads=1).logits(ids, np.ones_like(ids))[:, :-1].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1).mean()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_portable_checkpointing_keeps_the_losses(llama, data, tmp_path):
    """The block-wise portable step recomputes each block from its pinned input and trains identically."""
    plain = _export(llama, tmp_path / "plain", "int8", checkpointing=False, backend="portable")
    recomputed = _export(llama, tmp_path / "ckpt", "int8", checkpointing=True, backend="both")
    nodes = onnx.load(str(recomputed / PORTABLE_STEP_MODEL)).graph.node
    produced_by = {o: n for n in nodes for o in n.output}
    for block in range(2):  # each block's backward reads its input only once the gradient from above exists
        pin = produced_by[f"b{block}/hidden.late"]
        assert pin.op_type == "Reshape" and pin.input[0] == f"h{block}"
    assert not any(n.output[0] == "b0/hidden.late" for n in onnx.load(str(plain / PORTABLE_STEP_MODEL)).graph.node)
    # no pieces: without checkpointing a block's backward reads its forward's activations; with it, two blocks are
    # too few alike for the distinct pieces to hold fewer nodes than the whole step (test_portable_pieces.py: four)
    assert not (plain / PORTABLE_PIECES).exists() and not (recomputed / PORTABLE_PIECES).exists()
    expected = train(plain, data["lm"], tmp_path / "run-plain", steps=STEPS, threads=1, backend="portable")
    got = train(recomputed, data["lm"], tmp_path / "run-ckpt", steps=STEPS, threads=1, backend="portable")
    assert got == pytest.approx(expected, abs=1e-5)
    assert expected[-1] < expected[0]
    ort = train(recomputed, data["lm"], tmp_path / "run-ort", steps=STEPS, threads=1, backend="ort")
    assert ort == pytest.approx(expected, rel=1e-4)


def test_two_rewrites_of_one_graph_never_reuse_a_name():
    """Each pass (dequantize at use, attention, blocks) is its own rewrite: a value two passes pin gets two names."""
    from onnx import TensorProto, helper

    from edge_peft.exporter import recompute

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["y"], ["g"]),
         helper.make_node("Add", ["y", "g"], ["z"])], "g", [x], [z]))
    pinned = []
    for _ in range(2):
        rw = recompute._Rewriter(recompute._Graph(model.graph))
        pinned.append(rw.late("y", "g", model.graph.node[2]))
        rw.write()
    assert pinned[0] != pinned[1]
    onnx.checker.check_model(model, full_check=True)  # single assignment: no value made twice
