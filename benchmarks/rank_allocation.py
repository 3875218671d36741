"""Adaptive budget allocation on real material: all-MiniLM-L6-v2 on BBC News, same split and budget.

- fixed rank 4 and fixed rank 8 (plain LoRA-FA),
- adaptive rank 8 -> 4 on average (AdaLoRA-style pruning; ends with the parameter count of rank 4),
- nested ranks at rank 8 (DyLoRA), evaluated truncated to k = 1, 2, 4, 8 without retraining.

Each training runs in its own process. Usage: ``python benchmarks/rank_allocation.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, print_table, run_worker, write_json  # noqa: E402


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def worker(artifact: str, train: str, test: str, run: str, mode: str, args) -> dict:
    from edge_peft.device.adapter_io import save_run_adapter
    from edge_peft.device.inference import Predictor, accuracy
    from edge_peft.device.trainer import TrainConfig, Trainer

    options = {"adaptive": {"adaptive_rank": True, "target_rank": args.target_rank},
               "nested": {"nested_ranks": True}}.get(mode, {})
    start = time.perf_counter()
    config = TrainConfig(data=train, steps=args.steps, batch_size=8, lr=args.lr, eval_fraction=0.0, eval_every=0,
                         checkpoint_every=0, threads=args.threads, **options)
    Trainer(artifact, config, run, show_progress=False).run()
    rows = read_rows(test)
    result = {"train_s": time.perf_counter() - start, "accuracy": accuracy(Predictor(run), rows)}
    adapter = save_run_adapter(run, Path(run) / "saved")
    pattern = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    result["ranks"] = sorted(pattern.values()) if pattern else None
    if mode == "nested":
        for k in (1, 2, 4):
            truncated = save_run_adapter(run, Path(run) / f"rank{k}", rank=k)
            result[f"accuracy_rank{k}"] = accuracy(Predictor(artifact, truncated), rows)
    return result


def export(out: Path, rank: int, args) -> None:
    from edge_peft.bundled import BBC_LABELS, minilm_dir

    subprocess.run([sys.executable, "-m", "edge_peft.cli", "export", str(minilm_dir()), "--out", str(out), "--rank",
                    str(rank), "--alpha", str(2 * rank), "--quantize", "int8", "--labels", ",".join(BBC_LABELS),
                    "--max-seq-len", "128"], check=True, cwd=ROOT, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--target-rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    from edge_peft.bundled import bbc_news_split, write_jsonl

    common = [f"--steps={args.steps}", f"--lr={args.lr}", f"--target-rank={args.target_rank}", f"--threads={args.threads}"]
    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        train_rows, test_rows = bbc_news_split(60, 100, seed=0)
        train, test = write_jsonl(tmp / "train.jsonl", train_rows), write_jsonl(tmp / "test.jsonl", test_rows)
        for rank in (args.target_rank, 8):
            export(tmp / f"r{rank}", rank, args)
        plan = [(f"fixed rank {args.target_rank}", f"r{args.target_rank}", "fixed"), ("fixed rank 8", "r8", "fixed"),
                (f"adaptive 8 -> {args.target_rank}", "r8", "adaptive"), ("nested ranks (8)", "r8", "nested")]
        for label, artifact, mode in plan:
            print(f"running {label} ...", file=sys.stderr, flush=True)
            result = run_worker(Path(__file__), [str(tmp / artifact), str(train), str(test),
                                                 str(tmp / f"run-{label.replace(' ', '_')}"), mode] + common)
            rows.append({"config": label, **result, "ranks": " ".join(map(str, result["ranks"] or [])) or "full"})
    print(f"\nall-MiniLM-L6-v2 int8 on BBC News (300 train / 500 held-out), {args.steps} steps x 8, lr {args.lr}\n")
    print_table(rows, [("config", "configuration"), ("accuracy", "held-out acc"), ("accuracy_rank1", "k=1"),
                       ("accuracy_rank2", "k=2"), ("accuracy_rank4", "k=4"), ("train_s", "train s"),
                       ("ranks", "saved per-module ranks")])
    write_json(args.json, {"settings": vars(args) | {"worker": None}, "results": rows})


if __name__ == "__main__":
    main()
