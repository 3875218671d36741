"""The attack phase of ``store_load.py``: honest devices and attackers against one store on loopback.

Quality task: all-MiniLM-L6-v2 (int8, LoRA-FA rank 8) on BBC News topics. ``--trained`` devices train on
disjoint, class-balanced slices; each of the ``--honest`` devices pushes one of those adapters (device i the
(i mod K)-th, B scaled by 1 + k * 1e-6 on its k-th push so every push is a new version) and pulls the global
version, for ``--duration`` seconds, with a pause of THINK_S between rounds. Meanwhile each attacker cycles
through ATTACKS without pausing. The global version is aggregated with the store's defaults (equal weights,
clipping at the median norm) before the attackers start and after they stop; its held-out accuracy is the
quality figure. Aggregations the store did not publish (no defence, trimmed mean, median) are computed from
the same stored versions for comparison.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from edge_peft.adapters.peft_format import decode_adapter, encode_adapter, save_adapter
from edge_peft.artifact.adapter_section import AdapterSpec
from edge_peft.artifact.names import is_a
from edge_peft.store.aggregate import AggregationPolicy, Source, aggregate
from edge_peft.store.local_server import StoreServer
from edge_peft.store.service import AdapterStore
from edge_peft.store.wire import MAX_COUNT, PUSH_MEDIA_TYPE, encode_push

from common import CLIENT_TLS, run_threads

THINK_S = 0.5
AGGREGATE_EVERY_S = 30.0
PER_CLASS_TEST = 40
PER_CLASS_PER_DEVICE = 16
ATTACKS = ("oversized body, no token", "oversized push", "poison: B = 3e38", "poison: -100 x honest mean",
           "bad spec", "NaN metric")
COMPARISONS = {  # what the store would publish under other policies (computed, not published)
    "no defence (sample weighting, no clipping)": AggregationPolicy(weighting="samples", clip_norm="off"),
    "trimmed mean (10 %) + clipping": AggregationPolicy(method="trimmed-mean"),
    "coordinate-wise median": AggregationPolicy(method="median", clip_norm="off"),
}


@dataclass
class Outcomes:
    push_ms: list[float] = field(default_factory=list)
    pull_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    attacks: Counter = field(default_factory=Counter)  # (attack, status) -> count
    aggregations: Counter = field(default_factory=Counter)  # status -> count
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class QualityFleet:
    """The exported artifact, the trained adapters (full PEFT tensors) and their sample counts, the test rows."""

    artifact: Path
    spec: AdapterSpec
    adapters: list[dict[str, np.ndarray]]
    samples: list[int]
    test_rows: list[dict]


def train_fleet(workdir: Path, trained: int, steps: int) -> QualityFleet:
    """Export MiniLM and train ``trained`` devices on disjoint slices of BBC News (the device loop, no torch)."""
    from edge_peft import export
    from edge_peft.bundled import BBC_LABELS, bbc_news_split, minilm_dir, write_jsonl
    from edge_peft.device.trainer import TrainConfig, open_run

    train_rows, test_rows = bbc_news_split(PER_CLASS_PER_DEVICE * trained, PER_CLASS_TEST)
    artifact = workdir / "artifact"
    manifest = export(minilm_dir(), artifact, rank=8, alpha=16.0, quantize="int8", labels=BBC_LABELS, max_seq_len=128)
    adapters, samples = [], []
    for i in range(trained):
        rows = [r for n, r in enumerate(train_rows) if n % trained == i]
        data = write_jsonl(workdir / f"train-{i}.jsonl", rows)
        config = TrainConfig(data=str(data), steps=steps, batch_size=8, eval_fraction=0.0, eval_every=0,
                             checkpoint_every=steps, seed=i)
        summary = open_run(artifact, config, workdir / f"run-{i}").run()
        tensors, _ = decode_adapter((workdir / f"run-{i}" / "adapter" / "adapter_model.safetensors").read_bytes())
        adapters.append(tensors)
        samples.append(summary["samples"])
        print(f"[attack] trained device {i}: {len(rows)} articles, {steps} steps, loss {summary['final_loss']:.3f}",
              flush=True)
    return QualityFleet(artifact, manifest.adapter, adapters, samples, test_rows)


def accuracy_of(fleet: QualityFleet, tensors: dict[str, np.ndarray], out: Path) -> float:
    from edge_peft.device.inference import Predictor, accuracy

    save_adapter(out, fleet.spec, tensors)
    return accuracy(Predictor(fleet.artifact, out), fleet.test_rows)


def compared(fleet: QualityFleet, tensors: dict[str, np.ndarray], out: Path) -> float | str:
    """The accuracy of an unpublished aggregate, or why it has none (a poisoned one classifies NaN)."""
    from edge_peft.errors import UserError

    try:
        return accuracy_of(fleet, tensors, out)
    except UserError as exc:
        return str(exc).split(":")[0]


def push_body(spec: AdapterSpec, tensors: dict[str, np.ndarray], scale: float, samples: int,
              metrics: str = '{"final_loss": 1.0}') -> bytes:
    """A B-only push of ``tensors`` (trained ones scaled by ``scale``); ``metrics`` as raw JSON text."""
    data = encode_adapter(spec, {k: v * np.float32(scale) for k, v in tensors.items() if not is_a(k)})
    meta = json.dumps({"spec": spec.to_dict(), "samples": samples, "steps": 1, "parent": None,
                       "sha256": hashlib.sha256(data).hexdigest()})
    return meta[:-1].encode() + b', "metrics": ' + metrics.encode() + b"}\n" + data


def honest_loop(url: str, token: str, device: str, spec: AdapterSpec, tensors: dict, samples: int, deadline: float,
                out: Outcomes) -> None:
    base = spec.base_fingerprint
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=300,
                      verify=CLIENT_TLS) as http:
        etag, k = None, 1
        while time.monotonic() < deadline:
            body = push_body(spec, tensors, 1 + k * 1e-6, samples)
            k += 1
            try:
                t0 = time.perf_counter()
                r = http.post(f"/v1/bases/{base}/devices/{device}/versions", content=body,
                              headers={"Content-Type": PUSH_MEDIA_TYPE})
                t1 = time.perf_counter()
                g = http.get(f"/v1/bases/{base}/global/latest", headers={"If-None-Match": etag} if etag else {})
                t2 = time.perf_counter()
            except httpx.HTTPError as exc:
                with out.lock:
                    out.errors.append(f"{device}: {exc.__class__.__name__}")
                continue
            etag = g.headers.get("ETag", etag)
            with out.lock:
                out.push_ms.append((t1 - t0) * 1e3)
                out.pull_ms.append((t2 - t1) * 1e3)
                if r.status_code not in (200, 201):
                    out.errors.append(f"{device} push {r.status_code}: {r.text[:120]}")
                if g.status_code not in (200, 304):
                    out.errors.append(f"{device} pull {g.status_code}: {g.text[:120]}")
            time.sleep(THINK_S)


def stream_oversized(port: int, head: str) -> int:
    """Send ``head`` declaring 1 GiB and its first MiB, then read the answer; the status, 0 if none came."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            try:
                sock.sendall(head.encode() + b"\0" * (1 << 20))
            except OSError:
                pass  # the server answered and closed before taking the whole MiB
            answer = sock.recv(4096)
        return int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/") else 0
    except OSError:
        return 0


def attacker_loop(url: str, port: int, token: str, device: str, fleet: QualityFleet, deadline: float,
                  out: Outcomes) -> None:
    spec, base = fleet.spec, fleet.spec.base_fingerprint
    push_path = f"/v1/bases/{base}/devices/{device}/versions"
    rng = np.random.default_rng(int(hashlib.sha256(device.encode()).hexdigest()[:8], 16))
    mean = {k: np.mean([a[k] for a in fleet.adapters], axis=0) for k in fleet.adapters[0]}
    bad_spec = {**spec.to_dict(), "rank": 64}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=300,
                      verify=CLIENT_TLS) as http:
        n = 0
        while time.monotonic() < deadline:
            attack = ATTACKS[n % len(ATTACKS)]
            n += 1
            try:
                if attack == "oversized body, no token":
                    status = stream_oversized(port, "POST /v1/devices HTTP/1.1\r\nHost: x\r\n"
                                                    f"Content-Length: {1 << 30}\r\n\r\n")
                elif attack == "oversized push":
                    status = stream_oversized(port, f"POST {push_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                                    f"{token}\r\nContent-Length: {1 << 30}\r\n\r\n")
                else:
                    if attack == "poison: B = 3e38":
                        poison = {k: np.float32(3e38) * np.sign(rng.standard_normal(v.shape)).astype(np.float32)
                                  for k, v in mean.items()}
                        body = push_body(spec, poison, 1.0, MAX_COUNT)
                    elif attack == "poison: -100 x honest mean":
                        body = push_body(spec, mean, -100.0 * (1 + n * 1e-6), MAX_COUNT)
                    elif attack == "bad spec":
                        data = encode_adapter(spec, {k: v for k, v in mean.items() if not is_a(k)})
                        body = encode_push({"spec": bad_spec, "samples": 1, "steps": 1, "metrics": {}, "parent": None,
                                            "sha256": hashlib.sha256(data).hexdigest()}, data)
                    else:
                        body = push_body(spec, mean, 1.0 + n * 1e-6, 10, metrics='{"loss": NaN}')
                    status = http.post(push_path, content=body, headers={"Content-Type": PUSH_MEDIA_TYPE}).status_code
            except httpx.HTTPError as exc:
                status = exc.__class__.__name__
            with out.lock:
                out.attacks[(attack, status)] += 1


def admin_loop(url: str, admin: str, base: str, deadline: float, out: Outcomes) -> None:
    while time.monotonic() + AGGREGATE_EVERY_S < deadline:
        time.sleep(AGGREGATE_EVERY_S)
        r = httpx.post(f"{url}/v1/bases/{base}/aggregates", headers={"Authorization": f"Bearer {admin}"}, timeout=600)
        with out.lock:
            out.aggregations[r.status_code] += 1


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def attack_phase(workdir: Path, args) -> dict:
    """Train the fleet, then measure the global accuracy without and with the attackers, and the honest
    devices' latency and errors while the attackers run."""
    workdir.mkdir(parents=True, exist_ok=True)
    fleet = train_fleet(workdir, args.trained, args.train_steps)
    spec, base = fleet.spec, fleet.spec.base_fingerprint
    data_dir = workdir / "store"
    store, admin = AdapterStore.open(data_dir)
    store.add_base(spec.to_dict())
    honest = [f"honest-{i:02d}" for i in range(args.honest)]
    attackers = [f"attacker-{i}" for i in range(args.attackers)]
    tokens = {d: store.add_device(d) for d in honest + attackers}
    out = Outcomes()
    with StoreServer(data_dir, max_body_mb=64) as server:
        auth = {"Authorization": f"Bearer {admin}"}
        for i, device in enumerate(honest):
            r = httpx.post(f"{server.url}/v1/bases/{base}/devices/{device}/versions", timeout=120,
                           content=push_body(spec, fleet.adapters[i % args.trained], 1.0, fleet.samples[i % args.trained]),
                           headers={"Authorization": f"Bearer {tokens[device]}", "Content-Type": PUSH_MEDIA_TYPE})
            assert r.status_code == 201, r.text
        without = httpx.post(f"{server.url}/v1/bases/{base}/aggregates", headers=auth, timeout=600).json()
        print(f"[attack] {args.honest} honest devices pushed; global version {without['number']}: "
              f"{without['report']['clipped']} clipped", flush=True)
        deadline = time.monotonic() + args.duration
        threads = [threading.Thread(target=honest_loop, args=(server.url, tokens[d], d, spec, fleet.adapters[i % args.trained],
                                                              fleet.samples[i % args.trained], deadline, out))
                   for i, d in enumerate(honest)]
        threads += [threading.Thread(target=attacker_loop, args=(server.url, server.port, tokens[d], d, fleet, deadline, out))
                    for d in attackers]
        threads.append(threading.Thread(target=admin_loop, args=(server.url, admin, base, deadline, out)))
        wall = run_threads(threads)
        final = httpx.post(f"{server.url}/v1/bases/{base}/aggregates", headers=auth, timeout=600)
        rss = peak_rss_mb(server.pid)
        global_of = lambda number: decode_adapter(store.blobs.get(store.metadata.aggregate(base, number).full_sha256))[0]
        accuracy_without = accuracy_of(fleet, global_of(without["number"]), workdir / "global-without")
        accuracy_with = accuracy_of(fleet, global_of(None), workdir / "global-with")
        latest = store.metadata.latest_versions(base)
        sources = [Source(f"{v.device} v{v.number}", v.samples,
                          lambda v=v: decode_adapter(store.blobs.get(v.full_sha256))[0]) for v in latest]
        comparison = {name: compared(fleet, aggregate(spec, sources, policy)[0], workdir / f"cmp-{n}")
                      for n, (name, policy) in enumerate(COMPARISONS.items())}
    store.close()
    pct = lambda values, q: float(np.percentile(values, q)) if values else float("nan")
    by_attack: dict[str, dict[str, int]] = {}
    for (attack, status), count in sorted(out.attacks.items(), key=str):
        by_attack.setdefault(attack, {})[str(status)] = count
    return {
        "duration_s": wall, "server_peak_rss_mb": rss,
        "honest": {"devices": args.honest, "think_s": THINK_S, "pushes": len(out.push_ms), "pulls": len(out.pull_ms),
                   "push_p50_ms": pct(out.push_ms, 50), "push_p99_ms": pct(out.push_ms, 99),
                   "pull_p50_ms": pct(out.pull_ms, 50), "pull_p99_ms": pct(out.pull_ms, 99),
                   "errors": len(out.errors), "error_samples": out.errors[:5]},
        "attackers": {"devices": args.attackers, "requests": sum(out.attacks.values()), "answers": by_attack},
        "aggregations_during": {str(k): v for k, v in out.aggregations.items()},
        "final_aggregate": {"status": final.status_code, "report": final.json().get("report")},
        "quality": {"task": "all-MiniLM-L6-v2 int8, LoRA-FA r8, BBC News topics", "trained_devices": args.trained,
                    "train_steps": args.train_steps, "test_rows": len(fleet.test_rows),
                    "accuracy_without_attackers": accuracy_without, "accuracy_with_attackers": accuracy_with,
                    "difference_points": 100 * (accuracy_with - accuracy_without),
                    "with_attackers_other_policies": comparison},
    }


def print_attack(a: dict) -> None:
    h, q = a["honest"], a["quality"]
    print(f"\nattack phase, {a['duration_s']:.0f} s: {h['devices']} honest devices + {a['attackers']['devices']} attackers; "
          f"server peak RSS {a['server_peak_rss_mb']:.0f} MB")
    print(f"  honest: {h['pushes']} pushes p50 {h['push_p50_ms']:.0f} ms p99 {h['push_p99_ms']:.0f} ms, "
          f"{h['pulls']} pulls p50 {h['pull_p50_ms']:.0f} ms p99 {h['pull_p99_ms']:.0f} ms, {h['errors']} errors")
    for attack, answers in a["attackers"]["answers"].items():
        print(f"  attacker {attack:<28} " + ", ".join(f"{s}: {n}" for s, n in answers.items()))
    print(f"  global accuracy: {q['accuracy_without_attackers']:.1%} without attackers, "
          f"{q['accuracy_with_attackers']:.1%} with ({q['difference_points']:+.1f} points; robust defaults)")
    for name, acc in q["with_attackers_other_policies"].items():
        print(f"    {name}: {acc:.1%}" if isinstance(acc, float) else f"    {name}: {acc}")
