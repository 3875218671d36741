"""Training-step speed and memory: edge-peft (ORT training API and portable backend, fp32 and int8 bases) vs PyTorch + PEFT.

Same model (all-MiniLM-L6-v2, 22.7 M parameters), same batch, sequence length, thread count, rank and
targets; PyTorch with its default attention (SDPA) is the reference, eager attention a second row; every
configuration runs in its own process, and peak RSS is that process's high-water mark
(everything it imported included). Both edge-peft backends run from the same artifact (``--backend both``)
on the ONNX Runtime installed here. Usage: ``python benchmarks/train_step.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_description, peak_rss_mb, print_table, run_worker, write_json  # noqa: E402

LABELS = ["a", "b", "c", "d", "e"]
TARGETS = ["query", "value"]


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64)
    return ids, np.ones_like(ids), rng.integers(0, len(LABELS), size=batch, dtype=np.int64)


def edge_worker(artifact: str, args, backend_name: str = "ort") -> dict:
    """An edge-peft backend (ORT training API or portable graphs): forward+backward+AdamW per step, no torch."""
    from edge_peft.backends import open_backend
    from edge_peft.device.data import Batch
    from edge_peft.device.memory import reuse_freed_memory
    from edge_peft.artifact.manifest import load_manifest

    reuse_freed_memory()  # as `edge-peft train` does without a memory budget
    manifest = load_manifest(artifact)
    backend = open_backend(Path(artifact), manifest, threads=args.threads, choice=backend_name)
    batch = Batch(*random_batch(args.batch_size, args.seq_len, manifest.vocab_size))
    return timed(lambda: (backend.start_step(1e-3), backend.forward_backward(batch), backend.optimizer_step()), args)


def torch_worker(model_dir: str, args, attention: str) -> dict:
    """PyTorch + Hugging Face PEFT LoRA with the same rank, alpha and targets; ``attention``: sdpa (PyTorch's
    default) or eager."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(args.threads)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS),
                                                               attn_implementation=attention)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                             modules_to_save=["classifier"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids, mask, labels = (torch.from_numpy(a) for a in random_batch(args.batch_size, args.seq_len,
                                                                    model.config.vocab_size))

    def step():
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return timed(step, args)


def timed(step, args) -> dict:
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    tokens = args.steps * args.batch_size * args.seq_len
    return {"tokens_per_s": tokens / elapsed, "step_s": elapsed / args.steps, "peak_rss_mb": peak_rss_mb()}


def export(model_dir: str, out: Path, quantize: str, rank: int) -> None:
    """Export in a subprocess of its own so the parent stays small."""
    import subprocess

    subprocess.run([sys.executable, "-m", "edge_peft.cli", "export", model_dir, "--out", str(out), "--rank",
                    str(rank), "--alpha", str(2 * rank), "--quantize", quantize, "--labels", ",".join(LABELS),
                    "--targets", ",".join(TARGETS), "--max-seq-len", "512", "--backend", "both"], check=True, cwd=ROOT,
                   capture_output=True)


CONFIGS = {
    "edge-peft LoRA-FA fp32": ("edge", "none"),
    "edge-peft LoRA-FA int8": ("edge", "int8"),
    "edge-peft portable LoRA-FA fp32": ("portable", "none"),
    "edge-peft portable LoRA-FA int8": ("portable", "int8"),
    "PyTorch + PEFT LoRA (SDPA, the default)": ("torch-sdpa", None),
    "PyTorch eager + PEFT LoRA": ("torch-eager", None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--model", help="HF model dir (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, path = args.worker
        if kind.startswith("torch-"):
            result = torch_worker(path, args, kind.split("-", 1)[1])
        else:
            result = edge_worker(path, args, "ort" if kind == "edge" else kind)
        print(json.dumps(result))
        return

    from edge_peft.bundled import minilm_dir

    model_dir = args.model or str(minilm_dir())
    common = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
              ("batch-size", "seq-len", "threads", "rank", "steps", "warmup")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, quantize) in CONFIGS.items():
            path = model_dir
            if quantize is not None:
                path = str(Path(tmp) / quantize)
                if not Path(path).exists():
                    export(model_dir, Path(path), quantize, args.rank)
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows.append({"config": name, **run_worker(Path(__file__), [kind, path] + common)})
    base = next(r for r in rows if "SDPA" in r["config"])  # the configuration a PyTorch user runs
    for r in rows:
        r["speed_vs_torch"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["rss_vs_torch"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    model_name = args.model or "all-MiniLM-L6-v2 (22.7 M parameters)"
    print(f"\nCPU: {cpu_description()}")
    print(f"model {model_name}, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} threads, "
          f"rank {args.rank} on {'/'.join(TARGETS)}, {args.steps} timed steps\n")
    print_table(rows, [("config", "configuration"), ("tokens_per_s", "tokens/s"), ("peak_rss_mb", "peak RSS MB"),
                       ("speed_vs_torch", "speed x"), ("rss_vs_torch", "RSS x")])
    write_json(args.json, {"cpu": cpu_description(), "settings": {k: getattr(args, k) for k in ("batch_size", "seq_len", "threads", "rank", "steps")},
                           "model": model_dir, "results": rows})


if __name__ == "__main__":
    main()
