"""Frozen-base products in int8 (``--compute int8``): the choice per CPU, and the int8 graph training."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import cli, losses

from edge_peft.artifact.files import PORTABLE_INT8_STEP_MODEL
from edge_peft.backends.compute import choose_compute, cpu_flags, parse_export_computes
from edge_peft.errors import UserError

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
VNNI = AVX2 | {"avx512f", "avx512_vnni"}


def test_auto_takes_int8_only_with_int8_dot_products_on_the_portable_backend():
    both = ["fp32", "int8"]
    assert choose_compute("auto", both, "portable", VNNI) == "int8"
    assert choose_compute("auto", both, "portable", frozenset({"asimd", "asimddp"})) == "int8"  # Arm dot product
    assert choose_compute("auto", both, "portable", AVX2) == "fp32"  # no VNNI/AMX: the int8 kernel saturates
    assert choose_compute("auto", both, "portable", frozenset()) == "fp32"  # nothing reported: never guess
    assert choose_compute("auto", both, "ort", VNNI) == "fp32"
    assert choose_compute("auto", ["fp32"], "portable", VNNI) == "fp32"
    assert choose_compute("int8", both, "portable", frozenset({"asimd"})) == "int8"  # asked for on Arm: exact


@pytest.mark.parametrize("requested, carried, backend, needle", [
    ("int8", ["fp32"], "portable", "re-export it with --compute int8"),
    ("int8", ["fp32", "int8"], "ort", "--backend portable"),
    ("bf16", ["fp32"], "portable", "not supported"),
])
def test_an_impossible_compute_is_refused_in_one_line(requested, carried, backend, needle):
    with pytest.raises(UserError, match=needle):
        choose_compute(requested, carried, backend, VNNI)


def test_export_computes():
    assert parse_export_computes("fp32", "int8", ["ort"]) == ["fp32"]
    assert parse_export_computes("int8", "int8", ["portable"]) == ["fp32", "int8"]  # fp32 stays: the fallback
    assert parse_export_computes("fp32,int8", "int8", ["ort", "portable"]) == ["fp32", "int8"]
    for text, quantize, backends, needle in [("bf16", "int8", ["portable"], "no bf16 MatMul"),
                                             ("int8", "none", ["portable"], "--quantize int8"),
                                             ("int8", "int8", ["ort"], "--backend portable"),
                                             ("int4", "int8", ["portable"], "not supported")]:
        with pytest.raises(UserError, match=needle):
            parse_export_computes(text, quantize, backends)


def test_cpu_flags_read_x86_and_arm_cpuinfo(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse avx2 avx512_vnni amx_int8\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert {"avx512_vnni", "amx_int8"} <= cpu_flags(x86)
    assert "asimddp" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.slow
def test_int8_products_compute_the_fp32_loss_within_one_percent(artifacts):
    """The rewritten graph's arithmetic, checked exactly: onnx's reference evaluator multiplies the integers in
    numpy (no 16-bit pair sums, whatever this CPU has) against the fp32-product graph on onnxruntime."""
    from onnx.reference import ReferenceEvaluator

    from edge_peft.artifact.manifest import load_manifest
    from edge_peft.backends.portable import PortableBackend
    from edge_peft.device.data import Batch

    artifact = artifacts("llama", backend="portable", compute="int8")
    graph = onnx.load(str(artifact / PORTABLE_INT8_STEP_MODEL))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulInteger") >= 8 and "DequantizeLinear" not in ops  # no fp32 copy of the base
    manifest = load_manifest(artifact)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, manifest.vocab_size, size=(4, 24), dtype=np.int64)
    labels = np.concatenate([ids[:, 1:], np.full((4, 1), -100, np.int64)], axis=1)
    batch = Batch(ids, np.ones_like(ids), labels)
    fp32 = PortableBackend(artifact, manifest, compute="fp32")
    int8 = PortableBackend(artifact, manifest, compute="int8")
    int8._session = ReferenceEvaluator(graph)  # same run(outputs, feeds) call
    for step in range(3):  # three updates: the gradients (dY W^T in int8 too) must agree as well
        expected, found = fp32.eval_loss(batch), int8.eval_loss(batch)
        assert found == pytest.approx(expected, rel=0.01), (step, found, expected)
        for backend in (fp32, int8):
            backend.start_step(1e-2)
            backend.forward_backward(batch)
            backend.optimizer_step()
    assert fp32.eval_loss(batch) < expected  # and the updates lowered the loss


@pytest.mark.slow
def test_train_takes_int8_products_only_where_the_cpu_multiplies_them_fast(artifacts, data, tmp_path):
    artifact = artifacts("llama", backend="portable", compute="int8")
    flags = cpu_flags()
    auto = tmp_path / "auto"
    proc = cli("train", artifact, "--data", data["lm"], "--out", auto, "--steps", "2", "--batch-size", "4",
               "--backend", "portable", "--quiet")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    expected = choose_compute("auto", ["fp32", "int8"], "portable", flags)
    assert json.loads((auto / "run.json").read_text())["compute"] == expected
    assert len(losses(auto)) == 2

    forced = tmp_path / "forced"
    proc = cli("train", artifact, "--data", data["lm"], "--out", forced, "--steps", "4", "--batch-size", "4",
               "--backend", "portable", "--compute", "int8", "--quiet")
    _, err = proc.communicate(timeout=300)
    if "sse2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        assert proc.returncode == 2 and "needs VNNI or AMX" in err and len(err.strip().splitlines()) == 1
    else:
        assert proc.returncode == 0, err
        assert json.loads((forced / "run.json").read_text())["compute"] == "int8"
        assert losses(forced)[-1] < losses(forced)[0]
