"""Frozen-base products in int8 (``--compute int8``): the choice per CPU, and the int8 graph training."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import cli, losses, train

from edge_peft.artifact.files import PORTABLE_INT8_STEP_MODEL
from edge_peft.backends.compute import choose_compute, cpu_flags, parse_export_computes
from edge_peft.errors import UserError

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
VNNI = AVX2 | {"avx512f", "avx512_vnni"}


def test_auto_takes_int8_only_with_int8_dot_products_on_the_portable_backend():
    both = ["fp32", "int8"]
    assert choose_compute("auto", both, "portable", VNNI) == "int8"
    assert choose_compute("auto", both, "portable", frozenset({"asimd", "asimddp"})) == "int8"  # Arm dot product
    assert choose_compute("auto", both, "portable", AVX2) == "fp32"  # no VNNI/AMX: int8 is no faster
    assert choose_compute("auto", both, "portable", frozenset()) == "fp32"  # nothing reported: never guess
    assert choose_compute("auto", both, "ort", VNNI) == "fp32"
    assert choose_compute("auto", ["fp32"], "portable", VNNI) == "fp32"
    assert choose_compute("int8", both, "portable", AVX2) == "int8"  # asked for: honoured


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
def test_int8_products_train_like_fp32_and_auto_follows_the_cpu(artifacts, data, tmp_path):
    artifact = artifacts("llama", backend="portable", compute="int8")
    graph = onnx.load(str(artifact / PORTABLE_INT8_STEP_MODEL))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulInteger") >= 8 and "DequantizeLinear" not in ops  # no fp32 copy of the base

    fp32 = train(artifact, data["lm"], tmp_path / "fp32", steps=20, backend="portable", compute="fp32")
    int8 = train(artifact, data["lm"], tmp_path / "int8", steps=20, backend="portable", compute="int8")
    assert int8[-1] < int8[0] * 0.9, int8  # it learns
    np.testing.assert_allclose(int8, fp32, rtol=0.01)  # the bound: first 20 losses within 1 %

    auto = tmp_path / "auto"
    proc = cli("train", artifact, "--data", data["lm"], "--out", auto, "--steps", "2", "--batch-size", "4",
               "--backend", "portable", "--quiet")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    expected = choose_compute("auto", ["fp32", "int8"], "portable", cpu_flags())
    assert json.loads((auto / "run.json").read_text())["compute"] == expected
    assert len(losses(auto)) == 2
