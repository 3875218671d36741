"""Adaptive budget allocation on real material: all-MiniLM-L6-v2 (int8) on BBC News, same split, steps and data.

Configurations (rank R = ``--rank``, each training in its own process, each over ``--seeds`` data orders):

- uniform LoRA-FA at rank R, and at rank 2R;
- adaptive allocation from 2R down to an average of R (AdaLoRA-style pruning under the cubic budget:
  it ends with the adapter parameters of uniform rank R, spread unevenly over the modules);
- nested ranks at 2R (DyLoRA), each saved adapter truncated to k = 1, 2, 4, ..., 2R without retraining;
- selected layers: rank R on the half of the blocks that ``--layers auto:N``'s gradient probe ranks best.

Seed ``s`` gives every configuration the same data order, so configurations are compared paired by seed:
the script prints the mean per-seed difference and its standard error for adaptive vs uniform at equal
final parameters, for uniform 2R vs R (how much rank matters on this task at all), and for the nested
adapter at full rank vs uniform 2R.

Columns: held-out accuracy (mean over seeds), trainable values during training, final adapter values
(the B entries and head that a push uploads; LoRA-FA's A is regenerated from its seed), the upload's
bytes (``build_push``: B only, compact channels), the training process's peak RSS and training time.
Usage: ``python benchmarks/adaptive.py [--json out.json] [--rank 4] [--steps 80] [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_rss_mb, print_table, run_worker, write_json  # noqa: E402


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def upload(run: str, rank: int | None) -> tuple[int, int]:
    """(bytes, values) of what ``edge-peft push [--rank k]`` would send for ``run``."""
    from edge_peft.adapters.peft_format import decode_adapter
    from edge_peft.store.client import build_push

    _, _, data = build_push(run, rank=rank)
    tensors, _ = decode_adapter(data)
    return len(data), int(sum(t.size for t in tensors.values()))


def worker(artifact: str, train: str, test: str, run: str, mode: str, seed: str, args) -> dict:
    from edge_peft.device.adapter_io import save_run_adapter
    from edge_peft.device.inference import Predictor, accuracy
    from edge_peft.device.trainer import TrainConfig, open_run

    options = {"adaptive": {"adaptive_rank": True, "target_rank": args.rank},
               "nested": {"nested_ranks": True}}.get(mode, {})
    start = time.perf_counter()
    config = TrainConfig(data=train, steps=args.steps, batch_size=8, lr=args.lr, eval_fraction=0.0, eval_every=0,
                         checkpoint_every=0, threads=args.threads, seed=int(seed), **options)
    trainer = open_run(artifact, config, run)
    trainable = int(sum(v.size for v in trainer.backend.trainable().values()))
    trainer.run()
    train_s, rss = time.perf_counter() - start, peak_rss_mb()
    rows = read_rows(test)
    prefixes = [2 ** i for i in range(16) if 2 ** i <= 2 * args.rank] if mode == "nested" else [None]
    results = []
    for k in prefixes:
        adapter = None if k is None else save_run_adapter(run, Path(run) / f"rank{k}", rank=k)
        nbytes, values = upload(run, k)
        results.append({"k": k, "accuracy": accuracy(Predictor(artifact if k else run, adapter), rows),
                        "trainable": trainable, "final_values": values, "upload_bytes": nbytes,
                        "peak_rss_mb": rss, "train_s": train_s})
    if mode == "adaptive":
        saved = save_run_adapter(run, Path(run) / "saved")
        pattern = json.loads((saved / "adapter_config.json").read_text())["rank_pattern"]
        results[0]["ranks"] = " ".join(map(str, sorted(pattern.values())))
    return {"results": results}


def paired(first: dict, second: dict) -> dict:
    """Mean and standard error (points) of ``first - second`` over seeds (same data order per seed)."""
    diffs = [100 * (a - b) for a, b in zip(first["accuracy_per_seed"], second["accuracy_per_seed"])]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mean_pt": statistics.fmean(diffs), "se_pt": se, "per_seed_pt": diffs}


def export(out: Path, rank: int, extra: list[str]) -> None:
    from edge_peft.bundled import BBC_LABELS, minilm_dir

    subprocess.run([sys.executable, "-m", "edge_peft.cli", "export", str(minilm_dir()), "--out", str(out), "--rank",
                    str(rank), "--alpha", str(2 * rank), "--quantize", "int8", "--labels", ",".join(BBC_LABELS),
                    "--max-seq-len", "128", *extra], check=True, cwd=ROOT, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--rank", type=int, default=4, help="R: the uniform rank and the adaptive target.")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", type=int, default=3, help="Data orders each configuration is trained with.")
    parser.add_argument("--per-class-train", type=int, default=60)
    parser.add_argument("--per-class-test", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    from edge_peft.bundled import bbc_news_split, write_jsonl

    r, r2 = args.rank, 2 * args.rank
    common = [f"--rank={r}", f"--steps={args.steps}", f"--lr={args.lr}", f"--threads={args.threads}"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        train_rows, test_rows = bbc_news_split(args.per_class_train, args.per_class_test, seed=0)
        train, test = write_jsonl(tmp / "train.jsonl", train_rows), write_jsonl(tmp / "test.jsonl", test_rows)
        print("exporting ...", file=sys.stderr, flush=True)
        export(tmp / "uniform", r, [])
        export(tmp / "double", r2, [])
        export(tmp / "layers", r, ["--layers", "auto:3", "--probe-data", str(train)])
        blocks = json.loads((tmp / "layers" / "layer_probe.json").read_text()).get("chosen")
        plan = [(f"uniform rank {r}", "uniform", "fixed"), (f"uniform rank {r2}", "double", "fixed"),
                (f"adaptive {r2} -> {r}", "double", "adaptive"), (f"nested ranks {r2}", "double", "nested"),
                (f"layers auto:3 {blocks}, rank {r}", "layers", "fixed")]
        for label, artifact, mode in plan:
            per_seed = []
            for seed in range(args.seeds):
                print(f"running {label} (seed {seed}) ...", file=sys.stderr, flush=True)
                run = tmp / f"run-{mode}-{artifact}-{seed}"
                per_seed.append(run_worker(Path(__file__), [str(tmp / artifact), str(train), str(test), str(run),
                                                            mode, str(seed)] + common)["results"])
            for variants in zip(*per_seed):
                first = variants[0]
                row = {"config": label if first["k"] is None else f"{label}, saved at k={first['k']}",
                       **{k: v for k, v in first.items() if k not in ("accuracy", "peak_rss_mb", "train_s")},
                       "accuracy": sum(v["accuracy"] for v in variants) / len(variants),
                       "accuracy_per_seed": [v["accuracy"] for v in variants],
                       "peak_rss_mb": max(v["peak_rss_mb"] for v in variants),
                       "train_s": sum(v["train_s"] for v in variants) / len(variants)}
                rows.append(row)
    by = {row["config"]: row for row in rows}
    uniform, double, adaptive = by[f"uniform rank {r}"], by[f"uniform rank {r2}"], by[f"adaptive {r2} -> {r}"]
    nested_full = by[f"nested ranks {r2}, saved at k={r2}"]
    comparisons = {f"adaptive {r2} -> {r} minus uniform rank {r}": paired(adaptive, uniform),
                   f"uniform rank {r2} minus uniform rank {r}": paired(double, uniform),
                   f"nested ranks {r2} at k={r2} minus uniform rank {r2}": paired(nested_full, double)}
    goals = {
        "adaptive_at_least_uniform": adaptive["accuracy"] >= uniform["accuracy"],
        "nested_full_within_1pt": abs(nested_full["accuracy"] - double["accuracy"]) <= 0.01,
    }
    print(f"\nall-MiniLM-L6-v2 int8 on BBC News ({len(train_rows)} train / {len(test_rows)} held-out), "
          f"{args.steps} steps x 8, lr {args.lr}, mean of {args.seeds} seed(s)\n")
    print_table(rows, [("config", "configuration"), ("accuracy", "held-out acc"), ("trainable", "trainable"),
                       ("final_values", "final values"), ("upload_bytes", "upload B"), ("peak_rss_mb", "peak MB"),
                       ("train_s", "train s"), ("ranks", "per-module ranks")])
    print()
    for name, c in comparisons.items():
        se = "" if c["se_pt"] is None else f" (standard error {c['se_pt']:.2f})"
        print(f"{name}: {c['mean_pt']:+.2f} points{se}, per seed " + " ".join(f"{d:+.1f}" for d in c["per_seed_pt"]))
    print("\ngoals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    write_json(args.json, {"settings": vars(args) | {"worker": None}, "goals": goals, "paired": comparisons,
                           "results": rows})


if __name__ == "__main__":
    main()
