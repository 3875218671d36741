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
from store_load import SIZES  # noqa: E402

from edge_peft.adapters.peft_format import encode_adapter  # noqa: E402
from edge_peft.artifact.names import lora_key  # noqa: E402
from edge_peft.store.aggregate import version_norms  # noqa: E402
from edge_peft.store.backends import StoreLocation, open_store  # noqa: E402
from edge_peft.store.local_services import LocalS3  # noqa: E402
from edge_peft.store.service import content_digest, utc_now  # noqa: E402
from edge_peft.store.storage import NewVersion  # noqa: E402
from edge_peft.store.testing import make_manifest, random_tensors  # noqa: E402

SIZE = "1B-qkvo-r8"


def measure(location: StoreLocation, adapters: int, recorded: bool) -> dict:
    """Store ``adapters`` versions (setup, not timed), then time one aggregation in this process."""
    store, _ = open_store(location)
    spec = make_manifest(**SIZES[SIZE], fingerprint="sha256:" + "a" * 64).adapter
    store.add_base(spec.to_dict())
    full = random_tensors(spec, np.random.default_rng(1))
    b = {lora_key(m.name, "B"): full[lora_key(m.name, "B")] for m in spec.modules}
    start = time.perf_counter()
    for i in range(adapters):
        device = f"agg-{i:05d}"
        store.metadata.add_device(device, "0" * 64, utc_now())
        tensors = {k: v * np.float32(1 + i / adapters) for k, v in b.items()}
        pushed = encode_adapter(spec, tensors)
        sha = store.blobs.put(pushed)
        if recorded:  # as a B-only push records it
            new = NewVersion(spec.base_fingerprint, spec.to_dict(), device, sha, len(pushed), sha, len(pushed),
                             content_digest(tensors), 1 + i % 50, 1, {}, None, utc_now(),
                             version_norms(spec, tensors, device), sha)
        else:  # pushed before the store recorded norms: only the full file (B and the seeded A) is known
            served = encode_adapter(spec, {**full, **tensors})
            full_sha = store.blobs.put(served)
            new = NewVersion(spec.base_fingerprint, spec.to_dict(), device, sha, len(pushed), full_sha, len(served),
                             content_digest(tensors), 1 + i % 50, 1, {}, None, utc_now())
        store.metadata.record_version(new)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    record, _, report = store.aggregate(spec.base_fingerprint)
    seconds = time.perf_counter() - start
    store.close()
    return {"adapters": adapters, "aggregate_s": round(seconds, 2), "setup_s": round(setup, 1),
            "pushed_mib": round(len(encode_adapter(spec, b)) / 2**20, 2), "devices": report["devices"],
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
