"""``edge-peft demo``: the main job on the embedded default, end to end.

Real model (all-MiniLM-L6-v2) and real data (BBC News topics), both installed from PyPI:
export with an int8 base -> held-out accuracy before -> on-device training -> accuracy after ->
classify a few held-out articles -> save the PEFT adapter -> push it to a local store and pull it back.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from .bundled import BBC_LABELS, bbc_news_split, minilm_dir, write_jsonl


@dataclass
class DemoSettings:
    per_class_train: int = 40
    per_class_test: int = 40
    steps: int = 60
    batch_size: int = 8
    lr: float | None = None  # the task's default (device/defaults.py)
    max_seq_len: int = 128
    rank: int = 8
    quantize: str = "int8"
    threads: int = 0


def run_demo(workdir: Path, settings: DemoSettings, with_store: bool = True) -> dict:
    """Run every stage in ``workdir`` (replaced if present); returns the measured numbers."""
    from . import export, train
    from .device.adapter_io import save_run_adapter
    from .device.inference import Predictor, accuracy

    s = settings
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    click.echo(f"[data] BBC News: {s.per_class_train} train / {s.per_class_test} held-out articles per topic "
               f"({', '.join(BBC_LABELS)})")
    train_rows, test_rows = bbc_news_split(s.per_class_train, s.per_class_test)
    train_file = write_jsonl(workdir / "train.jsonl", train_rows)

    click.echo(f"[export] all-MiniLM-L6-v2 -> LoRA-FA rank {s.rank}, {s.quantize} base")
    artifact = workdir / "artifact"
    manifest = export(minilm_dir(), artifact, quiet=False, rank=s.rank, alpha=2.0 * s.rank, quantize=s.quantize,
                      labels=BBC_LABELS, max_seq_len=s.max_seq_len)
    before = accuracy(Predictor(artifact, threads=s.threads), test_rows)
    click.echo(f"[before] held-out accuracy {before:.1%} (untrained head, zero adapters)")

    click.echo(f"[train] {s.steps} steps x {s.batch_size} articles on the device loop (no torch)")
    run = workdir / "run"
    start = time.perf_counter()
    summary = train(artifact, train_file, run, progress=True, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                    max_seq_len=s.max_seq_len, eval_fraction=0.0, eval_every=0, checkpoint_every=20,
                    threads=s.threads)
    train_s = time.perf_counter() - start
    predictor = Predictor(run, threads=s.threads)
    after = accuracy(predictor, test_rows)
    click.echo(f"[after] held-out accuracy {after:.1%}")
    for row, (label, prob) in zip(test_rows[:3], predictor.classify([r["text"] for r in test_rows[:3]])):
        click.echo(f"    {label:<13} p={prob:.2f} (true: {row['label']:<13}) {row['text'][:60]}...")
    adapter = save_run_adapter(run, workdir / "adapter")
    click.echo(f"[adapter] PEFT adapter in {adapter}")
    result = {"base_fingerprint": manifest.fingerprint, "before_accuracy": before, "after_accuracy": after,
              "steps": summary["steps"], "train_s": round(train_s, 1), "tokens_per_s": summary["tokens_per_s"],
              "peak_rss_mb": summary["peak_rss_mb"], "adapter": str(adapter)}
    if with_store:
        result["store"] = _store_round_trip(workdir, run, s.threads)
    click.echo(f"\nbefore {before:.1%} -> after {after:.1%} held-out accuracy on {len(test_rows)} BBC articles; "
               f"{summary['tokens_per_s']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MB, "
               f"{train_s:.0f} s of training")
    return result


def _store_round_trip(workdir: Path, run: Path, threads: int) -> dict:
    """Push the run's adapter to a store server on loopback, aggregate, pull the global version back
    and check that it predicts exactly as the run's own adapter (skipped without the store extra)."""
    try:
        from .store.client import StoreClient, build_push, pull
        from .store.local_server import StoreServer
        from .store.service import AdapterStore
    except ImportError:
        click.echo("[store] skipped: install edge-peft[store] to push to a local adapter store")
        return {"skipped": True}
    from .device.inference import Predictor

    data_dir = workdir / "store"
    store, admin_token = AdapterStore.open(data_dir)
    token = store.add_device("demo-device")
    base, meta, data = build_push(run)
    store.add_base(meta["spec"])  # the admin registers the base; devices cannot
    with StoreServer(data_dir) as server:
        with StoreClient(server.url, token) as client:
            pushed = client.push(base, "demo-device", meta, data)
        with StoreClient(server.url, admin_token) as admin:
            aggregated = admin.aggregate(base, {"min_devices": 1})  # a fleet of one: its own adapter comes back
        with StoreClient(server.url, token) as client:
            pulled = pull(client, base, workdir / "pulled-global")
    same = Predictor(run, threads=threads).classify(["The striker scored twice."]) == \
        Predictor(run, workdir / "pulled-global", threads=threads).classify(["The striker scored twice."])
    click.echo(f"[store] pushed {len(data) >> 10} KiB (B only) to {server.url} as version {pushed['number']}, "
               f"aggregated global version {aggregated['number']}, pulled it back "
               f"({'predicts identically' if same else 'PREDICTIONS DIFFER'})")
    return {"pushed_bytes": len(data), "version": pushed["number"], "global_version": pulled["version"],
            "identical_predictions": same}
