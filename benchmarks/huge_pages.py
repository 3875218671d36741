"""Budgeted runs with malloc's huge pages on (the default where they apply) vs off: tokens/s and peak, side by side.

A budgeted run maps every activation-sized block on its own (``memory.predictable_memory``), so each step
page-faults its activations in afresh; ``edge-peft train --memory-budget`` therefore restarts itself with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``memory.huge_pages_env``), which backs those blocks with 2 MiB
pages. "off" runs the same command with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``, which the trainer
respects. On and off alternate (on, off, on, off, ...) so that each pair shares the machine's load, and each
pair's ratio is reported; MiniLM int8 (ORT training API) on BBC News text, batch 16, each run its own process.
Usage: ``python benchmarks/huge_pages.py [--json out.json] [--repeats 2] [--steps 6]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402
from memory_budget import export, train  # noqa: E402

SETTINGS = {"256MB": ["--memory-budget", "256MB"], "512MB": ["--memory-budget", "512MB"],
            "2048MB": ["--memory-budget", "2048MB"],
            "8 x 256": ["--memory-budget", "4GB", "--micro-batch-size", "8", "--max-seq-len", "256"]}
OFF = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--repeats", type=int, default=2, help="on/off pairs per setting")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from edge_peft.bundled import bbc_news_split, write_jsonl

    rows = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = write_jsonl(tmp / "train.jsonl", bbc_news_split(20, 0)[0])
        artifact = export(tmp / "minilm-int8", "lora-fa")
        for setting, extra in SETTINGS.items():
            pairs = []
            for n in range(args.repeats):
                on, off = (train(artifact, data, tmp / f"run-{setting}-{n}-{mode}", extra, args.steps, env)
                           for mode, env in (("on", None), ("off", OFF)))
                if not on["huge_pages"] or off["huge_pages"]:
                    raise SystemExit("huge pages do not apply on this machine (memory.huge_pages_env): "
                                     "nothing to compare")
                pairs.append((on, off))
                print(f"{setting} pair {n}: {on['tokens_per_s']:.0f} vs {off['tokens_per_s']:.0f} tokens/s, "
                      f"peak {on['peak_rss_mb']:.0f} vs {off['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            speed = [on["tokens_per_s"] / off["tokens_per_s"] for on, off in pairs]
            peak = [on["peak_rss_mb"] / off["peak_rss_mb"] for on, off in pairs]
            rows.append({"setting": setting,
                         "tokens_per_s_on": round(statistics.fmean(on["tokens_per_s"] for on, _ in pairs), 1),
                         "tokens_per_s_off": round(statistics.fmean(off["tokens_per_s"] for _, off in pairs), 1),
                         "speed_x": round(statistics.fmean(speed), 3), "speed_x_per_pair": [round(x, 3) for x in speed],
                         "peak_mb_on": max(on["peak_rss_mb"] for on, _ in pairs),
                         "peak_mb_off": max(off["peak_rss_mb"] for _, off in pairs),
                         "peak_x": round(statistics.fmean(peak), 3)})
    print(f"\nMiniLM int8, ORT training API, batch 16, {args.steps} steps, {args.repeats} on/off pair(s) per setting\n")
    print_table(rows, [("setting", "budget / setting"), ("tokens_per_s_on", "tok/s on"),
                       ("tokens_per_s_off", "tok/s off"), ("speed_x", "speed x"), ("peak_mb_on", "peak MB on"),
                       ("peak_mb_off", "peak MB off"), ("peak_x", "peak x")])
    write_json(args.json, {"settings": {"steps": args.steps, "repeats": args.repeats}, "rows": rows,
                           "note": "2 shared cores: each ratio is of two adjacent runs"})


if __name__ == "__main__":
    main()
