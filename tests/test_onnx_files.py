"""ONNX files in an artifact under construction: a tracer's scratch (with the per-weight files a model over 2 GB
gets) leaves nothing behind, and a model past the external-data threshold is saved as ``<file>.data`` that
ONNX Runtime loads with the same result."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_peft.exporter import onnx_files


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_scratch_file_removes_what_a_tracer_wrote_beside_it(tmp_path):
    weight = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    with onnx_files.scratch_file(tmp_path) as path:
        # what torch.onnx.export writes for a model over 2 GB: one external file per weight beside the graph
        onnx.save(_matmul_model(weight), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                  size_threshold=0)
        assert len(list(path.parent.iterdir())) == 2
        proto = onnx.load(str(path))
    assert list(tmp_path.iterdir()) == []  # nothing left in the artifact folder
    np.testing.assert_array_equal(numpy_helper.to_array(proto.graph.initializer[0]), weight)


def test_save_model_moves_weights_beside_a_large_model(tmp_path, monkeypatch):
    weight = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
    x = np.ones((1, 256), np.float32)
    onnx_files.save_model(_matmul_model(weight), tmp_path / "small.onnx")
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", weight.nbytes // 2)  # this model counts as large
    onnx_files.save_model(_matmul_model(weight), tmp_path / "large.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.onnx", "large.onnx.data", "small.onnx"]
    assert (tmp_path / "large.onnx").stat().st_size < weight.nbytes == (tmp_path / "large.onnx.data").stat().st_size
    run = {name: ort.InferenceSession(str(tmp_path / name)).run(None, {"x": x})[0] for name in ("small.onnx", "large.onnx")}
    np.testing.assert_array_equal(run["small.onnx"], run["large.onnx"])
    np.testing.assert_allclose(run["large.onnx"], x @ weight, rtol=1e-4, atol=1e-5)
