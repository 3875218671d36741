"""Which arithmetic a portable training step runs its frozen-base matrix products in, and how a run picks it.

``fp32``: the base is dequantized and multiplied in fp32 (every artifact carries this graph).
``int8``: uint8 x int8 products with int32 accumulation (``exporter/low_precision.py``), carried when the
export asked for ``--compute int8``. ``auto`` (train's default) takes int8 only where the CPU reports int8
dot-product instructions (VNNI, AMX, Arm's dot product): on x86 without VNNI onnxruntime's uint8 x int8 kernel
sums pairs of products in 16 bits, which saturates, so int8 is refused there; on Arm without the dot product
it is exact but gains little.
bf16 is refused: onnxruntime's CPU provider has no bf16 MatMul kernel.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .names import PORTABLE

FP32, INT8, AUTO = "fp32", "int8", "auto"
COMPUTES = (FP32, INT8)
TRAIN_CHOICES = (AUTO, *COMPUTES)
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The ISA flags the OS reports for this CPU (x86 ``flags``, Arm ``Features``); empty where it reports none."""
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def parse_export_computes(text: str, quantize: str, backends: list[str]) -> list[str]:
    """``export --compute`` (one of, or a comma list of, fp32 and int8) -> the computes the artifact carries
    (fp32 always: it is every machine's fallback); one-line errors for what cannot be built."""
    asked = [c.strip() for c in text.split(",") if c.strip()]
    if "bf16" in asked:
        raise UserError("--compute bf16 cannot run: onnxruntime's CPU provider has no bf16 MatMul kernel; "
                        "use --compute int8 (int8 products) or fp32")
    unknown = [c for c in asked if c not in COMPUTES]
    if unknown or not asked:
        raise UserError(f"--compute {text!r} is not supported: use fp32, int8 or fp32,int8")
    if INT8 in asked and quantize != "int8":
        raise UserError("--compute int8 multiplies the int8 base: export it with --quantize int8")
    if INT8 in asked and PORTABLE not in backends:
        raise UserError("--compute int8 builds the portable training graph: export with --backend portable or both")
    return [FP32, *([INT8] if INT8 in asked else [])]


def choose_compute(requested: str, carried: list[str], backend: str, flags: frozenset[str]) -> str:
    """The compute a run uses: ``requested`` unless ``auto``, which takes int8 when the artifact carries it,
    the backend is the portable one and the CPU has int8 dot-product instructions."""
    if requested == AUTO:
        fast_int8 = bool(INT8_DOT_FLAGS & flags)
        return INT8 if INT8 in carried and backend == PORTABLE and fast_int8 else FP32
    if requested not in COMPUTES:
        raise UserError(f"--compute {requested} is not supported: use {', '.join(TRAIN_CHOICES)}")
    if requested == INT8 and INT8 not in carried:
        raise UserError("this artifact carries no int8-compute graph: re-export it with --compute int8 "
                        "(and --backend portable or both)")
    if requested == INT8 and backend != PORTABLE:
        raise UserError("--compute int8 runs on the portable backend: pass --backend portable")
    if requested == INT8 and "sse2" in flags and not INT8_DOT_FLAGS & flags:
        raise UserError("--compute int8 needs VNNI or AMX on x86: without them onnxruntime's uint8 x int8 kernel "
                        "sums pairs of products in 16 bits, which saturates; use --compute fp32")
    return requested

