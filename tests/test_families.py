"""Every supported decoder family (tests/families.py) exports, trains, matches PyTorch + PEFT and adapts
all its linear projections with ``--targets all-linear``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from families import FAMILIES, make_family_model, portable_families
from helpers import reference_losses, train

from edge_peft.artifact.manifest import load_manifest
from edge_peft.errors import UserError

pytestmark = pytest.mark.slow  # builds, exports and trains models

STEPS = 5


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {family: make_family_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def family_artifacts(family_models, tmp_path_factory):
    """export(family, quantize, backend) -> artifact dir with all-linear LoRA-FA rank 4, cached."""
    from edge_peft.exporter.pipeline import ExportOptions, export_artifact

    root = tmp_path_factory.mktemp("family-artifacts")
    cache: dict = {}

    def get(family: str, quantize: str, backend: str = "ort"):
        key = (family, quantize, backend)
        if key not in cache:
            out = root / "-".join(key)
            export_artifact(family_models[family], out,
                            ExportOptions(rank=4, alpha=8, quantize=quantize, targets=["all-linear"], max_seq_len=32,
                                          seed=7, backend=backend), quiet=True)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def fp32_runs(family_artifacts, data, tmp_path_factory):
    """family -> (run dir, its losses): STEPS ORT steps on the fp32 all-linear artifact, one thread."""
    root = tmp_path_factory.mktemp("family-runs")
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            run = root / family
            cache[family] = run, train(family_artifacts(family, "none"), data["lm"], run, steps=STEPS, threads=1)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_first_losses_match_pytorch_and_peft(family, family_models, family_artifacts, fp32_runs, data, tmp_path):
    """fp32 base: the first five ORT losses equal PyTorch + the same adapters + HF AdamW to 1e-4."""
    _, ours = fp32_runs(family)
    expected = reference_losses(family_models[family], family_artifacts(family, "none"), data["lm"], STEPS,
                                tmp_path / "batches")
    np.testing.assert_allclose(ours, expected, rtol=1e-4)
    assert ours[-1] < ours[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_adapter_with_equal_logits(family, family_models, fp32_runs, tmp_path):
    import torch
    from peft import PeftModel

    from edge_peft.device.adapter_io import save_run_adapter
    from edge_peft.device.inference import Predictor
    from edge_peft.exporter.load import load_model_dir

    run, _ = fp32_runs(family)
    adapter = save_run_adapter(run, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(load_model_dir(family_models[family]).model, str(adapter)).eval()
    ids = np.array([[5, 9, 12, 7, 3, 11, 6, 8], [8, 6, 10, 14, 9, 0, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        expected = peft_model(**inputs).logits.numpy()
        with peft_model.disable_adapter():
            base = peft_model(**inputs).logits.numpy()
    assert not np.allclose(expected[mask == 1], base[mask == 1], atol=1e-3)  # the trained adapter changes the output
    ours = Predictor(run).logits(ids, mask)
    np.testing.assert_allclose(ours[mask == 1], expected[mask == 1], rtol=1e-4, atol=1e-4)


def int8_artifact(family_artifacts, family: str):
    """The int8 export of ``family``: with the portable graphs too where the portable check runs (one export)."""
    return family_artifacts(family, "int8", "both" if family in portable_families() else "ort")


# int8 quantization is the same code for every family; these three cover q/k norms, soft-capping, fused projections
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3"])
def test_int8_base_trains(family, family_artifacts, data, tmp_path):
    losses = train(int8_artifact(family_artifacts, family), data["lm"], tmp_path / "run", steps=8, threads=1)
    assert np.mean(losses[-3:]) < losses[0] - 0.1


@pytest.mark.parametrize("family", portable_families())  # EDGE_PEFT_PORTABLE_FAMILIES=all: every family
def test_portable_backend_trains_like_ort(family, family_artifacts, data, tmp_path):
    artifact = int8_artifact(family_artifacts, family)
    ort = train(artifact, data["lm"], tmp_path / "ort", steps=6, threads=1, backend="ort")
    portable = train(artifact, data["lm"], tmp_path / "portable", steps=6, threads=1, backend="portable")
    np.testing.assert_allclose(portable, ort, rtol=1e-4)
    assert portable[-1] < portable[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_adapts_every_block_projection(family, family_models, family_artifacts):
    """The export's adapted modules are exactly the linear layers inside the blocks; with --layers only theirs."""
    from torch import nn

    from edge_peft.artifact.names import layer_index
    from edge_peft.exporter.inject import resolve_targets
    from edge_peft.exporter.load import load_model_dir

    loaded = load_model_dir(family_models[family])
    block_linears = {n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear) and layer_index(n) is not None}
    adapted = {m.name for m in load_manifest(family_artifacts(family, "none")).adapter.modules}
    assert adapted == block_linears
    targets, top = resolve_targets(loaded.model, loaded.recipe, ["all-linear"], {1})
    assert set(top) == {n for n in block_linears if layer_index(n) == 1}
    assert set(targets) == {n.rsplit(".", 1)[-1] for n in block_linears}
    config = json.loads((family_models[family] / "config.json").read_text())
    assert loaded.recipe.family == {"gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])


def test_multimodal_gemma3_is_refused_in_one_line(tmp_path):
    from transformers import Gemma3Config

    from edge_peft.exporter.load import load_model_dir

    Gemma3Config().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="gemma3_text") as refused:
        load_model_dir(tmp_path)
    assert "\n" not in str(refused.value)


def test_all_linear_stands_alone():
    from edge_peft.exporter.recipes import recipe_for

    with pytest.raises(UserError, match="stands alone"):
        recipe_for("llama").resolve_targets(["all-linear", "q_proj"])


def test_int8_channel_axes_survive_an_embedding_and_a_folded_transpose():
    """Both backends quantize a weight per output channel: an embedding quantized first does not erase the
    axes given for the weights after it, and a weight stored transposed gets the other axis."""
    from onnx import TensorProto, helper, numpy_helper
    from torch import nn

    from edge_peft.exporter.graph import quantize_int8
    from edge_peft.exporter.portable import _quantization_axes

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((40, 32)).astype(np.float32), "a.embed"),
             numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "z.weight.T")]
    nodes = [helper.make_node("Gather", ["a.embed", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "z.weight.T"], ["y"]),
             helper.make_node("Transpose", ["z.weight.T"], ["zt"], perm=[1, 0])]  # read both ways, as a backward does
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])], inits))
    axes = _quantization_axes(nn.Sequential(nn.Linear(48, 32)), {"0.weight": "z.weight.T"})
    assert axes["z.weight.T"] == 1
    quantize_int8(proto, {"a.embed", "z.weight.T"}, {"z.weight.T": 1})
    scales = {i.name: list(i.dims) for i in proto.graph.initializer if i.name.endswith(".scale")}
    assert scales == {"a.embed.scale": [40], "z.weight.T.scale": [48]}


def test_int8_tied_head_reads_the_one_embedding_table():
    """A tied LM head (the embedding table read transposed) is quantized once: the head's product reads the
    dequantized table with transB, no transposed int8 copy is stored, and both readers get exactly the values a
    per-row int8 table dequantizes to."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_peft.exporter.graph import quantize_int8

    rng = np.random.default_rng(0)
    table = rng.standard_normal((96, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h"]),
             helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "embed_t"], ["logits"])]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, 96])],
        [numpy_helper.from_array(table, "embed")]), opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_int8(proto, {"embed"}) == ["embed.int8", "embed.scale"]
    stored = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert set(stored) == {"embed.int8", "embed.scale"}
    assert not any(n.op_type == "Transpose" for n in proto.graph.node)
    dequantized = stored["embed.int8"].astype(np.float32) * stored["embed.scale"][:, None]
    ids = np.array([5, 0, 95], np.int64)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"ids": ids})[0]
    np.testing.assert_allclose(logits, dequantized[ids] @ dequantized.T, rtol=1e-5, atol=1e-5)
