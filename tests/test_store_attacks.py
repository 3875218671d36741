"""Attacks on a real store server on loopback (issue 20): one test per defence.

Each test checks the status code, that nothing was written (every metadata row and every file of the data
directory), that the server still serves, and where memory is the target the server's peak RSS (VmHWM).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sqlite3
import stat
import struct
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from edge_peft.adapters.peft_format import decode_adapter, encode_adapter
from edge_peft.artifact.names import lora_key
from edge_peft.store.__main__ import main
from edge_peft.store.local_server import StoreServer
from edge_peft.store.service import AdapterStore
from edge_peft.store.testing import make_manifest, random_tensors, write_run
from edge_peft.store.wire import PUSH_MEDIA_TYPE, encode_push

pytestmark = pytest.mark.slow  # each test starts a store server
RSS_BOUND_MB = 300
MANIFEST = make_manifest(labels=3, fingerprint="sha256:" + "a" * 64)
SPEC = MANIFEST.adapter
BASE = SPEC.base_fingerprint
DEVICES = ("honest-1", "honest-2", "honest-3", "honest-4", "victim-1", "victim-2", "attacker")


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def snapshot(data_dir: Path) -> tuple:
    """Every metadata row (but when devices were last seen) and every file and folder under blobs/."""
    with sqlite3.connect(data_dir / "store.sqlite3") as con:
        rows = tuple(tuple(con.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()) for table, columns in (
            ("bases", "*"), ("devices", "id, token_hash, created"), ("versions", "*"), ("aggregates", "*"),
            ("aggregate_inputs", "*")))
    files = tuple(sorted(str(p.relative_to(data_dir)) for p in (data_dir / "blobs").rglob("*")))
    return rows, files


def body_of(tensors: dict, samples: int = 10, spec: dict | None = None, parent: dict | None = None,
            metrics: dict | None = None) -> bytes:
    data = encode_adapter(SPEC, tensors)
    meta = {"spec": spec or SPEC.to_dict(), "samples": samples, "steps": 3, "metrics": metrics or {"final_loss": 1.0},
            "parent": parent, "sha256": hashlib.sha256(data).hexdigest()}
    return encode_push(meta, data)


class Fleet:
    """A data directory with the base registered and DEVICES' tokens; servers are started per test."""

    def __init__(self, root: Path) -> None:
        self.data = root / "store"
        store, self.admin = AdapterStore.open(self.data)
        store.add_base(SPEC.to_dict())
        self.tokens = {d: store.add_device(d) for d in DEVICES}
        store.close()  # a server started later is then alone with the directory

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin if who == 'admin' else self.tokens[who]}"}

    def push(self, server: StoreServer, device: str, body: bytes, as_device: str | None = None) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/bases/{BASE}/devices/{device}/versions", content=body, timeout=60,
                          headers={**self.auth(as_device or device), "Content-Type": PUSH_MEDIA_TYPE})

    def aggregate(self, server: StoreServer, policy: dict | None = None) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/bases/{BASE}/aggregates", json=policy, headers=self.auth("admin"),
                          timeout=60)

    def pull_global(self, server: StoreServer, who: str = "honest-1") -> tuple[dict, dict]:
        r = httpx.get(f"{server.url}/v1/bases/{BASE}/global/latest", headers=self.auth(who))
        assert r.status_code == 200, r.text
        return decode_adapter(r.content)

    def still_serves(self, server: StoreServer) -> None:
        """The server answers, and an honest push of new content is accepted."""
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        tensors = random_tensors(SPEC, np.random.default_rng(int.from_bytes(os.urandom(4), "little")))
        r = self.push(server, "honest-4", body_of(tensors))
        assert r.status_code == 201, r.text


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path)


def stream_body(server: StoreServer, head: str, size: int) -> tuple[int, int]:
    """Send ``head`` then up to ``size`` zero bytes in 1 MiB chunks (never held in memory at once), while
    reading the answer; returns (status, bytes sent before the server answered and closed)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(head.encode())
    sent, chunk, chunked = [0], b"\0" * (1 << 20), "chunked" in head

    def pump() -> None:
        try:
            while sent[0] < size:
                sock.sendall(b"100000\r\n" + chunk + b"\r\n" if chunked else chunk)
                sent[0] += len(chunk)
        except OSError:
            pass  # the server answered and closed the connection

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    answer = b""
    while b"\r\n" not in answer:
        data = sock.recv(4096)
        assert data, "the server closed the connection without answering"
        answer += data
    sock.close()
    thread.join(30)
    return int(answer.split(b" ")[1]), sent[0]


# --- 1. limits before work ------------------------------------------------------------------------

def test_unauthenticated_1gib_body_is_refused_before_it_is_read(fleet):
    with StoreServer(fleet.data, max_body_mb=1) as server:
        before = snapshot(fleet.data)
        head = ("POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {1 << 30}\r\n\r\n")
        status, sent = stream_body(server, head, 1 << 30)
        assert status == 401 and sent < 1 << 30
        head = (f"POST /v1/bases/{BASE}/devices/honest-1/versions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {fleet.tokens['honest-1']}\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, sent = stream_body(server, head, 1 << 30)  # no Content-Length to check: counted as received
        assert status == 413 and sent < 64 << 20
        assert peak_rss_mb(server.pid) < RSS_BOUND_MB
        assert snapshot(fleet.data) == before
        fleet.still_serves(server)


def test_push_cannot_make_the_server_write_or_hold_more_than_it_sent(fleet):
    """The issue's 834-byte push with a crafted spec, and safetensors headers declaring more than they carry."""
    big = make_manifest(labels=3, hidden=8192, fingerprint=BASE).adapter.to_dict()
    with StoreServer(fleet.data, max_body_mb=1) as server:
        before = snapshot(fleet.data)
        b_only = {k: v for k, v in random_tensors(SPEC, np.random.default_rng(0)).items() if "lora_A" not in k}
        r = fleet.push(server, "attacker", body_of(b_only, spec=big))
        assert r.status_code == 409 and "in_features is 8192, the registered spec has 32" in r.json()["detail"]
        key = lora_key(SPEC.modules[0].name, "B")
        for shape in ([SPEC.modules[0].out_features, SPEC.rank], [100_000, 100_000]):
            header = json.dumps({key: {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * math.prod(shape)]}})
            data = struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8  # 8 bytes of a much larger tensor
            meta = {"spec": SPEC.to_dict(), "samples": 1, "steps": 1, "metrics": {}, "parent": None,
                    "sha256": hashlib.sha256(data).hexdigest()}
            r = fleet.push(server, "attacker", encode_push(meta, data))
            assert r.status_code == 422, r.text
        assert peak_rss_mb(server.pid) < RSS_BOUND_MB
        assert snapshot(fleet.data) == before
        fleet.still_serves(server)


def test_per_device_quotas_answer_413_and_write_nothing(fleet):
    rng = np.random.default_rng(1)
    with StoreServer(fleet.data, options={"--max-device-versions": 2}) as server:
        for _ in range(2):
            assert fleet.push(server, "attacker", body_of(random_tensors(SPEC, rng))).status_code == 201
        before = snapshot(fleet.data)
        r = fleet.push(server, "attacker", body_of(random_tensors(SPEC, rng)))
        assert r.status_code == 413 and "--max-device-versions" in r.json()["detail"]
        assert snapshot(fleet.data) == before
        fleet.still_serves(server)  # other devices have their own quota
    with StoreServer(fleet.data, options={"--max-device-mb": 1}) as server:
        big = make_manifest(labels=3, hidden=4096, fingerprint="sha256:" + "b" * 64).adapter
        assert httpx.post(f"{server.url}/v1/bases", json={"spec": big.to_dict()},
                          headers=fleet.auth("admin")).status_code == 201
        for expected in (201, 413):  # 0.55 MiB files: the second one puts the device over 1 MiB
            data = encode_adapter(big, random_tensors(big, rng))
            meta = {"spec": big.to_dict(), "samples": 1, "steps": 1, "metrics": {}, "parent": None,
                    "sha256": hashlib.sha256(data).hexdigest()}
            before = snapshot(fleet.data)
            r = httpx.post(f"{server.url}/v1/bases/{big.base_fingerprint}/devices/honest-2/versions",
                           content=encode_push(meta, data), headers=fleet.auth("honest-2"))
            assert r.status_code == expected, r.text
        assert "--max-device-mb" in r.json()["detail"] and snapshot(fleet.data) == before


def test_rate_limit_answers_429_with_retry_after(fleet):
    with StoreServer(fleet.data, options={"--rate-limit": 60}) as server:  # bursts of 10, then one a second
        url = f"{server.url}/v1/bases/{BASE}"
        with httpx.Client(headers=fleet.auth("attacker")) as http:
            answers = [http.get(url) for _ in range(30)]  # refills one a second: most of the last 20 are refused
        assert [a.status_code for a in answers[:10]] == [200] * 10
        refused = [a for a in answers if a.status_code == 429]
        assert len(refused) >= 10 and int(refused[0].headers["Retry-After"]) >= 1
        assert "--rate-limit" in refused[0].json()["detail"]
        assert httpx.get(url, headers=fleet.auth("honest-1")).status_code == 200  # a budget per device
        fleet.still_serves(server)


# --- 2. bases are registered by the admin ---------------------------------------------------------

def test_only_the_admin_registers_bases_and_a_wrong_spec_is_409_naming_the_difference(fleet, tmp_path):
    other = make_manifest(fingerprint="sha256:" + "c" * 64)
    with StoreServer(fleet.data) as server:
        before = snapshot(fleet.data)
        tensors = random_tensors(other.adapter, np.random.default_rng(2))
        data = encode_adapter(other.adapter, tensors)
        meta = {"spec": other.adapter.to_dict(), "samples": 1, "steps": 1, "metrics": {}, "parent": None,
                "sha256": hashlib.sha256(data).hexdigest()}
        r = httpx.post(f"{server.url}/v1/bases/{other.fingerprint}/devices/attacker/versions",
                       content=encode_push(meta, data), headers=fleet.auth("attacker"))
        assert r.status_code == 404 and "store add-base" in r.json()["detail"]  # no squatting by a first push
        r = httpx.post(f"{server.url}/v1/bases", json={"spec": other.adapter.to_dict()}, headers=fleet.auth("attacker"))
        assert r.status_code == 403
        assert snapshot(fleet.data) == before
        squat = {**SPEC.to_dict(), "rank": 64}
        r = fleet.push(server, "attacker", body_of(random_tensors(SPEC, np.random.default_rng(3)), spec=squat))
        assert r.status_code == 409 and "spec.rank is 64, the registered spec has 4" in r.json()["detail"]
        assert snapshot(fleet.data) == before
        # The admin registers; again with the same spec is a no-op, with another spec a 409 naming it.
        run = write_run(tmp_path / "artifact", other, tensors, samples=1)
        assert CliRunner().invoke(main, ["store", "add-base", str(run), "--store", server.url, "--admin-token",
                                         fleet.admin]).exit_code == 0
        again = CliRunner().invoke(main, ["store", "add-base", str(run / "manifest.json"), "--store", server.url,
                                          "--admin-token", fleet.admin])
        assert again.exit_code == 0 and "already registered" in again.output
        changed = {**other.adapter.to_dict(), "alpha": 1.0}
        r = httpx.post(f"{server.url}/v1/bases", json={"spec": changed}, headers=fleet.auth("admin"))
        assert r.status_code == 409 and "spec.alpha is 1.0" in r.json()["detail"]
        # Another device's pull of the base works (no crash on the spec).
        honest = write_run(tmp_path / "run", MANIFEST, random_tensors(SPEC, np.random.default_rng(4)), samples=5)
        assert CliRunner().invoke(main, ["push", str(honest), "--store", server.url, "--token",
                                         fleet.tokens["honest-1"]]).exit_code == 0
        pulled = CliRunner().invoke(main, ["pull", "--store", server.url, "--token", fleet.tokens["honest-1"],
                                           "--base", BASE, "--device", "honest-1", "--out", str(tmp_path / "p")])
        assert pulled.exit_code == 0, pulled.output


def test_admin_removes_devices_and_bases_and_rotates_or_revokes_tokens(fleet):
    rng = np.random.default_rng(5)
    admin = ["--store", "", "--admin-token", fleet.admin]
    with StoreServer(fleet.data) as server:
        admin[1] = server.url
        assert fleet.push(server, "attacker", body_of(random_tensors(SPEC, rng))).status_code == 201
        rotated = CliRunner().invoke(main, ["store", "rotate-token", "attacker", *admin])
        new_token = rotated.stdout.strip()
        assert rotated.exit_code == 0 and new_token.startswith("attacker.")
        url = f"{server.url}/v1/bases/{BASE}"
        assert httpx.get(url, headers=fleet.auth("attacker")).status_code == 401  # the old token is dead
        assert httpx.get(url, headers={"Authorization": f"Bearer {new_token}"}).status_code == 200
        assert CliRunner().invoke(main, ["store", "revoke-token", "attacker", *admin]).exit_code == 0
        assert httpx.get(url, headers={"Authorization": f"Bearer {new_token}"}).status_code == 401
        blobs_before = len(list((fleet.data / "blobs").rglob("*")))
        removed = CliRunner().invoke(main, ["store", "remove-device", "attacker", *admin])
        assert removed.exit_code == 0 and "1 files deleted" in removed.output
        assert len(list((fleet.data / "blobs").rglob("*"))) < blobs_before
        with sqlite3.connect(fleet.data / "store.sqlite3") as con:
            assert con.execute("SELECT COUNT(*) FROM versions WHERE device = 'attacker'").fetchone()[0] == 0
        assert CliRunner().invoke(main, ["store", "remove-device", "attacker", *admin]).exit_code == 2
        fleet.still_serves(server)
        assert CliRunner().invoke(main, ["store", "remove-base", BASE, *admin]).exit_code == 0
        assert not any(p.is_file() for p in (fleet.data / "blobs").rglob("*"))
        assert httpx.get(url, headers=fleet.auth("honest-1")).status_code == 404


# --- 3. robust aggregation ------------------------------------------------------------------------

def test_poisoned_push_leaves_the_global_finite_and_within_the_clipping_bound(fleet):
    rng = np.random.default_rng(6)
    honest = {d: random_tensors(SPEC, rng) for d in ("honest-1", "honest-2", "honest-3", "honest-4")}
    poison = {k: (np.full_like(v, 3e38) if "lora_B" in k or "score" in k else v)
              for k, v in random_tensors(SPEC, rng).items()}
    trained = [k for k in SPEC.expected_shapes(with_frozen=False) if "lora_B" in k]
    norm = lambda t: math.sqrt(sum(float(np.sum(np.square(t[k], dtype=np.float64))) for k in trained))
    with StoreServer(fleet.data) as server:
        for device, tensors in honest.items():
            assert fleet.push(server, device, body_of(tensors, samples=480)).status_code == 201
        before = snapshot(fleet.data)
        assert fleet.push(server, "attacker", body_of(poison, samples=2**63 - 1)).status_code == 400
        assert snapshot(fleet.data) == before
        assert fleet.push(server, "attacker", body_of(poison, samples=2**53 - 1)).status_code == 201
        r = fleet.aggregate(server)
        assert r.status_code == 201 and r.json()["report"]["clipped"] >= 1, r.text
        bound = r.json()["report"]["clip_bounds"]["adapter"]
        assert bound == pytest.approx(float(np.median([norm(t) for t in [*honest.values(), poison]])))
        tensors, _ = fleet.pull_global(server)
        assert all(np.all(np.isfinite(v)) for v in tensors.values())
        assert norm(tensors) <= bound * (1 + 1e-6)  # the mean of clipped adapters is within the bound
        assert fleet.aggregate(server, {"weighting": "samples", "clip_norm": "off"}).status_code == 200  # same inputs
        # Sample weighting on request caps the claimed 2^53 samples at 10 x the median device.
        assert fleet.push(server, "honest-1", body_of(random_tensors(SPEC, rng), samples=480)).status_code == 201
        r = fleet.aggregate(server, {"weighting": "samples"})
        assert r.status_code == 201, r.text
        tensors, _ = fleet.pull_global(server)
        assert all(np.all(np.isfinite(v)) for v in tensors.values()) and norm(tensors) <= bound * 1.1
        # The coordinate-wise median ignores the attacker entirely.
        assert fleet.push(server, "honest-2", body_of(random_tensors(SPEC, rng), samples=480)).status_code == 201
        assert fleet.aggregate(server, {"method": "median", "clip_norm": "off"}).status_code == 201
        tensors, _ = fleet.pull_global(server)
        assert max(float(np.max(np.abs(tensors[k]))) for k in trained) < 1.0
        fleet.still_serves(server)


# --- 4. no leak through the global ----------------------------------------------------------------

def test_the_global_version_does_not_reveal_a_devices_adapter(fleet):
    rng = np.random.default_rng(7)
    adapters = {d: random_tensors(SPEC, rng) for d in ("attacker", "victim-1", "victim-2")}
    samples = {"attacker": 10, "victim-1": 30, "victim-2": 50}
    with StoreServer(fleet.data) as server:
        for device in ("attacker", "victim-1"):
            assert fleet.push(server, device, body_of(adapters[device], samples[device])).status_code == 201
        r = fleet.aggregate(server)  # attacker + one victim: the global would be the victim's adapter
        assert r.status_code == 409 and "at least 3" in r.json()["detail"]
        assert httpx.get(f"{server.url}/v1/bases/{BASE}/global/latest", headers=fleet.auth("attacker")).status_code == 404
        assert fleet.push(server, "victim-2", body_of(adapters["victim-2"], samples["victim-2"])).status_code == 201
        assert fleet.aggregate(server).status_code == 201
        tensors, meta = fleet.pull_global(server, "attacker")
        assert meta["devices"] == 3 and not {"samples", "steps"} & set(meta)  # no sample counts
        assert not any(d in json.dumps(meta) for d in adapters)  # no device names
        key = lora_key(SPEC.modules[0].name, "B")
        own = adapters["attacker"][key]
        guesses = [3 * tensors[key] - own, (90 * tensors[key] - 10 * own) / 30]  # the reconstruction
        for guess in guesses:
            for victim in ("victim-1", "victim-2"):
                assert not np.allclose(guess, adapters[victim][key], atol=1e-3)


def test_parent_checks_are_no_oracle_for_other_devices_versions(fleet):
    rng = np.random.default_rng(8)
    with StoreServer(fleet.data) as server:
        assert fleet.push(server, "victim-1", body_of(random_tensors(SPEC, rng))).status_code == 201
        before = snapshot(fleet.data)
        answers = [fleet.push(server, "attacker", body_of(random_tensors(SPEC, rng), parent={
            "kind": "device", "device": "victim-1", "version": n})) for n in (1, 99)]  # exists, does not
        assert [a.status_code for a in answers] == [403, 403]
        assert answers[0].json() == answers[1].json()
        assert snapshot(fleet.data) == before
        fleet.still_serves(server)


# --- 5. clean answers -----------------------------------------------------------------------------

def malformed_requests(fleet: Fleet, url: str) -> dict[str, tuple]:
    """name -> (method, path, headers, body) of requests the store must refuse with a 4xx."""
    push = f"/v1/bases/{BASE}/devices/attacker/versions"
    auth = {**fleet.auth("attacker"), "Content-Type": PUSH_MEDIA_TYPE}
    admin = fleet.auth("admin")
    tensors = random_tensors(SPEC, np.random.default_rng(9))
    data = encode_adapter(SPEC, tensors)
    meta = {"spec": SPEC.to_dict(), "samples": 1, "steps": 1, "metrics": {}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}

    def with_meta(**change) -> bytes:
        return json.dumps({**meta, **change}).encode() + b"\n" + data

    return {
        "huge version number": ("GET", f"/v1/bases/{BASE}/global/{'9' * 5000}", admin, b""),
        "version past 2^53": ("GET", f"/v1/bases/{BASE}/global/{2**63}", admin, b""),
        "non-ASCII digits": ("GET", f"/v1/bases/{BASE}/global/\u0661\u0662", admin, b""),
        "samples >= 2^63": ("POST", push, auth, with_meta(samples=2**63)),
        "samples a string": ("POST", push, auth, with_meta(samples="10")),
        "list as task": ("POST", push, auth, with_meta(spec={**SPEC.to_dict(), "task": ["causal-lm"]})),
        "spec a list": ("POST", push, auth, with_meta(spec=[1, 2])),
        "deeply nested metadata": ("POST", push, auth, b"[" * 100_000 + b"]" * 100_000 + b"\n" + data),
        "deeply nested metrics": ("POST", push, auth, with_meta(metrics={"a": [[[[[[[[[[[1]]]]]]]]]]]})),
        "NaN in metrics": ("POST", push, auth, json.dumps({**meta, "metrics": {"loss": float("nan")}}).encode()
                           + b"\n" + data),
        "odd metadata": ("POST", push, auth, with_meta(metrics="fast", parent=[1])),
        "non-JSON metadata": ("POST", push, auth, b"\xff\xfe\n" + data),
        "parent version past 2^53": ("POST", push, auth, with_meta(parent={"kind": "global", "version": 2**64})),
        "trailing newline in device id": ("POST", "/v1/devices", admin, b'{"id": "phone\\n"}'),
        "device id a list": ("POST", "/v1/devices", admin, b'{"id": ["phone"]}'),
        "nested JSON for a device": ("POST", "/v1/devices", admin, b"[" * 20_000),
        "newline in path id": ("POST", f"/v1/bases/{BASE}/devices/attacker%0A/versions", auth, with_meta()),
        "fingerprint with newline": ("GET", f"/v1/bases/{BASE}%0A", admin, b""),
        "bad aggregation policy": ("POST", f"/v1/bases/{BASE}/aggregates", admin, b'{"clip_norm": -1}'),
        "aggregation policy not JSON": ("POST", f"/v1/bases/{BASE}/aggregates", admin, b"{"),
        "base spec not an object": ("POST", "/v1/bases", admin, b'{"spec": "x"}'),
        "base spec with odd types": ("POST", "/v1/bases", admin,
                                     json.dumps({"spec": {**SPEC.to_dict(), "modules": [{"name": 1}]}}).encode()),
        "bad Authorization scheme": ("GET", f"/v1/bases/{BASE}", {"Authorization": "Basic eDp5"}, b""),
        "token with odd bytes": ("GET", f"/v1/bases/{BASE}", {"Authorization": "Bearer é.\xff".encode()}, b""),
    }


def test_every_malformed_request_gets_a_4xx_with_a_one_line_reason(fleet):
    with StoreServer(fleet.data) as server:
        before = snapshot(fleet.data)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for name, (method, path, headers, body) in malformed_requests(fleet, server.url).items():
                r = http.request(method, path, headers=headers, content=body)
                assert 400 <= r.status_code < 500 and r.status_code != 429, f"{name}: {r.status_code} {r.text[:300]}"
                detail = r.json()["detail"]
                assert isinstance(detail, str) and detail and "\n" not in detail, f"{name}: {detail!r}"
        assert snapshot(fleet.data) == before
        assert "Traceback" not in server.log.read_text()
        fleet.still_serves(server)


def test_nan_metrics_are_refused_before_queueing_and_invalid_pushes_leave_the_outbox(fleet, tmp_path):
    rng = np.random.default_rng(10)
    run = write_run(tmp_path / "run", MANIFEST, random_tensors(SPEC, rng), samples=5)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "final_loss": float("nan")}))
    with StoreServer(fleet.data) as server:
        token = fleet.tokens["honest-1"]
        result = CliRunner().invoke(main, ["push", str(run), "--store", server.url, "--token", token])
        assert result.exit_code == 2 and "final_loss is nan" in result.output and "diverged" in result.output
        assert not (run / "outbox").exists()
        # A push the store refuses as invalid (another base's spec) is queued before a good one: the sync
        # delivers the good one and moves the bad one out of the outbox with the store's reason.
        other = make_manifest(fingerprint="sha256:" + "d" * 64)
        bad = write_run(tmp_path / "bad", other, random_tensors(other.adapter, rng), samples=5)
        from edge_peft.store.client import build_push, enqueue

        for source in (bad, run):
            (run / "summary.json").write_text(json.dumps(summary))
            base, meta, data = build_push(source)
            enqueue(run, base, meta, data, server.url)
        result = CliRunner().invoke(main, ["sync", str(run), "--token", token, "--attempts", "1"])
        assert result.exit_code == 2 and "pushed version 1" in result.output, result.output
        assert "refused 1 adapter(s)" in result.output and "404" in result.output
        assert [p for p in (run / "outbox").iterdir() if not p.name.startswith(".")] == []
        (refused,) = list((run / "refused").iterdir())
        assert json.loads((refused / "refusal.json").read_text())["status"] == 404
        again = CliRunner().invoke(main, ["sync", str(run), "--token", token, "--store", server.url])
        assert again.exit_code == 0 and "outbox empty (0 sent)" in again.output  # not retried forever


def test_full_disk_answers_507_and_leaves_nothing_behind(fleet):
    big = make_manifest(labels=3, hidden=4096, fingerprint="sha256:" + "e" * 64).adapter
    store, _ = AdapterStore.open(fleet.data)
    store.add_base(big.to_dict())
    store.close()
    data = encode_adapter(big, random_tensors(big, np.random.default_rng(11)))  # 0.55 MiB
    meta = {"spec": big.to_dict(), "samples": 1, "steps": 1, "metrics": {}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}
    with StoreServer(fleet.data, max_file_bytes=256 << 10) as server:  # no file over 256 KiB can be written
        before = snapshot(fleet.data)
        r = httpx.post(f"{server.url}/v1/bases/{big.base_fingerprint}/devices/honest-1/versions",
                       content=encode_push(meta, data), headers=fleet.auth("honest-1"))
        assert r.status_code == 507 and "free disk space" in r.json()["detail"], r.text
        assert snapshot(fleet.data) == before  # no blob, no temp file, no empty folder
        fleet.still_serves(server)  # a small push still fits


def test_interrupted_uploads_and_leftovers_are_removed_at_startup(fleet):
    server = StoreServer(fleet.data).start()
    before = snapshot(fleet.data)
    body = body_of(random_tensors(SPEC, np.random.default_rng(12)))
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST /v1/bases/{BASE}/devices/honest-1/versions HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {fleet.tokens['honest-1']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body[: len(body) // 2])
    server.kill()
    sock.close()
    assert snapshot(fleet.data) == before
    # What a process killed mid-write leaves: a temp file, and a blob whose version was never recorded.
    leftover_dir = fleet.data / "blobs" / "ab"
    leftover_dir.mkdir()
    (leftover_dir / ".cdef.123.tmp").write_bytes(b"partial")
    orphan = hashlib.sha256(b"orphan").hexdigest()
    (fleet.data / "blobs" / orphan[:2]).mkdir(exist_ok=True)
    (fleet.data / "blobs" / orphan[:2] / orphan[2:]).write_bytes(b"orphan")
    with StoreServer(fleet.data) as server:
        assert snapshot(fleet.data) == before
        fleet.still_serves(server)


def test_the_data_directory_is_private(tmp_path):
    fleet = Fleet(tmp_path)
    with StoreServer(fleet.data) as server:
        fleet.still_serves(server)
        mode = lambda p: stat.S_IMODE(p.stat().st_mode)
        assert mode(fleet.data) == 0o700
        with sqlite3.connect(fleet.data / "store.sqlite3") as con:  # an open reader keeps -wal and -shm in place
            con.execute("SELECT COUNT(*) FROM devices").fetchone()
            files = [p for p in fleet.data.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"store.sqlite3", "store.sqlite3-wal", "store.sqlite3-shm", "store.lock"}
        assert {str(p): mode(p) for p in files if mode(p) != 0o600} == {}
        assert {str(p): mode(p) for p in fleet.data.rglob("*") if p.is_dir() and mode(p) != 0o700} == {}
