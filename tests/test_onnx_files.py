"""ONNX files in an artifact under construction: the artifact's graphs keep their weights in one shared file that
ONNX Runtime loads with the same results, without the intermediate shapes it infers itself."""

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


def _two_weight_model(shared: np.ndarray, own: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """y = (x @ shared + bias) @ own: ``shared`` and ``bias`` under the same names in every model."""
    nodes = [helper.make_node("MatMul", ["x", "shared"], ["h"]), helper.make_node("Add", ["h", "bias"], ["hb"]),
             helper.make_node("MatMul", ["hb", "own"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, shared.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, own.shape[1]])],
                              [numpy_helper.from_array(shared, "shared"), numpy_helper.from_array(own, "own"),
                               numpy_helper.from_array(bias, "bias")],
                              value_info=[helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, shared.shape[1]])
                                          for v in ("h", "hb")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_file_stores_a_tensor_the_graphs_share_once(tmp_path):
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((64, 32)).astype(np.float32)  # 8 KiB: goes to the weights file
    own = {name: rng.standard_normal((32, 48)).astype(np.float32) for name in ("a.onnx", "b.onnx", "c.onnx")}
    bias = rng.standard_normal(32).astype(np.float32)  # 128 bytes: stays inside each graph
    x = rng.standard_normal((1, 64)).astype(np.float32)
    with onnx_files.WeightsFile(tmp_path) as weights:
        for name, w in own.items():
            weights.save(_two_weight_model(shared, w, bias), tmp_path / name)
    expected = {name: (x @ shared + bias) @ w for name, w in own.items()}

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "c.onnx", "weights.data"]

    def padded(array):
        return -(-array.nbytes // onnx_files.PAGE) * onnx_files.PAGE

    # each tensor once, each on a page boundary: shared, then a's, b's and c's own
    assert (tmp_path / "weights.data").stat().st_size == padded(shared) + 2 * padded(own["a.onnx"]) + own["c.onnx"].nbytes
    for name, w in own.items():
        proto = onnx.load(str(tmp_path / name), load_external_data=False)
        places = {i.name: {e.key: e.value for e in i.external_data} for i in proto.graph.initializer}
        assert places["bias"] == {} and places["shared"]["offset"] == "0"
        assert not proto.graph.value_info  # intermediate shapes dropped: ONNX Runtime infers them on load
        assert int(places["own"]["offset"]) % onnx_files.PAGE == 0
        assert (tmp_path / name).stat().st_size < bias.nbytes + 1024
        got = ort.InferenceSession(str(tmp_path / name)).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5)
        loaded = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / name)).graph.initializer}
        np.testing.assert_array_equal(loaded["own"], w)
