"""The sweep behind `edge-peft train`'s per-task defaults (learning rate, sequence length, steps).

Two tasks, each configuration in its own process, same data order and seed:

- classifier: all-MiniLM-L6-v2 (int8 base, LoRA-FA rank 8 on query/value) on BBC News topics, the demo's
  split (40 train / 40 held-out articles per topic), batch 8: held-out accuracy after training over a
  grid of learning rate x sequence length, and the number of steps at the chosen pair;
- causal LM: SmolLM2-135M-Instruct (int8 base, LoRA-FA rank 8 on q/v of the top 4 blocks) on BBC News
  prose (200 train / 50 held-out articles as ``{"text"}``), batch 4: held-out loss on the whole held-out
  file over a grid of learning rates and sequence lengths.

Usage: ``python benchmarks/default_sweep.py [--json results/default_sweep.json] [--only classifier|causal-lm]``.
The full sweep takes about 40 minutes on a quiet 2-core machine; ``--work DIR`` keeps what was measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description, print_table, run_worker, write_json  # noqa: E402

CLASSIFIER_LRS = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2)  # at sequence length 128 and 60 steps; then, at the best lr,
CLASSIFIER_STEPS = (30, 120)                      # other step counts and sequence length 256
LM_LRS = (2e-3, 1e-2, 2e-2)  # at sequence length 128 and 60 steps
LM_STEPS = 60


def worker(args) -> dict:
    """Train one configuration with the device loop, then score it on the whole held-out file."""
    from edge_peft.device.evaluate import evaluate_file
    from edge_peft.device.inference import Predictor
    from edge_peft.device.memory import MB, peak_rss
    from edge_peft.device.trainer import TrainConfig, open_run

    start = time.perf_counter()
    config = TrainConfig(data=args.train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         max_seq_len=args.seq, eval_fraction=0.0, eval_every=0, checkpoint_every=0, threads=0)
    summary = open_run(args.artifact, config, args.run).run()
    scores = evaluate_file(Predictor(args.run), args.test)
    return {**{k: v for k, v in scores.items() if k != "classes"}, "tokens_per_s": summary["tokens_per_s"],
            "peak_rss_mb": round(peak_rss() / MB, 1), "wall_s": round(time.perf_counter() - start, 1)}


def base_worker(args) -> dict:
    from edge_peft.device.evaluate import evaluate_file
    from edge_peft.device.inference import Predictor

    predictor = Predictor(args.artifact)
    predictor.max_seq_len = args.seq
    scores = evaluate_file(predictor, args.test)
    return {k: v for k, v in scores.items() if k != "classes"}


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def classifier_sweep(work: Path) -> list[dict]:
    from edge_peft import export
    from edge_peft.bundled import BBC_LABELS, bbc_news_split, minilm_dir

    train_rows, test_rows = bbc_news_split(40, 40)
    train, test = write_rows(work / "cls_train.jsonl", train_rows), write_rows(work / "cls_test.jsonl", test_rows)
    artifact = work / "minilm"
    if not (artifact / "manifest.json").is_file():
        export(minilm_dir(), artifact, rank=8, alpha=16.0, quantize="int8", labels=BBC_LABELS, max_seq_len=256)
    rows = [_row("classifier", work, artifact, None, test, None, 128, 0, 8)]
    rows += [_row("classifier", work, artifact, train, test, lr, 128, 60, 8) for lr in CLASSIFIER_LRS]
    best = max(rows[1:], key=lambda r: r["accuracy"])["lr"]
    rows += [_row("classifier", work, artifact, train, test, best, 128, steps, 8) for steps in CLASSIFIER_STEPS]
    rows.append(_row("classifier", work, artifact, train, test, best, 256, 60, 8))
    return rows


def lm_sweep(work: Path) -> list[dict]:
    from edge_peft import export
    from edge_peft.bundled import bbc_news_split, smollm2_dir

    train_rows, test_rows = bbc_news_split(40, 10)
    train = write_rows(work / "lm_train.jsonl", [{"text": r["text"]} for r in train_rows])
    test = write_rows(work / "lm_test.jsonl", [{"text": r["text"]} for r in test_rows])
    artifact = work / "smollm2"
    if not (artifact / "manifest.json").is_file():
        export(smollm2_dir(), artifact, rank=8, alpha=16.0, quantize="int8", layers="top:4", max_seq_len=256)
    rows = [_row("causal-lm", work, artifact, None, test, None, 128, 0, 4)]
    rows += [_row("causal-lm", work, artifact, train, test, lr, 128, LM_STEPS, 4) for lr in LM_LRS]
    return rows


def _row(task: str, work: Path, artifact: Path, train: str | None, test: str, lr: float | None, seq: int, steps: int,
         batch: int) -> dict:
    """One configuration's row (``train`` None: the base), reused from ``work/rows.jsonl`` when already measured."""
    key = {"task": task, "lr": lr, "seq": seq, "steps": steps}
    done = work / "rows.jsonl"
    for line in done.read_text().splitlines() if done.is_file() else []:
        if {k: json.loads(line)[k] for k in key} == key:
            return json.loads(line)
    if train is None:
        result = _run(["--base", "--artifact", str(artifact), "--test", test, "--seq", str(seq)])
    else:
        result = _run(["--artifact", str(artifact), "--train", train, "--test", test, "--lr", str(lr), "--seq", str(seq),
                       "--steps", str(steps), "--batch-size", str(batch), "--run", str(work / f"run-{task}-{lr}-{seq}-{steps}")])
    row = {**key, **result}
    with done.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def _run(args: list[str]) -> dict:
    return run_worker(Path(__file__), args, timeout=3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--only", choices=["classifier", "causal-lm"])
    parser.add_argument("--work", help="Keep exports and measured rows here (a rerun skips what is done).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", action="store_true", help=argparse.SUPPRESS)
    for name in ("--artifact", "--train", "--test", "--run"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(base_worker(args) if args.base else worker(args)))
        return
    cpu = cpu_description()
    print(f"CPU: {cpu}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "classifier"):
            rows += classifier_sweep(work)
        if args.only in (None, "causal-lm"):
            rows += lm_sweep(work)
    print_table(rows, [("task", "task"), ("lr", "lr"), ("seq", "seq len"), ("steps", "steps"),
                       ("accuracy", "accuracy"), ("loss", "held-out loss"), ("tokens_per_s", "tokens/s"),
                       ("peak_rss_mb", "peak MB"), ("wall_s", "wall s")])
    write_json(args.json, {"cpu": cpu, "rows": rows})


if __name__ == "__main__":
    main()
