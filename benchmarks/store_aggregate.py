"""Aggregating many 1B-class adapters into one global version, from a blob directory and from S3 (moto's server on
loopback), with the versions as a push records them today (each one's norms and its B-only blob: one read each) and
as versions pushed before the store recorded them (the default clipping reads each full file twice), side by side.

Usage: ``flock /tmp/edge-peft-bench.lock .venv/bin/python benchmarks/store_aggregate.py --adapters 1000 --json
benchmarks/results/store_aggregate.json`` (about 10 minutes on 2 cores; storing the adapters in S3 is most of it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description, print_table, write_json  # noqa: E402
from store_load import store_versions  # noqa: E402

from edge_peft.adapters.peft_format import encode_adapter  # noqa: E402
from edge_peft.store.backends import StoreLocation, open_store  # noqa: E402
from edge_peft.store.local_services import LocalS3  # noqa: E402
from edge_peft.store.testing import random_tensors  # noqa: E402

SIZE = "1B-qkvo-r8"


def measure(location: StoreLocation, adapters: int, recorded: bool) -> dict:
    """Store ``adapters`` versions (setup, not timed), then time one aggregation in this process."""
    store, _ = open_store(location)
    spec, setup = store_versions(store, SIZE, adapters, recorded)
    start = time.perf_counter()
    record, _, report = store.aggregate(spec.base_fingerprint)
    seconds = time.perf_counter() - start
    store.close()
    b_only = {k: v for k, v in random_tensors(spec, np.random.default_rng(1)).items() if ".lora_B." in k}
    return {"adapters": adapters, "aggregate_s": round(seconds, 2), "setup_s": round(setup, 1),
            "pushed_mib": round(len(encode_adapter(spec, b_only)) / 2**20, 2), "devices": report["devices"],
            "global_version": record.number}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = []
    s3 = LocalS3().start()
    os.environ.update(s3.env)
    try:
        for blobs in ("directory", "s3"):
            for recorded in (True, False):
                with tempfile.TemporaryDirectory(prefix="edge-peft-aggregate-") as tmp:
                    bucket = s3.new_bucket(f"agg-{len(rows)}-{os.getpid()}") if blobs == "s3" else None
                    location = StoreLocation(Path(tmp) / "store", None, bucket, s3.endpoint if bucket else None)
                    row = {"blobs": "S3 (moto)" if bucket else "directory",
                           "versions": "norms + B-only blob" if recorded else "full file only (older pushes)",
                           **measure(location, args.adapters, recorded)}
                print(row, flush=True)
                rows.append(row)
    finally:
        s3.stop()
    print(f"CPU: {cpu_description()}")
    print_table(rows, [("blobs", "blobs"), ("versions", "versions"), ("adapters", "adapters"),
                       ("aggregate_s", "aggregate s"), ("setup_s", "setup s")])
    write_json(args.json, {"benchmark": "store_aggregate", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(),
                           "size": SIZE, "rows": rows})


if __name__ == "__main__":
    main()
