"""The store's backends side by side (``store_load.py --backend``): SQLite + blob directory in one process, and
PostgreSQL + S3 (moto's server on loopback) in 1 and N processes, under 50 and 200 concurrent clients.

Each row is one backend, process count, client count and adapter size: every client pushes ``requests`` new
B-only versions (the push stage), then pulls its latest ``requests`` times (the pull stage). Per stage: latency
percentiles, throughput, errors, and CPU seconds per request of the store processes, of PostgreSQL and of the
S3 server (so the scaling on a machine with more cores, or with the database elsewhere, can be computed).
Correctness per row: every acknowledged push stored, each device's version numbers exactly 1..n.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from edge_peft.artifact.names import lora_key
from edge_peft.store.backends import StoreLocation, open_store
from edge_peft.store.local_server import StoreServer
from edge_peft.store.local_services import LocalPostgres, LocalS3
from edge_peft.store.testing import make_manifest, random_tensors
from edge_peft.store.wire import PUSH_MEDIA_TYPE
from common import CLIENT_TLS, run_threads


@dataclass
class Stage:
    ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    acknowledged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their children so far."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def postgres_pid(pg: LocalPostgres) -> int:
    return int((pg.root / "data" / "postmaster.pid").read_text().split()[0])


def run_stage(clients: dict[str, str], work, pids: dict[str, list[int]]) -> tuple[Stage, float, dict[str, float]]:
    """Run ``work(device, token, stage)`` in one thread per client; (stats, wall seconds, CPU seconds per group)."""
    stage = Stage()
    before = {k: cpu_seconds(v) for k, v in pids.items()}
    wall = run_threads([threading.Thread(target=work, args=(d, t, stage)) for d, t in clients.items()])
    return stage, wall, {k: cpu_seconds(v) - before[k] for k, v in pids.items()}


def load_row(server: StoreServer, location: StoreLocation, sizes: dict, size: str, clients: dict[str, str],
             requests: int, pids: dict[str, list[int]], push_body) -> dict:
    store, _ = open_store(location)
    spec = make_manifest(**sizes[size], fingerprint="sha256:" + hashlib.sha256(f"{size}-{len(clients)}".encode()).hexdigest()).adapter
    store.add_base(spec.to_dict())
    full = random_tensors(spec, np.random.default_rng(0))
    b = {lora_key(m.name, "B"): full[lora_key(m.name, "B")] for m in spec.modules}
    bodies = {k: push_body(spec, b, k, 1 + k) for k in range(requests)}  # the same bytes for every device
    base = spec.base_fingerprint

    def pushes(device: str, token: str, stage: Stage) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=600,
                          verify=CLIENT_TLS) as http:
            for k in range(requests):
                timed(stage, device, lambda: http.post(f"/v1/bases/{base}/devices/{device}/versions", content=bodies[k],
                                                       headers={"Content-Type": PUSH_MEDIA_TYPE}),
                      lambda r: None if r.status_code == 201 else f"push {r.status_code}: {r.text[:120]}")

    def pulls(device: str, token: str, stage: Stage) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=600,
                          verify=CLIENT_TLS) as http:
            for _ in range(requests):
                timed(stage, device, lambda: http.get(f"/v1/bases/{base}/devices/{device}/versions/latest"),
                      lambda g: None if g.status_code == 200 and hashlib.sha256(g.content).hexdigest() == g.headers.get(
                          "X-Edge-Peft-Sha256") else f"pull {g.status_code}")

    push, push_wall, push_cpu = run_stage(clients, pushes, pids)
    pull, pull_wall, pull_cpu = run_stage(clients, pulls, pids)
    versions = store.metadata.versions(base)
    numbering_ok = all(sorted(v.number for v in versions if v.device == d) == list(range(1, requests + 1))
                       for d in clients)
    store.close()
    row = {"size": size, "clients": len(clients), "push_mib": len(bodies[0]) / 2**20,
           "pushes": len(push.ms), "push_per_s": len(push.ms) / push_wall,
           "push_p50_ms": pct(push.ms, 50), "push_p99_ms": pct(push.ms, 99),
           "pulls": len(pull.ms), "pull_per_s": len(pull.ms) / pull_wall,
           "pull_p50_ms": pct(pull.ms, 50), "pull_p99_ms": pct(pull.ms, 99),
           "errors": len(push.errors) + len(pull.errors), "error_samples": (push.errors + pull.errors)[:5],
           "acknowledged": push.acknowledged, "stored": len(versions), "numbers_gap_free": numbering_ok}
    for group in pids:
        row[f"{group}_cpu_ms_per_push"] = push_cpu[group] / max(len(push.ms), 1) * 1e3
        row[f"{group}_cpu_ms_per_pull"] = pull_cpu[group] / max(len(pull.ms), 1) * 1e3
    return row


def timed(stage: Stage, device: str, request, problem) -> None:
    """Time ``request()``; count it acknowledged unless ``problem(response)`` names one (then it is an error)."""
    t0 = time.perf_counter()
    try:
        response = request()
    except httpx.HTTPError as exc:
        with stage.lock:
            stage.errors.append(f"{device}: {exc.__class__.__name__}")
        return
    ms, wrong = (time.perf_counter() - t0) * 1e3, problem(response)
    with stage.lock:
        stage.ms.append(ms)
        if wrong:
            stage.errors.append(f"{device} {wrong}")
        else:
            stage.acknowledged += 1


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def backend_matrix(tmp: Path, backends: list[str], processes: list[int], client_counts: list[int], sizes: dict,
                   requests: dict[str, int], aggregate: int, push_body, aggregate_phase) -> dict:
    """Every (backend, processes) configuration under every client count and size; then, on the last one,
    ``aggregate_phase(server, store, admin, count, size)`` (store_load.py's) over ``aggregate`` adapters."""
    configs = [("sqlite", 1)] if "sqlite" in backends else []
    configs += [("postgres+s3", n) for n in processes] if "postgres+s3" in backends else []
    rows, aggregation = [], None
    pg = LocalPostgres(durable=True).start() if any(b != "sqlite" for b, _ in configs) else None
    s3 = LocalS3().start() if pg else None
    try:
        if s3:
            os.environ.update(s3.env)  # the store processes reach the S3 server with these
        for index, (backend, n) in enumerate(configs):
            name = f"bench-{index}-{backend.replace('+', '-')}-{n}"
            location = StoreLocation(tmp / name) if backend == "sqlite" else StoreLocation(
                tmp / name, pg.new_database(name), s3.new_bucket(name), s3.endpoint)
            store, admin = open_store(location)
            devices = {f"dev-{i:03d}": store.add_device(f"dev-{i:03d}") for i in range(max(client_counts))}
            store.close()
            options = {"--processes": n, "--rate-limit": 100000}
            if backend != "sqlite":
                options |= {"--database": location.database, "--blobs": location.blobs}
            with StoreServer(location.data_dir, options=options) as server:
                pids = {"store": [server.pid]}
                if backend != "sqlite":
                    pids |= {"postgres": [postgres_pid(pg)], "s3": [s3.process.pid]}
                for clients in client_counts:
                    for size in sizes:
                        chosen = dict(list(devices.items())[:clients])
                        row = load_row(server, location, sizes, size, chosen, requests[size], pids, push_body)
                        rows.append({"backend": backend, "processes": n, **row})
                        print_row(rows[-1])
                if aggregate and index == len(configs) - 1:
                    store, _ = open_store(location)
                    aggregation = {"backend": backend, "processes": n,
                                   **aggregate_phase(server, store, admin, aggregate, "1B-qkvo-r8")}
                    store.close()
                    print(f"aggregate {aggregate} x 1B-qkvo-r8 on {backend} ({n} processes): "
                          f"{aggregation['aggregate_s']:.2f} s")
    finally:
        if s3:
            s3.stop()
        if pg:
            pg.stop()
    ok = all(r["acknowledged"] == r["stored"] and r["numbers_gap_free"] and not r["errors"] for r in rows)
    return {"rows": rows, "aggregation": aggregation, "correct": ok}


def print_row(r: dict) -> None:
    cpu = "  ".join(f"{g} {r[f'{g}_cpu_ms_per_push']:.0f}/{r[f'{g}_cpu_ms_per_pull']:.0f}"
                    for g in ("store", "postgres", "s3") if f"{g}_cpu_ms_per_push" in r)
    print(f"{r['backend']:<12} x{r['processes']} {r['clients']:>4} clients {r['size']:<11} "
          f"push {r['push_per_s']:6.1f}/s p50 {r['push_p50_ms']:6.0f} p99 {r['push_p99_ms']:6.0f} ms | "
          f"pull {r['pull_per_s']:6.1f}/s p50 {r['pull_p50_ms']:6.0f} p99 {r['pull_p99_ms']:6.0f} ms | "
          f"err {r['errors']} acked {r['acknowledged']} stored {r['stored']} gap-free {r['numbers_gap_free']} | "
          f"CPU ms push/pull: {cpu}", flush=True)
