"""Load benchmark of the adapter store on loopback: concurrent devices pushing and pulling, then aggregation,
then honest devices and attackers at once.

Bounded by a request count per client and a time limit per phase; everything runs on 127.0.0.1 in a
temporary directory (removed afterwards unless --keep). Prints a table and writes JSON with --json PATH.

The attack phase (``store_attack.py``) runs on the quality task: all-MiniLM-L6-v2 (int8) on BBC News topics,
a few devices trained on disjoint slices; 50 honest devices push those adapters and pull the global version
for --duration seconds while 5 attackers send oversized bodies, poisoned pushes and bad specs. It reports the
honest devices' latency and errors, the attackers' answers, the server's peak RSS, and the held-out accuracy
of the global version without and with the attackers (robust aggregation on, and for comparison off).

    python benchmarks/store_load.py --json benchmarks/results/store_load.json           # about 10 minutes
    python benchmarks/store_load.py --duration 20 --requests 2 --small-requests 4 --aggregate 100   # a quick run
    python benchmarks/store_load.py --backend all --processes 1,4 --requests 2 --small-requests 5 \
        --json benchmarks/results/store_fleet.json    # SQLite vs PostgreSQL + S3 in 1 and 4 processes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from edge_peft.artifact.adapter_section import AdapterSpec
from edge_peft.adapters.peft_format import encode_adapter
from edge_peft.artifact.names import lora_key
from edge_peft.store.aggregate import version_norms
from edge_peft.store.service import AdapterStore, content_digest, utc_now
from edge_peft.store.storage import NewVersion
from edge_peft.store.local_server import StoreServer
from edge_peft.store.testing import make_manifest, random_tensors
from edge_peft.store.wire import PUSH_MEDIA_TYPE, encode_push
from common import CLIENT_TLS, run_threads
from store_attack import attack_phase, print_attack
from store_fleet import backend_matrix

SIZES = {
    # rank 8 on q/k/v/o of a 1B-class model (16 layers, hidden 2048): B-only push 4 MiB, full file 8 MiB
    "1B-qkvo-r8": dict(layers=16, hidden=2048, rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "small": dict(layers=2, hidden=64, rank=4, targets=("q_proj", "v_proj")),
}


@dataclass
class PhaseStats:
    push_ms: list[float] = field(default_factory=list)
    pull_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    acknowledged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def b_only_push(spec: AdapterSpec, b: dict[str, np.ndarray], k: int, samples: int) -> bytes:
    """A distinct B-only adapter (B scaled by 1 + k/1000) framed as a push body."""
    data = encode_adapter(spec, {key: v * np.float32(1 + k / 1000) for key, v in b.items()})
    meta = {"spec": spec.to_dict(), "samples": samples, "steps": 1, "metrics": {}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}
    return encode_push(meta, data)


def client_loop(url: str, token: str, device: str, spec: AdapterSpec, b: dict, requests: int, deadline: float,
                stats: PhaseStats) -> None:
    """Alternate push (new B-only version) and pull (own latest, full file) until done or out of time."""
    base = spec.base_fingerprint
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=300,
                      verify=CLIENT_TLS) as http:
        for k in range(requests):
            if time.monotonic() > deadline:
                return
            body = b_only_push(spec, b, k, samples=1 + k)
            t0 = time.perf_counter()
            try:
                r = http.post(f"/v1/bases/{base}/devices/{device}/versions", content=body,
                              headers={"Content-Type": PUSH_MEDIA_TYPE})
                push_ms = (time.perf_counter() - t0) * 1e3
                t1 = time.perf_counter()
                g = http.get(f"/v1/bases/{base}/devices/{device}/versions/latest")
                pull_ms = (time.perf_counter() - t1) * 1e3
            except httpx.HTTPError as exc:
                with stats.lock:
                    stats.errors.append(f"{device}: {exc.__class__.__name__}")
                continue
            with stats.lock:
                stats.push_ms.append(push_ms)
                stats.pull_ms.append(pull_ms)
                if r.status_code == 201:
                    stats.acknowledged += 1
                else:
                    stats.errors.append(f"{device} push {r.status_code}")
                if g.status_code != 200 or hashlib.sha256(g.content).hexdigest() != g.headers.get("X-Edge-Peft-Sha256"):
                    stats.errors.append(f"{device} pull {g.status_code}")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_phase(name: str, server: StoreServer, store: AdapterStore, tokens: dict[str, str], requests: int,
              seconds: float) -> dict:
    manifest = make_manifest(**SIZES[name], fingerprint="sha256:" + hashlib.sha256(name.encode()).hexdigest())
    spec = manifest.adapter
    store.add_base(spec.to_dict())
    full = random_tensors(spec, np.random.default_rng(0))
    b = {lora_key(m.name, "B"): full[lora_key(m.name, "B")] for m in spec.modules}
    stats = PhaseStats()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(server.url, tokens[d], d, spec, b, requests, deadline, stats))
               for d in tokens]
    wall = run_threads(threads)
    stored = len(store.metadata.versions(spec.base_fingerprint))
    push_bytes = len(b_only_push(spec, b, 0, 1))
    return {
        "phase": name, "clients": len(tokens), "push_mib": push_bytes / 2**20, "wall_s": wall,
        "requests": len(stats.push_ms) + len(stats.pull_ms), "requests_per_s": (len(stats.push_ms) + len(stats.pull_ms)) / wall,
        "push_p50_ms": pct(stats.push_ms, 50), "push_p99_ms": pct(stats.push_ms, 99),
        "pull_p50_ms": pct(stats.pull_ms, 50), "pull_p99_ms": pct(stats.pull_ms, 99),
        "errors": len(stats.errors), "error_samples": stats.errors[:5],
        "versions_acknowledged": stats.acknowledged, "versions_stored": stored,
    }


def store_versions(store: AdapterStore, size: str, count: int, recorded: bool = True) -> tuple[AdapterSpec, float]:
    """Register a base of ``size`` and store ``count`` device versions of it directly (B only, each scaled
    differently): as a push records them (``recorded``: norms and the B-only blob) or as pushes before the store
    recorded those (only the full file, B and the seeded A). Returns the spec and the seconds it took."""
    spec = make_manifest(**SIZES[size], fingerprint="sha256:" + hashlib.sha256(f"agg-{size}".encode()).hexdigest()).adapter
    store.add_base(spec.to_dict())
    full = random_tensors(spec, np.random.default_rng(1))
    b = {lora_key(m.name, "B"): full[lora_key(m.name, "B")] for m in spec.modules}
    t0 = time.perf_counter()
    for i in range(count):
        device = f"agg-{i:05d}"
        store.metadata.add_device(device, "0" * 64, utc_now())
        tensors = {k: v * np.float32(1 + i / count) for k, v in b.items()}
        pushed = encode_adapter(spec, tensors)
        sha = store.blobs.put(pushed)
        if recorded:
            new = NewVersion(spec.base_fingerprint, spec.to_dict(), device, sha, len(pushed), sha, len(pushed),
                             content_digest(spec, tensors), 1 + i % 50, 1, {}, None, utc_now(),
                             version_norms(spec, tensors, device), sha)
        else:
            served = encode_adapter(spec, {**full, **tensors})
            full_sha = store.blobs.put(served)
            new = NewVersion(spec.base_fingerprint, spec.to_dict(), device, sha, len(pushed), full_sha, len(served),
                             content_digest(spec, tensors), 1 + i % 50, 1, {}, None, utc_now())
        store.metadata.record_version(new)
    return spec, time.perf_counter() - t0


def aggregate_phase(server: StoreServer, store: AdapterStore, admin: str, count: int, size: str) -> dict:
    """Store ``count`` device versions directly (setup, not timed), then time POST .../aggregates."""
    spec, setup = store_versions(store, size, count)
    t0 = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/bases/{spec.base_fingerprint}/aggregates",
                   headers={"Authorization": f"Bearer {admin}"}, timeout=3600)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    b_only = {k: v for k, v in random_tensors(spec, np.random.default_rng(1)).items() if ".lora_B." in k}
    return {"adapters": count, "size": size, "adapter_mib": len(encode_adapter(spec, b_only)) / 2**20,
            "aggregate_s": seconds, "setup_s": setup, "global_version": r.json()["number"],
            "inputs": len(r.json()["inputs"]), "policy": r.json()["report"]["policy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=6, help="push+pull pairs per client, realistic size")
    parser.add_argument("--small-requests", type=int, default=40, help="push+pull pairs per client, small size")
    parser.add_argument("--seconds", type=float, default=180.0, help="time limit per load phase")
    parser.add_argument("--aggregate", type=int, default=1000, help="adapters to aggregate (0: skip)")
    parser.add_argument("--aggregate-size", choices=sorted(SIZES), default="1B-qkvo-r8")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of the attack phase (0: skip it)")
    parser.add_argument("--honest", type=int, default=50, help="honest devices in the attack phase")
    parser.add_argument("--attackers", type=int, default=5, help="attacking devices in the attack phase")
    parser.add_argument("--trained", type=int, default=5, help="real adapters trained for the attack phase's honest devices")
    parser.add_argument("--train-steps", type=int, default=30, help="training steps of each of them")
    parser.add_argument("--backend", choices=["sqlite", "postgres+s3", "all"],
                        help="compare the store's backends instead (store_fleet.py): SQLite in one process, "
                             "PostgreSQL + S3 in --processes processes, under --clients-list clients")
    parser.add_argument("--processes", default="1,4", help="with --backend: store process counts, comma-separated")
    parser.add_argument("--clients-list", default="50,200", help="with --backend: client counts, comma-separated")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workdir", type=Path, help="where the store lives (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the store directory")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="store-load-", dir=args.workdir))
    if args.backend:
        try:
            backends = ["sqlite", "postgres+s3"] if args.backend == "all" else [args.backend]
            result = backend_matrix(tmp, backends, [int(n) for n in args.processes.split(",")],
                                    [int(n) for n in args.clients_list.split(",")], SIZES,
                                    {"1B-qkvo-r8": args.requests, "small": args.small_requests}, args.aggregate,
                                    b_only_push, aggregate_phase)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
        result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if not result["correct"]:
            raise SystemExit("acknowledged and stored versions differ, numbers have gaps, or requests failed")
        return
    try:
        data_dir = tmp / "store"
        store, admin = AdapterStore.open(data_dir)
        tokens = {f"dev-{i:02d}": store.add_device(f"dev-{i:02d}") for i in range(args.clients)}
        with StoreServer(data_dir, max_body_mb=64) as server:
            phases = [run_phase("1B-qkvo-r8", server, store, tokens, args.requests, args.seconds),
                      run_phase("small", server, store, tokens, args.small_requests, args.seconds)]
            aggregation = aggregate_phase(server, store, admin, args.aggregate, args.aggregate_size) if args.aggregate else None
        attack = attack_phase(tmp / "attack", args) if args.duration else None
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'phase':<12} {'clients':>7} {'push MiB':>8} {'req':>6} {'req/s':>7} {'push p50':>9} {'push p99':>9} "
          f"{'pull p50':>9} {'pull p99':>9} {'errors':>6} {'acked':>6} {'stored':>6}")
    for p in phases:
        print(f"{p['phase']:<12} {p['clients']:>7} {p['push_mib']:>8.2f} {p['requests']:>6} {p['requests_per_s']:>7.1f} "
              f"{p['push_p50_ms']:>7.0f}ms {p['push_p99_ms']:>7.0f}ms {p['pull_p50_ms']:>7.0f}ms {p['pull_p99_ms']:>7.0f}ms "
              f"{p['errors']:>6} {p['versions_acknowledged']:>6} {p['versions_stored']:>6}")
    if aggregation:
        print(f"aggregate {aggregation['adapters']} x {aggregation['size']} ({aggregation['adapter_mib']:.1f} MiB each): "
              f"{aggregation['aggregate_s']:.2f} s")
    if attack:
        print_attack(attack)
    ok = all(p["versions_acknowledged"] == p["versions_stored"] and not p["errors"] for p in phases)
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()},
              "phases": phases, "aggregation": aggregation, "acknowledged_equals_stored": ok, "attack": attack}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not ok:
        raise SystemExit("acknowledged and stored versions differ, or requests failed")
    if attack and attack["honest"]["errors"]:
        raise SystemExit("honest devices saw errors during the attack phase")


if __name__ == "__main__":
    main()
