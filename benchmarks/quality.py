"""Adaptation quality on real material: all-MiniLM-L6-v2 on BBC News topics, edge-peft vs PyTorch + PEFT.

Every configuration uses the same model, split, rank, targets (query, value), steps, batch, data order,
head initialisation and learning-rate schedule (linear warm-up, cosine decay to 10 %), and AdamW
(eps 1e-8, no weight decay, gradient norm clipped to 1.0):

- base: the exported model with its untrained head and zero adapters;
- edge-peft LoRA-FA on an fp32 and on an int8 base, trained by the torch-free device loop;
- PyTorch eager + PEFT LoRA (A trained too) and PEFT LoRA with PEFT's LoRA-FA optimizer.

Each runs in its own process (peak RSS is that process's). Defaults take 6-10 minutes on 2 cores.
Usage: ``python benchmarks/quality.py [--json out.json] [--per-class-train 60] [--steps 120]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_rss_mb, print_table, run_worker, write_json  # noqa: E402

TARGETS = ["query", "value"]


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- workers (each in its own process) -----------------------------------------------------------

def base_worker(artifact: str, test: str, args) -> dict:
    from edge_peft.device.inference import Predictor, accuracy

    start = time.perf_counter()
    acc = accuracy(Predictor(artifact, threads=args.threads), read_rows(test))
    return {"accuracy": acc, "steps": 0, "train_s": 0.0, "wall_s": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb()}


def edge_worker(artifact: str, train: str, test: str, run: str, args) -> dict:
    """The device loop (no torch in this process), then held-out accuracy from the inference model."""
    from edge_peft.device.inference import Predictor, accuracy
    from edge_peft.device.trainer import TrainConfig, open_run

    start = time.perf_counter()
    config = TrainConfig(data=train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_fraction=0.0,
                         eval_every=0, checkpoint_every=0, seed=args.seed, threads=args.threads)
    open_run(artifact, config, run).run()
    train_s = time.perf_counter() - start
    acc = accuracy(Predictor(run, threads=args.threads), read_rows(test))
    assert "torch" not in sys.modules, "the device loop imported torch"
    return {"accuracy": acc, "steps": args.steps, "train_s": train_s, "wall_s": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb()}


def reference_worker(artifact: str, train: str, test: str, optimizer_kind: str, args) -> dict:
    """PyTorch eager + PEFT LoRA on the same batches (tokenized by the artifact's tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_lorafa_optimizer
    from tokenizers import Tokenizer

    from edge_peft.bundled import minilm_dir
    from edge_peft.device.data import Tokenized, batch_indices, read_examples, split_holdout
    from edge_peft.device.schedule import learning_rate
    from edge_peft.exporter.load import load_model_dir
    from edge_peft.artifact.manifest import load_manifest

    torch.set_num_threads(args.threads)
    manifest = load_manifest(artifact)
    tokenizer = Tokenizer.from_file(str(Path(artifact) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    start = time.perf_counter()
    model = load_model_dir(minilm_dir(), manifest.labels, init_seed=manifest.adapter.seed).model  # same head init
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                             lora_dropout=0.0, modules_to_save=["classifier"]))
    model.train()
    if optimizer_kind == "lorafa":
        optimizer = create_lorafa_optimizer(model, r=args.rank, lora_alpha=2 * args.rank, lr=args.lr)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, eps=1e-8,
                                      weight_decay=0.0)
    warmup = max(1, args.steps // 20)  # the device loop's default
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate(s, args.steps, 1.0, warmup))
    data = Tokenized(tokenizer, read_examples(train, manifest.task, manifest.labels), manifest.task,
                     manifest.max_seq_len, manifest.pad_token_id, manifest.eos_token_id)
    pool, _ = split_holdout(len(data), 0.0, args.seed)
    for step in range(args.steps):
        batch = data.batch(batch_indices(pool, args.batch_size, args.seed, step))
        logits = model(input_ids=torch.from_numpy(batch.input_ids),
                       attention_mask=torch.from_numpy(batch.attention_mask)).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch.labels))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    train_s = time.perf_counter() - start
    model.eval()
    rows = read_rows(test)
    test_data = Tokenized(tokenizer, read_examples(test, manifest.task, manifest.labels), manifest.task,
                          manifest.max_seq_len, manifest.pad_token_id, manifest.eos_token_id)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            batch = test_data.batch(list(range(i, min(i + 16, len(rows)))))
            logits = model(input_ids=torch.from_numpy(batch.input_ids),
                           attention_mask=torch.from_numpy(batch.attention_mask)).logits
            correct += int((logits.argmax(-1).numpy() == batch.labels).sum())
    return {"accuracy": correct / len(rows), "steps": args.steps, "train_s": train_s,
            "wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


# --- driver ------------------------------------------------------------------------------------------

def export(out: Path, quantize: str, args) -> None:
    """Export in a subprocess of its own (torch stays out of the measuring processes)."""
    import subprocess

    from edge_peft.bundled import BBC_LABELS, minilm_dir

    subprocess.run([sys.executable, "-m", "edge_peft.cli", "export", str(minilm_dir()), "--out", str(out),
                    "--rank", str(args.rank), "--alpha", str(2 * args.rank), "--quantize", quantize,
                    "--labels", ",".join(BBC_LABELS), "--targets", ",".join(TARGETS),
                    "--max-seq-len", str(args.seq_len), "--seed", str(args.seed)],
                   check=True, cwd=ROOT, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--per-class-train", type=int, default=60)
    parser.add_argument("--per-class-test", type=int, default=100)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *paths = args.worker
        worker = {"base": base_worker, "edge": edge_worker}.get(kind)
        result = worker(*paths, args) if worker else reference_worker(*paths, kind, args)
        print(json.dumps(result))
        return

    from edge_peft.bundled import bbc_news_split, write_jsonl

    common = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
              ("steps", "batch-size", "lr", "rank", "threads", "seed")]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train_rows, test_rows = bbc_news_split(args.per_class_train, args.per_class_test, args.seed)
        train, test = write_jsonl(tmp / "train.jsonl", train_rows), write_jsonl(tmp / "test.jsonl", test_rows)
        for quantize in ("none", "int8"):
            print(f"exporting ({quantize}) ...", file=sys.stderr, flush=True)
            export(tmp / quantize, quantize, args)
        plan = [("base (untrained head, zero adapters)", "base", ["base", tmp / "none", test]),
                ("edge-peft LoRA-FA fp32", "edge_fp32", ["edge", tmp / "none", train, test, tmp / "run-fp32"]),
                ("edge-peft LoRA-FA int8", "edge_int8", ["edge", tmp / "int8", train, test, tmp / "run-int8"]),
                ("PyTorch + PEFT LoRA", "reference", ["lora", tmp / "none", train, test]),
                ("PyTorch + PEFT LoRA-FA optimizer", "reference_lorafa", ["lorafa", tmp / "none", train, test])]
        for name, key, worker_args in plan:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows.append({"config": name, "key": key, **run_worker(Path(__file__), [str(a) for a in worker_args] + common)})
    results = {f"{r['key']}_accuracy": r["accuracy"] for r in rows}
    print(f"\nall-MiniLM-L6-v2 on BBC News: {len(train_rows)} train / {len(test_rows)} held-out articles, "
          f"{args.steps} steps x {args.batch_size}, seq {args.seq_len}, rank {args.rank} on {'/'.join(TARGETS)}, "
          f"lr {args.lr} (warm-up + cosine), {args.threads} threads\n")
    print_table(rows, [("config", "configuration"), ("accuracy", "held-out acc"), ("steps", "steps"),
                       ("train_s", "train s"), ("wall_s", "wall s"), ("peak_rss_mb", "peak RSS MB")])
    gaps = {"edge_int8_minus_fp32_points": 100 * (results["edge_int8_accuracy"] - results["edge_fp32_accuracy"]),
            "edge_fp32_minus_reference_points": 100 * (results["edge_fp32_accuracy"] - results["reference_accuracy"]),
            "edge_fp32_minus_base_points": 100 * (results["edge_fp32_accuracy"] - results["base_accuracy"])}
    print("\n" + ", ".join(f"{k} {v:+.1f}" for k, v in gaps.items()))
    print(f"total {time.perf_counter() - started:.0f} s")
    write_json(args.json, {**results, **gaps, "settings": {k: getattr(args, k) for k in (
        "per_class_train", "per_class_test", "steps", "batch_size", "seq_len", "lr", "rank", "threads", "seed")},
        "total_s": time.perf_counter() - started, "results": rows})


if __name__ == "__main__":
    main()
