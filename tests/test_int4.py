"""``export --quantize int4``: blockwise 4-bit frozen weights (``exporter/int4.py``) in every graph of an artifact,
dequantized at each use, trained on both backends with the numbers of a PyTorch model holding the same weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from families import make_family_model
from helpers import forward_of, reference_losses, train
from onnx import TensorProto, helper, numpy_helper

from edge_peft.artifact.files import (GENERATION_MODEL, INFERENCE_MODEL, ORT_EVAL_MODEL, ORT_TRAINING_MODEL,
                                      PORTABLE_STEP_MODEL)
from edge_peft.artifact.manifest import load_manifest
from edge_peft.backends import open_backend
from edge_peft.cli import main
from edge_peft.exporter import int4

STEPS = 5


def _run(nodes, inits, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """Run a small graph on the ONNX Runtime of this environment (ORT 1.19 in .venv)."""
    import onnxruntime

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.INT64, list(v.shape))
                                           for n, v in inputs.items()],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], inputs)[0]


def test_graph_dequantizes_exactly_as_numpy():
    s = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    packed, scale, zero, offset = int4.quantize(s, 32)
    assert offset is None  # not on a GGUF grid: no offsets stored
    expected = int4.dequantize(packed, scale, zero)
    assert np.abs(expected - s).max() <= scale.max() / 2 + 1e-6  # rounding to the nearest of 16 levels
    inits = int4.stored("S", packed, scale, zero) + int4.constants(32)
    np.testing.assert_array_equal(_run(int4.dequantize_nodes("S", "out"), inits, {}, "out"), expected)
    ids = np.array([[3, 0, 63], [5, 5, 1]], np.int64)  # embeddings: only the gathered rows
    got = _run(int4.gather_nodes("S", 96, 32, "ids", "out"), inits, {"ids": ids}, "out")
    np.testing.assert_array_equal(got, expected[ids])


def test_gguf_q4_0_and_q4_1_weights_keep_their_values_exactly():
    """A matrix as transformers dequantizes a Q4_0 GGUF (gguf-py's reference quantizer, llama.cpp's rule) is
    stored with the file's codes and scales: the graph gives back the very same values, negative scales
    included. A Q4_1 matrix (``d * q + m``) keeps them too, through its stored offsets, in the full matrix and in
    gathered rows; one value off the grid sends it back to plain quantization."""
    from gguf import GGMLQuantizationType, quants

    x = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    q4_0 = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    packed, scale, zero, offset = int4.quantize(q4_0, 32)
    assert (zero == 8).all() and (scale < 0).any() and (scale > 0).any() and offset is None
    np.testing.assert_array_equal(int4.dequantize(packed, scale, zero), q4_0)
    inits = int4.stored("S", packed, scale, zero) + int4.constants(32)
    np.testing.assert_array_equal(_run(int4.dequantize_nodes("S", "out"), inits, {}, "out"), q4_0)

    q4_1 = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    assert int4.q4_0_codes(q4_1.reshape(64, 4, 32)) is None
    packed, scale, zero, offset = int4.quantize(q4_1, 32)
    assert offset.shape == (64 * 4, 1) and (zero == 0).all()
    np.testing.assert_array_equal(int4.dequantize(packed, scale, zero, offset), q4_1)
    inits = int4.stored("S", packed, scale, zero, offset) + int4.constants(32)
    np.testing.assert_array_equal(_run(int4.dequantize_nodes("S", "out", offset=True), inits, {}, "out"), q4_1)
    ids = np.array([[3, 0, 63], [5, 5, 1]], np.int64)
    got = _run(int4.gather_nodes("S", 128, 32, "ids", "out", offset=True), inits, {"ids": ids}, "out")
    np.testing.assert_array_equal(got, q4_1[ids])

    off_grid = q4_1.copy()
    off_grid[7, 40] = np.nextafter(off_grid[7, 40], np.float32(np.inf))
    packed, scale, zero, offset = int4.quantize(off_grid, 32)
    assert offset is None
    assert np.abs(int4.dequantize(packed, scale, zero) - off_grid).max() <= scale.max() / 2 + 1e-6


def test_gguf_q8_0_weights_keep_their_values_exactly():
    """A matrix as transformers dequantizes a Q8_0 GGUF keeps its int8 codes and block scales (an int8 export's
    blockwise form): the chain and gathered rows give back the file's values bit for bit; other matrices, and one
    value off the grid, are not taken for Q8_0."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(2)
    x = rng.standard_normal((48, 96)).astype(np.float32)
    q8_0 = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0).reshape(x.shape)
    codes, scale = int4.q8_0_codes(q8_0)
    assert codes.dtype == np.int8 and scale.shape == (48 * 3,) and np.abs(codes).max() == 127
    inits = int4.stored_q8("S", codes, scale) + int4.constants(int4.Q8_0_BLOCK, packed=False)
    nodes = int4.dequantize_nodes("S", "out", packed=False)
    assert int4.pinned(nodes[0], 1) and not int4.pinned(nodes[0], 0)  # a copy at use waits on the root's shape
    np.testing.assert_array_equal(_run(nodes, inits, {}, "out"), q8_0)
    ids = np.array([[3, 0, 47], [5, 5, 1]], np.int64)
    got = _run(int4.gather_nodes("S", 96, int4.Q8_0_BLOCK, "ids", "out", packed=False), inits, {"ids": ids}, "out")
    np.testing.assert_array_equal(got, q8_0[ids])

    assert int4.q8_0_codes(x) is None
    off_grid = q8_0.copy()
    off_grid[30, 50] = np.nextafter(off_grid[30, 50], np.float32(np.inf))
    assert int4.q8_0_codes(off_grid) is None


def _refused(capsys, *args) -> list[str]:
    """Run the CLI in-process, expecting a user error; return what it wrote to stderr, line by line."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_a_block_size_outside_32_64_128_is_refused(tmp_path, capsys):
    lines = _refused(capsys, "export", tmp_path / "model", "--out", tmp_path / "art", "--quantize", "int4",
                     "--block-size", "48")
    assert lines == ["error: --block-size 48 is not supported: use 32, 64, 128"]
    assert not (tmp_path / "art").exists()


# -- exported tiny Llama-shaped models (slow) -------------------------------------------------------------


Q4_1_WEIGHTS = ("mlp.", "embed_tokens")  # on GGUF Q4_1's grid in the ``llama`` fixture: both int4 forms in one model
Q8_0_WEIGHTS = ("q_proj", "o_proj")  # on Q8_0's grid: kept blockwise by an int8 export


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama whose MLP projections and tied embedding table lie on GGUF Q4_1's grid (as transformers loads a
    Q4_1 file: gguf-py's quantizer and dequantizer), its query and output projections on Q8_0's, the rest on none."""
    from gguf import GGMLQuantizationType, quants
    from safetensors.numpy import load_file, save_file

    out = make_family_model("llama", tmp_path_factory.mktemp("llama") / "model")
    weights = load_file(out / "model.safetensors")
    for name, w in weights.items():
        for parts, kind in ((Q4_1_WEIGHTS, GGMLQuantizationType.Q4_1), (Q8_0_WEIGHTS, GGMLQuantizationType.Q8_0)):
            if w.ndim == 2 and any(part in name for part in parts):
                weights[name] = quants.dequantize(quants.quantize(w, kind), kind).reshape(w.shape)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _export(model, out, quantize: str = "int4", backend: str = "ort", checkpointing: bool = False, block: int = 32):
    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    export_artifact(model, out, ExportOptions(rank=4, alpha=8, quantize=quantize, targets=["all-linear"],
                                              max_seq_len=32, seed=7, backend=backend, checkpointing=checkpointing,
                                              block_size=block), quiet=True)
    return out


def _stored(artifact) -> dict[str, np.ndarray]:
    """The int4 arrays of the inference graph (nibbles, scales, zero points), by initializer name."""
    proto = onnx.load(str(artifact / INFERENCE_MODEL))
    names = {n for i in proto.graph.initializer if i.name.endswith(".int4")
             for n in int4.stored_names(i.name.removesuffix(".int4"))}
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if i.name in names}


def _dequantized_base(artifact) -> dict[str, np.ndarray]:
    """torch parameter name -> the fp32 weight the artifact's graphs compute from its int4 storage. A Llama stores
    each projection as the torch weight (``W.T`` in the graph, its transposes folded: ``S = W``) and the tied
    embedding table as it is."""
    stored = _stored(artifact)
    return {name.removesuffix(".T"): int4.dequantize(*(stored.get(n) for n in int4.stored_names(name)))
            for name in (n.removesuffix(".int4") for n in stored if n.endswith(".int4"))}


@pytest.mark.slow
def test_int4_trains_on_both_backends_and_keeps_its_weights(llama, data, tmp_path):
    artifact = _export(llama, tmp_path / "int4", backend="both")
    assert load_manifest(artifact).block_size == 32
    for graph in (ORT_TRAINING_MODEL, ORT_EVAL_MODEL, INFERENCE_MODEL, GENERATION_MODEL, PORTABLE_STEP_MODEL):
        proto = onnx.load(str(artifact / graph))
        big = [i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
               and np.prod(i.dims) >= 1024 and "lora_" not in i.name]
        assert not big, f"{graph} stores base weights in fp32: {big[:3]}"
        assert not [i.name for i in proto.graph.initializer if i.data_type == TensorProto.INT8]
    names = list(_stored(artifact))
    offsets = {n.removesuffix(".offset") for n in names if n.endswith(".offset")}
    assert offsets and all(any(part in n for part in Q4_1_WEIGHTS) for n in offsets)  # Q4_1 kept exactly, only there
    manifest = load_manifest(artifact)
    for backend in ("ort", "portable"):
        run = tmp_path / f"run-{backend}"
        got = train(artifact, data["lm"], run, steps=STEPS, threads=1, backend=backend)
        assert got[-1] < got[0]
        before = open_backend(artifact, manifest, threads=1, choice=backend)
        after = open_backend(artifact, manifest, run / "checkpoint" / "state", threads=1, choice=backend)
        for name in names:
            assert after.frozen(name).tobytes() == before.frozen(name).tobytes()


@pytest.mark.slow
def test_int4_losses_equal_checkpointing_and_pytorch(llama, data, tmp_path):
    plain = _export(llama, tmp_path / "plain")
    recomputed = _export(llama, tmp_path / "ckpt", checkpointing=True)
    training = onnx.load(str(plain / ORT_TRAINING_MODEL)).graph.node
    assert not [n for n in training if int4.is_chain_end(n)], "a dequantization left to run at the step's start"
    # checkpointed, no block's product or normalization output waits for the backward (each is recomputed)
    checkpointed = onnx.load(str(recomputed / ORT_TRAINING_MODEL))
    nodes, producer, forward = forward_of(checkpointed, checkpointed.graph.output[0].name)
    kept = {i for n in nodes if id(n) not in forward for i in n.input if i in producer
            and id(producer[i]) in forward and producer[i].op_type in ("Gemm", "SimplifiedLayerNormalization")
            and "/layers." in producer[i].name}
    assert not kept, f"forward activations held for the backward: {sorted(kept)[:3]}"
    expected = train(plain, data["lm"], tmp_path / "run-plain", steps=STEPS, threads=1)
    got = train(recomputed, data["lm"], tmp_path / "run-ckpt", steps=STEPS, threads=1)
    assert got == pytest.approx(expected, abs=1e-5)
    base = _dequantized_base(plain)
    from safetensors.numpy import load_file

    q4_1 = {n: w for n, w in load_file(llama / "model.safetensors").items() if any(p in n for p in Q4_1_WEIGHTS)}
    kept = {n.replace(".base_layer", ""): w for n, w in base.items()}
    assert q4_1 and all(np.array_equal(kept[n], w) for n, w in q4_1.items())  # the file's values, bit for bit
    reference = reference_losses(llama, plain, data["lm"], STEPS, tmp_path / "batches", base)
    np.testing.assert_allclose(expected, reference, rtol=1e-4)


@pytest.mark.slow
def test_an_int8_export_keeps_q8_0_matrices_exactly_and_trains(llama, data, tmp_path):
    from safetensors.numpy import load_file

    artifact = _export(llama, tmp_path / "int8", quantize="int8", backend="both", checkpointing=True)
    file = load_file(llama / "model.safetensors")
    for graph in (INFERENCE_MODEL, GENERATION_MODEL, PORTABLE_STEP_MODEL):  # ORT training keeps them in its checkpoint
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(artifact / graph)).graph.initializer}
        kept = {n.removesuffix(".q8") for n in inits if n.endswith(".q8")}
        assert kept and all(any(part in n for part in Q8_0_WEIGHTS) for n in kept), graph
        assert int4.FOUR not in inits  # nothing to unpack: no nibble shift constant
        for name in kept:  # S = the torch weight (transposes folded), the file's values bit for bit
            s = (inits[f"{name}.q8"].astype(np.float32).reshape(-1, 32) * inits[f"{name}.scale"][:, None])
            torch_name = name.replace(".base_layer", "").removesuffix(".T")
            np.testing.assert_array_equal(s.reshape(file[torch_name].shape), file[torch_name])
    for graph in (ORT_TRAINING_MODEL, PORTABLE_STEP_MODEL):  # every Q8_0 copy made at its use, none at the start
        assert not [n for n in onnx.load(str(artifact / graph)).graph.node if int4.is_chain_end(n)], graph
    losses = {b: train(artifact, data["lm"], tmp_path / f"run-{b}", steps=STEPS, threads=1, backend=b)
              for b in ("ort", "portable")}
    assert losses["ort"][-1] < losses["ort"][0]
    np.testing.assert_allclose(losses["portable"], losses["ort"], rtol=1e-4)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A Llama-shaped model whose matrices outweigh its norms and adapters (hidden 256, 2 blocks)."""
    import toy
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("wide") / "model"
    out.mkdir()
    vocab = toy.save_tokenizer(out, classifier=False)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.mark.slow
def test_int4_stores_about_half_of_int8(wide_llama, tmp_path):
    exported = {(q, b): _export(wide_llama, tmp_path / f"{q}-{b}", quantize=q, block=b)
                for q, b in (("int8", 32), ("int4", 32), ("int4", 128))}
    quantized = {key: load_manifest(path).memory.quantized_bytes for key, path in exported.items()}
    checkpoint = {key: (path / "checkpoint").stat().st_size for key, path in exported.items()}
    # a value costs 4 bits + 40 bits of scale and zero point a block: 5.25 bits at block 32, 4.3 at 128; int8: 8
    assert quantized["int4", 32] / quantized["int8", 32] == pytest.approx(5.25 / 8, abs=0.01)
    assert quantized["int4", 128] / quantized["int8", 32] == pytest.approx(4.3125 / 8, abs=0.01)
    assert checkpoint["int4", 128] < checkpoint["int4", 32] < 0.7 * checkpoint["int8", 32]


@pytest.mark.slow
def test_a_block_size_that_does_not_divide_a_weight_is_refused(llama, tmp_path, capsys):
    lines = _refused(capsys, "export", llama, "--out", tmp_path / "art", "--quantize", "int4", "--block-size", "64")
    assert lines[-1].startswith("error: --block-size 64 does not divide dimension 32 of ")
    assert sum(line.startswith("error") for line in lines) == 1
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.*"))


@pytest.mark.slow
def test_a_budgeted_export_keeps_int4_and_its_figures_match_the_artifact(wide_llama, tmp_path):
    from edge_peft.device.memory_model import MB, ModelFigures
    from edge_peft.exporter.export_plan import model_figures, plan_export
    from edge_peft.exporter.load import meta_model
    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    asked = ExportOptions(rank=4, quantize="int4", targets=["all-linear"], max_seq_len=32)
    opts = plan_export(wide_llama, asked, 1024 * MB, 0.15)
    assert opts.quantize == opts.memory["export_plan"]["quantize"] == "int4"
    manifest = export_artifact(wide_llama, tmp_path / "artifact", opts, quiet=True)
    planned = model_figures(meta_model(wide_llama, None), opts, opts.rank, opts.layers, "int4")
    real = ModelFigures.of(manifest, "ort")
    assert planned.quantized_values == real.quantized_values
    assert planned.quantized_bytes == pytest.approx(real.quantized_bytes, rel=0.02)
