"""Federated personalisation on real data: all-MiniLM-L6-v2 (int8 base, LoRA-FA rank 8 on query/value, new 5-way head)
on BBC News split non-IID over 10 simulated devices (each holds two topics mostly), on Flower's simulation engine.

Rows: centralised training on the union of the devices' data (the same total steps: rounds x devices x local
steps), FedAvg with fp32 updates, with int8 updates, with int8 top-10 % deltas against the round's global, and with
client-side DP-SGD at epsilon 8 and 1 (over
all rounds, delta 1e-5, per-example clip 1.0). Per round: held-out accuracy of the global adapter (200 articles,
40 per topic) and the bytes each device sends. Every row runs in its own process.

Usage: ``flock /tmp/edge-peft-bench.lock python benchmarks/federated.py --json benchmarks/results/federated.json``
(about 17 minutes on 2 quiet cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description, peak_rss_mb, print_table, run_worker, write_json  # noqa: E402

ROWS = {"fedavg-fp32": {"encoding": "fp32"}, "fedavg-int8": {"encoding": "int8"}, "centralised": {},
        "fedavg-dp-eps8": {"encoding": "fp32", "dp_epsilon": 8.0, "max_grad_norm": 1.0},
        "fedavg-dp-eps1": {"encoding": "fp32", "dp_epsilon": 1.0, "max_grad_norm": 1.0},
        "fedavg-int8-topk10": {"encoding": "int8-topk", "topk": 0.1}}  # in this order: the JSON is written after each


def non_iid(rows: list[dict], labels: list[str], devices: int, minor_each: int) -> list[list[dict]]:
    """Device i holds topics i and i+1 (mod topics) mostly, and ``minor_each`` articles of every other topic."""
    pools = {label: [r for r in rows if r["label"] == label] for label in labels}
    topics = len(labels)
    main_share = {label: 0 for label in labels}
    for i in range(devices):
        for t in (i % topics, (i + 1) % topics):
            main_share[labels[t]] += 1
    minor_total = {label: (devices - main_share[label]) * minor_each for label in labels}
    main_each = {label: (len(pools[label]) - minor_total[label]) // main_share[label] for label in labels}
    taken = {label: 0 for label in labels}
    out = []
    for i in range(devices):
        mine = []
        for t, label in enumerate(labels):
            n = main_each[label] if t in (i % topics, (i + 1) % topics) else minor_each
            mine += pools[label][taken[label]: taken[label] + n]
            taken[label] += n
        out.append(mine)
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- workers (each in its own process) -----------------------------------------------------------

def federated_worker(args) -> dict:
    from edge_peft.federated.settings import FederatedSettings
    from edge_peft.federated.simulation import simulate

    row = ROWS[args.row]
    settings = FederatedSettings(artifact=args.artifact, data_dir=args.data_dir, rounds=args.rounds,
                                 local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                                 max_seq_len=args.max_seq_len, threads=1, out=args.out, eval_data=args.test,
                                 min_clients=args.devices, **row)
    start = time.perf_counter()
    history = simulate(settings, clients=args.devices, parallel=2)
    return {"history": history, "wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def central_worker(args) -> dict:
    """The device loop on the union of the devices' data, scored after each round's worth of steps."""
    from edge_peft.adapters.peft_format import complete_tensors, save_adapter
    from edge_peft.artifact.names import peft_key
    from edge_peft.device.inference import Predictor, accuracy
    from edge_peft.device.loop import Callback
    from edge_peft.device.trainer import TrainConfig, open_run

    test = [json.loads(line) for line in Path(args.test).read_text().splitlines()]
    per_round = args.devices * args.local_steps
    config = TrainConfig(data=args.union, steps=args.rounds * per_round, batch_size=args.batch_size, lr=args.lr,
                         max_seq_len=args.max_seq_len, eval_fraction=0.0, eval_every=0, checkpoint_every=0,
                         threads=2)
    run = open_run(args.artifact, config, Path(args.out) / "run")
    history = []

    def score(round_: int) -> None:
        adapter = Path(args.out) / f"round-{round_}"
        tensors = {peft_key(n): v for n, v in run.backend.trainable().items()}
        save_adapter(adapter, run.manifest.adapter, complete_tensors(run.manifest.adapter, tensors))
        history.append({"round": round_, "accuracy": accuracy(Predictor(args.artifact, adapter, threads=2), test)})

    class EveryRound(Callback):
        def on_step_end(self, step: int, record: dict) -> None:
            if (step + 1) % per_round == 0:
                score((step + 1) // per_round)

    score(0)
    start = time.perf_counter()
    run.run(callbacks=[EveryRound()])
    return {"history": history, "wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def step_cost_worker(args) -> dict:
    """Seconds per optimizer step of the plain loop and of DP-SGD (micro-batches of one), same batches."""
    from edge_peft.device.loop import train_step
    from edge_peft.device.privacy import dp_step
    from edge_peft.device.trainer import TrainConfig, open_run

    config = TrainConfig(data=args.union, steps=args.local_steps, batch_size=args.batch_size, lr=args.lr,
                         max_seq_len=args.max_seq_len, eval_fraction=0.0, eval_every=0, threads=2)
    out = {}
    for name, step in (("plain", train_step), ("dp", dp_step(1.0, 1.0))):
        run = open_run(args.artifact, config, Path(args.out) / name)
        step(run.backend, run.hooks, run.micro_batches(0), args.lr, 0)  # warm-up
        start = time.perf_counter()
        for n in range(1, args.local_steps + 1):
            step(run.backend, run.hooks, run.micro_batches(n), args.lr, n)
        out[f"{name}_s_per_step"] = (time.perf_counter() - start) / args.local_steps
    return out


# --- driver --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run ('': the step cost only)")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-seq-len", type=int, default=64, help="tokens per article (64: the run fits in 20 min)")
    parser.add_argument("--per-class-train", type=int, default=60)
    parser.add_argument("--per-class-test", type=int, default=40)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows --json already holds (same setup) and run only the others")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("row", "artifact", "data-dir", "union", "test", "out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {"centralised": central_worker, "step-cost": step_cost_worker}.get(args.row, federated_worker)
        print(json.dumps(worker(args)))
        return

    from edge_peft import export
    from edge_peft.bundled import BBC_LABELS, bbc_news_split, minilm_dir

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="edge-peft-federated-"))
    train_rows, test_rows = bbc_news_split(args.per_class_train, args.per_class_test)
    shards = non_iid(train_rows, BBC_LABELS, args.devices, minor_each=2)
    (work / "clients").mkdir()
    for i, shard in enumerate(shards):
        write_rows(work / "clients" / f"client-{i}.jsonl", shard)
    union = write_rows(work / "union.jsonl", [r for shard in shards for r in shard])
    test = write_rows(work / "test.jsonl", test_rows)
    artifact = work / "artifact"
    export(minilm_dir(), artifact, quiet=True, rank=8, alpha=16.0, quantize="int8", labels=BBC_LABELS,
           max_seq_len=args.max_seq_len)
    common = ["--artifact", str(artifact), "--data-dir", str(work / "clients"), "--union", str(union),
              "--test", str(test), "--devices", str(args.devices), "--rounds", str(args.rounds),
              "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--max-seq-len", str(args.max_seq_len)]
    results = []
    record = {
        "benchmark": "federated", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(),
        "setup": {"model": "all-MiniLM-L6-v2 int8, LoRA-FA rank 8 (query, value), 5-way head",
                  "data": f"BBC News, {len(train_rows)} training articles over {args.devices} devices (two topics "
                          f"each mostly, 2 of every other), {len(test_rows)} held out",
                  "devices": args.devices, "rounds": args.rounds, "local_steps": args.local_steps,
                  "batch_size": args.batch_size, "lr": args.lr, "max_seq_len": args.max_seq_len,
                  "device_sizes": [len(s) for s in shards], "dp": {"clip": 1.0, "delta": 1e-5}},
        "rows": results}
    earlier = json.loads(Path(args.json).read_text()) if args.resume and args.json and Path(args.json).is_file() else None
    if earlier is not None:
        if earlier["setup"] != record["setup"]:
            raise SystemExit(f"{args.json} was measured with another setup: run without --resume")
        results += earlier["rows"]
    for name in [r for r in args.rows.split(",") if r and r not in {row["row"] for row in results}]:
        print(f"[{name}] ...", flush=True)
        result = run_worker(Path(__file__), ["--row", name, "--out", str(work / name), *common], timeout=1800)
        history = result["history"]
        last = history[-1]
        results.append({"row": name, "accuracy_per_round": [round(h["accuracy"], 4) for h in history],
                        "final_accuracy": last["accuracy"], "bytes_up_per_client_round": last.get("bytes-up"),
                        "epsilon": last.get("epsilon"), "wall_s": round(result["wall_s"], 1),
                        "peak_rss_mb": round(result["peak_rss_mb"], 1),
                        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        print(json.dumps(results[-1]), flush=True)
        write_json(args.json, {**record, "complete": False})  # what is measured so far survives an interruption
    cost = run_worker(Path(__file__), ["--row", "step-cost", "--out", str(work / "step-cost"), *common])
    print(f"DP-SGD step {cost['dp_s_per_step']:.3f} s vs plain {cost['plain_s_per_step']:.3f} s "
          f"({cost['dp_s_per_step'] / cost['plain_s_per_step']:.2f}x)", flush=True)
    print_table(results, [("row", "row"), ("final_accuracy", "accuracy"), ("bytes_up_per_client_round", "bytes up"),
                          ("epsilon", "epsilon"), ("wall_s", "wall s")])
    write_json(args.json, {**record, "step_cost": cost, "complete": True,
                           "total_s": round(time.perf_counter() - began, 1)})


if __name__ == "__main__":
    main()
