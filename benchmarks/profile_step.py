"""Where a training step's time goes: ONNX Runtime's profiler on an artifact's training session.

Runs ``--steps`` forward+backward+AdamW steps of a random batch on the chosen backend with ORT's profiler
on, then sums the kernel time by operator type and by part of the model (attention, MLP, LM head and
loss, dequantization of the frozen base, adapters, optimizer, gradient nodes of the backward), and prints
the top nodes. Usage:
``python benchmarks/profile_step.py ARTIFACT [--backend ort|portable] [--batch-size 4] [--seq-len 256]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description, print_table, write_json  # noqa: E402

PARTS = [  # (part, substrings of a node name or op type), first match wins
    ("dequantize", ("DequantizeLinear",)),
    ("optimizer", ("AdamW", "adamw", "optimizer", "Optimizer")),
    ("LM head + loss", ("lm_head", "loss", "Loss", "SoftmaxCrossEntropy", "chunk")),
    ("adapters", ("lora_",)),
    ("attention", ("self_attn", "attention", "attn")),
    ("MLP", ("mlp", "intermediate", "output.dense", "c_fc", "c_proj")),
    ("embeddings", ("embed", "wte", "wpe")),
]


def part_of(name: str, op: str) -> str:
    for part, keys in PARTS:
        if any(k in name or k in op for k in keys):
            return part
    return "other"


def summarise(trace: list[dict]) -> dict:
    """Kernel time (ms) by operator type and by model part, the backward's share, and the top nodes."""
    by_op, by_part, by_node = defaultdict(float), defaultdict(float), defaultdict(float)
    backward = total = 0.0
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        ms = event["dur"] / 1000
        node = event["name"][: -len("_kernel_time")]
        op = event.get("args", {}).get("op_name", "?")
        total += ms
        by_op[op] += ms
        by_part[part_of(node, op)] += ms
        by_node[f"{node} ({op})"] += ms
        if "Grad" in node or "grad" in node or "Grad" in op:
            backward += ms
    top = sorted(by_node.items(), key=lambda kv: -kv[1])[:15]
    return {"total_ms": total, "backward_ms": backward, "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "by_part": dict(sorted(by_part.items(), key=lambda kv: -kv[1])), "top_nodes": dict(top)}


def profile(artifact: Path, backend_name: str, batch: int, seq: int, steps: int, threads: int) -> list[dict]:
    """Run the steps with profiling on; the profiler's trace events."""
    import numpy as np

    from edge_peft.artifact.manifest import load_manifest
    from edge_peft.backends import open_backend, runtime
    from edge_peft.backends import ort as ort_backend
    from edge_peft.backends import portable as portable_backend
    from edge_peft.device.data import Batch

    prefix = Path(tempfile.mkdtemp()) / "profile"
    plain = runtime.session_options

    def profiled(threads: int = 0):
        options = plain(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(prefix)
        return options

    for module in (runtime, ort_backend, portable_backend):
        module.session_options = profiled
    manifest = load_manifest(artifact)
    backend = open_backend(artifact, manifest, threads=threads, choice=backend_name)
    rng = np.random.default_rng(0)
    ids = rng.integers(min(100, manifest.vocab_size - 1), manifest.vocab_size, size=(batch, seq), dtype=np.int64)
    labels = ids if manifest.task == "causal-lm" else rng.integers(0, len(manifest.labels), size=batch)
    data = Batch(ids, np.ones_like(ids), labels)
    start = time.perf_counter()
    for _ in range(steps):
        backend.start_step(1e-3)
        backend.forward_backward(data, 1.0)
        backend.optimizer_step()
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    del backend  # sessions write their trace when they end
    import gc

    gc.collect()
    events = []
    for path in prefix.parent.glob("profile*.json"):
        events += json.loads(path.read_text())
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--backend", default="ort", choices=["ort", "portable"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    cpu = cpu_description()
    print(f"CPU: {cpu}")
    summary = summarise(profile(args.artifact, args.backend, args.batch_size, args.seq_len, args.steps, args.threads))
    total = summary["total_ms"] or 1.0
    print(f"\nkernel time {total:.0f} ms over {args.steps} steps; backward (gradient nodes) "
          f"{100 * summary['backward_ms'] / total:.0f} %\n")
    print_table([{"part": k, "ms": v, "share": f"{100 * v / total:.1f} %"} for k, v in summary["by_part"].items()],
                [("part", "model part"), ("ms", "ms"), ("share", "share")])
    print()
    print_table([{"op": k, "ms": v, "share": f"{100 * v / total:.1f} %"} for k, v in list(summary["by_op"].items())[:12]],
                [("op", "operator"), ("ms", "ms"), ("share", "share")])
    write_json(args.json, {"cpu": cpu, "settings": {k: str(v) for k, v in vars(args).items() if k != "json"},
                           **summary})


if __name__ == "__main__":
    main()
