"""Shared plumbing for the benchmarks: run a worker in its own process, print a table, write JSON."""

from __future__ import annotations

import json
import os
import platform
import ssl
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One TLS context for every benchmark client: httpx builds one per Client otherwise (loading the CA bundle costs
# about 37 ms of CPU each), which 50 client threads starting at once take from the store they measure.
CLIENT_TLS = ssl.create_default_context()


def peak_rss_mb() -> float:
    """This process's peak RSS in MB (VmHWM on Linux: see ``edge_peft.device.memory.peak_rss``)."""
    from edge_peft.device.memory import MB, peak_rss

    return peak_rss() / MB


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """CPU model, logical cores and the ISA flags that decide which kernels win (AVX-512, VNNI, AMX)."""
    model, flags = platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    have = [f for f in ISA_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} logical cores, ISA: {' '.join(have) or 'none of ' + ' '.join(ISA_FLAGS)}"


def run_worker(script: Path, args: list[str], timeout: int = 1800) -> dict:
    """Run ``script --worker ...`` in a fresh interpreter; its last stdout line is a JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_threads(threads: list) -> float:
    """Start every thread, wait for all; the wall-clock seconds they took together."""
    import time

    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print ``rows`` as an aligned table; ``columns`` = [(key, header)]."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float)) for r in rows) for k, _ in columns]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) if n and num else c.ljust(w) for c, w, num in zip(line, widths, numeric)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def write_smollm2_hf_dir(out: Path) -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF as a plain fp32 safetensors model folder (for PyTorch, MLX-LM and
    exports that should not pay for GGUF dequantization each time); built once."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_peft.bundled import smollm2_dir

    folder = smollm2_dir()
    gguf = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
    return out
