"""The store over real HTTP: a uvicorn subprocess on 127.0.0.1, the httpx client and the click commands."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from edge_peft.artifact.files import ADAPTER_CONFIG as CONFIG_NAME
from edge_peft.artifact.files import ADAPTER_WEIGHTS as WEIGHTS_NAME
from edge_peft.adapters.peft_format import encode_adapter, load_adapter
from edge_peft.adapters.ranks import NESTED_KEY, nested_gain
from edge_peft.artifact.names import PEFT_PREFIX, lora_key
from edge_peft.store.__main__ import main
from edge_peft.store.client import build_push
from edge_peft.store.service import AdapterStore
from edge_peft.store.local_server import StoreServer
from edge_peft.store.testing import make_manifest, random_tensors, write_run
from edge_peft.store.wire import PUSH_MEDIA_TYPE, encode_push

DEVICES = ("phone-1", "phone-2", "phone-a", "phone-b", "phone-c", "tablet-1")
BASES = {  # the bases the admin registered, one per test (a digit as fingerprint)
    "1": make_manifest(labels=3, fingerprint="sha256:" + "1" * 64),
    "2": make_manifest(fingerprint="sha256:" + "2" * 64),
    "3": make_manifest(fingerprint="sha256:" + "3" * 64),
    "4": make_manifest(layers=3, labels=4, fingerprint="sha256:" + "4" * 64),
    "5": make_manifest(variant="lora", fingerprint="sha256:" + "5" * 64),
    "6": make_manifest(layers=2, hidden=256, rank=4, fingerprint="sha256:" + "6" * 64),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A running store (1 MiB body limit) with registered devices and bases; yields (server, admin token,
    device tokens)."""
    data = tmp_path_factory.mktemp("store") / "data"
    store, admin = AdapterStore.open(data)
    tokens = {d: store.add_device(d) for d in DEVICES}
    for manifest in BASES.values():
        store.add_base(manifest.adapter.to_dict())
    with StoreServer(data, max_body_mb=1.0) as server:
        yield server, admin, tokens


def cli(*args: str) -> "CliRunner.invoke":
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def snapshot(data_dir: Path) -> tuple:
    """Every metadata row and every blob file: equal snapshots mean nothing was stored or changed."""
    with sqlite3.connect(data_dir / "store.sqlite3") as con:
        rows = tuple(tuple(con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall())
                     for t in ("bases", "devices", "versions", "aggregates", "aggregate_inputs", "settings"))
    return rows, tuple(sorted(str(p) for p in (data_dir / "blobs").rglob("*")))


def version_count(data_dir: Path) -> int:
    return len(snapshot(data_dir)[0][2])


def test_openapi_docs_are_served(env):
    server, _, _ = env
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/v1/bases/{base}/devices/{device}/versions" in paths and "/v1/bases/{base}/aggregates" in paths


@pytest.mark.parametrize("mode", ["--full", "--b-only"])
def test_push_pull_round_trip_is_identical_and_loadable(env, tmp_path, mode):
    server, _, tokens = env
    manifest = BASES["1"]
    spec = manifest.adapter
    tensors = random_tensors(spec, np.random.default_rng(len(mode)))
    run = write_run(tmp_path / "run", manifest, tensors, samples=40)
    before = version_count(server.data_dir)
    result = cli("push", str(run), "--store", server.url, "--token", tokens["phone-1"], mode)
    assert result.exit_code == 0, result.output
    assert "pushed version" in result.output and version_count(server.data_dir) == before + 1
    out = tmp_path / "pulled"
    result = cli("pull", "--store", server.url, "--token", tokens["phone-1"], "--base", manifest.fingerprint,
                 "--device", "phone-1", "--out", str(out))
    assert result.exit_code == 0, result.output
    if mode == "--full":  # B-only: the store rebuilds A and re-encodes, so only the tensors are identical
        assert (out / WEIGHTS_NAME).read_bytes() == (run / "adapter" / WEIGHTS_NAME).read_bytes()
    assert json.loads((out / CONFIG_NAME).read_text())["r"] == spec.rank
    loaded = load_adapter(out, spec)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value)
    pulled = json.loads((out / "pulled.json").read_text())
    assert pulled["kind"] == "device" and pulled["device"] == "phone-1"
    # Same content again (whether full or B only): the existing version, no new one.
    for again in ("--full", "--b-only"):
        result = cli("push", str(run), "--store", server.url, "--token", tokens["phone-1"], again)
        assert result.exit_code == 0 and "already stored as version" in result.output, result.output
    assert version_count(server.data_dir) == before + 1
    assert not any((run / "outbox").iterdir())


def test_pull_answers_304_when_the_etag_matches(env, tmp_path):
    server, _, tokens = env
    manifest = BASES["2"]
    spec = manifest.adapter
    run = write_run(tmp_path / "run", manifest, random_tensors(spec, np.random.default_rng(5)), samples=8)
    assert cli("push", str(run), "--store", server.url, "--token", tokens["phone-2"]).exit_code == 0
    url = f"{server.url}/v1/bases/{manifest.fingerprint}/devices/phone-2/versions/latest"
    auth = {"Authorization": f"Bearer {tokens['phone-2']}"}
    first = httpx.get(url, headers=auth)
    assert first.status_code == 200 and first.headers["ETag"] == f'"{hashlib.sha256(first.content).hexdigest()}"'
    again = httpx.get(url, headers={**auth, "If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    out = tmp_path / "out"
    args = ("pull", "--store", server.url, "--token", tokens["phone-2"], "--base", manifest.fingerprint,
            "--device", "phone-2", "--out", str(out))
    assert "pulled device phone-2 version 1" in cli(*args).output
    assert "up to date" in cli(*args).output
    other = httpx.get(url.replace("phone-2", "phone-1"), headers=auth)
    assert other.status_code == 403  # a device reads only its own adapters
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("mine")
    result = cli(*args[:-1], str(tmp_path / "occupied"))
    assert result.exit_code == 2 and "not written by `edge-peft pull`" in result.output
    assert (tmp_path / "occupied" / "keep.txt").read_text() == "mine"


class Push:
    """A valid push request for phone-1 (fresh content each time), to be spoiled one way per test."""

    def __init__(self, server: StoreServer, token: str, seed: int) -> None:
        self.manifest = BASES["3"]
        self.spec = self.manifest.adapter
        self.tensors = random_tensors(self.spec, np.random.default_rng(seed))
        self.device, self.token, self.server = "phone-1", token, server
        self.fingerprint = self.manifest.fingerprint

    def data(self) -> bytes:
        return encode_adapter(self.spec, self.tensors)

    def meta(self, data: bytes) -> dict:
        return {"spec": self.spec.to_dict(), "samples": 12, "steps": 4, "metrics": {"final_loss": 1.0},
                "parent": None, "sha256": hashlib.sha256(data).hexdigest()}

    def send(self, body: bytes | None = None, token: str | None = "default", device: str | None = None) -> httpx.Response:
        if body is None:
            data = self.data()
            body = encode_push(self.meta(data), data)
        token = self.token if token == "default" else token
        headers = {"Content-Type": PUSH_MEDIA_TYPE, **({"Authorization": f"Bearer {token}"} if token else {})}
        path = f"/v1/bases/{self.fingerprint}/devices/{device or self.device}/versions"
        return httpx.post(self.server.url + path, content=body, headers=headers)


def _with(push: Push, mutate) -> bytes:
    data = push.data()
    meta = push.meta(data)
    data, meta = mutate(push, data, meta)
    return encode_push(meta, data)


def _wrong_shapes(p, data, meta):
    key = lora_key(p.spec.modules[0].name, "B")
    p.tensors[key] = np.zeros((p.spec.modules[0].out_features + 1, p.spec.rank), np.float32)
    data = p.data()
    return data, p.meta(data)


def _nan(p, data, meta):
    p.tensors[lora_key(p.spec.modules[1].name, "B")][0, 0] = np.nan
    data = p.data()
    return data, p.meta(data)


def _pickle(p, data, meta):
    fake = pickle.dumps({k: v.tolist() for k, v in p.tensors.items()})
    return fake, {**meta, "sha256": hashlib.sha256(fake).hexdigest()}


def _other_spec(p, data, meta):
    spec = p.spec.to_dict()
    spec["alpha"] = spec["alpha"] * 2  # same base, other export settings
    return data, {**meta, "spec": spec}


REFUSALS = {
    "missing token": (401, lambda p: p.send(token=None)),
    "wrong token": (401, lambda p: p.send(token=p.token[:-4] + "AAAA")),
    "another device's id": (403, lambda p: p.send(device="phone-2")),
    "oversize body": (413, lambda p: p.send(body=b"{}\n" + b"\0" * (3 << 19))),
    "bad sha256": (400, lambda p: p.send(_with(p, lambda p, d, m: (d, {**m, "sha256": "0" * 64})))),
    "wrong shapes": (422, lambda p: p.send(_with(p, _wrong_shapes))),
    "NaN values": (422, lambda p: p.send(_with(p, _nan))),
    "pickle disguised as safetensors": (422, lambda p: p.send(_with(p, _pickle))),
    "spec differs from the base's": (409, lambda p: p.send(_with(p, _other_spec))),
    "unknown parent": (422, lambda p: p.send(_with(p, lambda p, d, m: (d, {**m, "parent": {"kind": "global", "version": 9}})))),
    "traversal in device id": (400, lambda p: p.send(device="%2E%2E")),
    "traversal in base id": (400, lambda p: setattr(p, "fingerprint", "sha256:..") or p.send()),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_pushes_store_nothing(env, case):
    server, _, tokens = env
    status, send = REFUSALS[case]
    first = Push(server, tokens["phone-1"], seed=100)
    assert first.send().status_code in (200, 201)  # the base exists, so spec checks apply
    before = snapshot(server.data_dir)
    response = send(Push(server, tokens["phone-1"], seed=101 + list(REFUSALS).index(case)))
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert snapshot(server.data_dir) == before
    # Not vacuous: the same request unspoiled is accepted.
    assert Push(server, tokens["phone-1"], seed=101 + list(REFUSALS).index(case)).send().status_code == 201


def test_admin_actions_need_the_admin_token(env):
    server, admin, tokens = env
    before = snapshot(server.data_dir)
    device_auth = {"Authorization": f"Bearer {tokens['phone-1']}"}
    assert httpx.post(f"{server.url}/v1/devices", json={"id": "rogue"}, headers=device_auth).status_code == 403
    assert httpx.post(f"{server.url}/v1/devices", json={"id": "rogue"}).status_code == 401
    fp = "sha256:" + "3" * 64
    assert httpx.post(f"{server.url}/v1/bases/{fp}/aggregates", headers=device_auth).status_code == 403
    admin_auth = {"Authorization": f"Bearer {admin}"}
    assert httpx.post(f"{server.url}/v1/devices", json={"id": "../../etc"}, headers=admin_auth).status_code == 400
    assert snapshot(server.data_dir) == before
    result = cli("store", "add-device", "laptop-9", "--store", server.url, "--admin-token", admin)
    token = result.stdout.strip()
    assert result.exit_code == 0 and token.startswith("laptop-9.") and len(token) > 40
    assert httpx.get(f"{server.url}/v1/bases/{fp}", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    result = cli("store", "add-device", "laptop-9", "--store", server.url, "--admin-token", admin)
    assert result.exit_code == 2 and "already registered" in result.output


def test_aggregate_with_sample_weighting_is_the_sample_weighted_mean_of_each_devices_latest(env, tmp_path):
    """Opt-in sample weighting without clipping is exactly FedAvg; the default (equal weights, clipping at the
    median norm) is tested in test_store_attacks.py."""
    server, admin, tokens = env
    manifest = BASES["4"]
    spec = manifest.adapter
    rng = np.random.default_rng(11)
    samples = {"phone-a": 10, "phone-b": 30, "phone-c": 60}
    stale = write_run(tmp_path / "stale", manifest, random_tensors(spec, rng), samples=1000)
    assert cli("push", str(stale), "--store", server.url, "--token", tokens["phone-a"]).exit_code == 0
    latest = {}
    for device, n in samples.items():
        latest[device] = random_tensors(spec, rng)
        run = write_run(tmp_path / device, manifest, latest[device], samples=n)
        assert cli("push", str(run), "--store", server.url, "--token", tokens[device]).exit_code == 0
    agg = ("store", "aggregate", "--base", manifest.fingerprint, "--store", server.url, "--weighting", "samples",
           "--clip-norm", "off")
    assert cli(*agg, "--admin-token", tokens["phone-a"]).exit_code == 2  # a device token cannot aggregate
    result = cli(*agg, "--admin-token", admin)
    assert result.exit_code == 0 and "global version 1: 3 device(s), 100 samples" in result.output, result.output
    assert "nothing new" in cli(*agg, "--admin-token", admin).output
    out = tmp_path / "global"
    result = cli("pull", "--store", server.url, "--token", tokens["phone-b"], "--base", manifest.fingerprint,
                 "--global", "--out", str(out))
    assert result.exit_code == 0, result.output
    merged = load_adapter(out, spec)
    total = sum(samples.values())
    trained = [lora_key(m.name, "B") for m in spec.modules] + [PEFT_PREFIX + t.name for t in spec.modules_to_save]
    for key in trained:
        expected = sum(np.float64(n) * latest[d][key] for d, n in samples.items()) / total
        np.testing.assert_allclose(merged[key], expected, rtol=1e-6, atol=1e-9)
        assert not np.allclose(merged[key], latest["phone-a"][key])
    for m in spec.modules:
        np.testing.assert_array_equal(merged[lora_key(m.name, "A")], latest["phone-a"][lora_key(m.name, "A")])
    # A device continues from the global version and pushes with it as parent.
    assert json.loads((out / "pulled.json").read_text())["version"] == 1
    child = write_run(tmp_path / "child", manifest, random_tensors(spec, rng), samples=5,
                      parent={"kind": "global", "version": 1})
    result = cli("push", str(child), "--store", server.url, "--token", tokens["phone-b"])
    assert result.exit_code == 0 and "pushed version 2 of device phone-b" in result.output
    assert "global version 2: 3 device(s), 75 samples" in cli(*agg, "--admin-token", admin).output


def test_plain_lora_adapters_are_stored_but_not_averaged(env, tmp_path):
    server, admin, tokens = env
    manifest = BASES["5"]
    spec = manifest.adapter
    run = write_run(tmp_path / "run", manifest, random_tensors(spec, np.random.default_rng(3)), samples=3)
    assert cli("push", str(run), "--store", server.url, "--token", tokens["tablet-1"], "--b-only").exit_code == 2
    assert cli("push", str(run), "--store", server.url, "--token", tokens["tablet-1"]).exit_code == 0
    before = snapshot(server.data_dir)
    result = cli("store", "aggregate", "--base", manifest.fingerprint, "--store", server.url, "--admin-token", admin)
    assert result.exit_code == 2 and "not the average of their updates" in result.output
    assert snapshot(server.data_dir) == before


def test_heterogeneous_ranks_push_compact_and_average_exactly(env, tmp_path):
    """An adaptive-rank device (pruned channels = zero columns) and a nested-rank device pushing only its
    first 2 channels: the store expands the compact push, and the average of the B's is exactly the
    average of the weight updates B·A because every LoRA-FA device shares every row of A."""
    server, admin, tokens = env
    manifest = BASES["6"]
    spec = manifest.adapter
    rng = np.random.default_rng(5)
    pruned = random_tensors(spec, rng)
    for m in spec.modules:
        pruned[lora_key(m.name, "B")][:, [1, 3]] = 0  # channels an adaptive run dropped
    nested = random_tensors(spec, rng)
    runs = {"phone-a": write_run(tmp_path / "a", manifest, pruned, samples=30),
            "phone-b": write_run(tmp_path / "b", manifest, nested, samples=10, meta={NESTED_KEY: True})}
    refused = cli("push", str(runs["phone-a"]), "--rank", "2", "--store", server.url, "--token", tokens["phone-a"])
    assert refused.exit_code == 2 and "trained with --nested-ranks" in refused.output  # its prefixes are no adapter
    assert cli("push", str(runs["phone-a"]), "--store", server.url, "--token", tokens["phone-a"]).exit_code == 0
    b_only, compact = build_push(runs["phone-b"])[2], build_push(runs["phone-b"], rank=2)[2]
    assert len(compact) < 0.6 * len(b_only)  # half the channels: about half the upload
    result = cli("push", str(runs["phone-b"]), "--rank", "2", "--store", server.url, "--token", tokens["phone-b"])
    assert result.exit_code == 0, result.output
    result = cli("store", "aggregate", "--base", manifest.fingerprint, "--store", server.url, "--admin-token", admin,
                 "--min-devices", "2", "--weighting", "samples", "--clip-norm", "off")
    assert result.exit_code == 0, result.output
    out = tmp_path / "global"
    assert cli("pull", "--store", server.url, "--token", tokens["phone-a"], "--base", manifest.fingerprint,
               "--global", "--out", str(out)).exit_code == 0
    merged = load_adapter(out, spec)
    truncated = {k: v.copy() for k, v in nested.items()}
    for m in spec.modules:
        truncated[lora_key(m.name, "B")][:, 2:] = 0
        truncated[lora_key(m.name, "B")] *= np.float32(nested_gain(4, 2))  # the rank-2 adapter's own scale
    for m in spec.modules:
        a, b = lora_key(m.name, "A"), lora_key(m.name, "B")
        expected_update = (30 * pruned[b] @ pruned[a] + 10 * truncated[b] @ truncated[a]) / 40
        np.testing.assert_allclose(merged[b] @ merged[a], expected_update, rtol=1e-5, atol=1e-8)


def test_idle_connections_stay_open_as_long_as_keep_alive_says(tmp_path):
    """`serve --keep-alive S` is how long an idle connection stays open (the default, 75 s, outlasts a load
    balancer's idle timeout): a request on a kept connection within it is answered, and the store closes the
    connection once it has been idle longer."""
    AdapterStore.open(tmp_path / "data")[0].close()
    with StoreServer(tmp_path / "data", options={"--keep-alive": 2}) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            for idle in (0.0, 1.0):  # within the keep-alive: the same connection answers again
                time.sleep(idle)
                sock.sendall(request)
                assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(3.5)
            sock.settimeout(1.0)  # uvicorn's own default (5 s) would still hold it open: recv would time out
            assert sock.recv(65536) == b""  # idle past it: closed by the store


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response from ``sock`` (however the segments arrive); returns its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the store closed the connection mid-response"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head
