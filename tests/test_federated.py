"""Flower integration: a round on Flower's simulation engine against the store's aggregation and PyTorch."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edge_peft.adapters.peft_format import decode_adapter, encode_adapter, load_adapter
from edge_peft.artifact.manifest import load_manifest
from edge_peft.artifact.names import lora_key, peft_key
from edge_peft.backends import initial_trainable
from edge_peft.federated.device_round import train_round, trained_shapes
from edge_peft.federated.settings import FederatedSettings
from edge_peft.store.aggregate import AggregationPolicy
from edge_peft.store.auth import ADMIN_TOKEN_ENV
from edge_peft.store.client import StoreClient, pull
from edge_peft.store.local_server import StoreServer
from edge_peft.store.service import AdapterStore

SIZES = (16, 32, 48)  # examples per client: FedAvg weighs them 1:2:3


def split(data, root):
    rows = [json.loads(line) for line in data["cls"].read_text().splitlines()]
    root.mkdir()
    start = 0
    for i, size in enumerate(SIZES):
        (root / f"client-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + size]))
        start += size
    return root


def store_average(tmp_path, spec, adapters):
    """The store's global version of ``adapters`` (tensors, samples), pushed and aggregated as devices would."""
    store, _ = AdapterStore.open(tmp_path / "store")
    try:
        store.add_base(spec.to_dict())
        for i, (tensors, samples) in enumerate(adapters):
            store.add_device(f"phone-{i}")
            data = encode_adapter(spec, tensors)
            meta = {"spec": spec.to_dict(), "samples": samples, "steps": 2, "metrics": {}, "parent": None,
                    "sha256": hashlib.sha256(data).hexdigest()}
            store.push(spec.base_fingerprint, f"phone-{i}", meta, data)
        record, _, _ = store.aggregate(spec.base_fingerprint, AggregationPolicy(weighting="samples", clip_norm="off"))
        return decode_adapter(store.blobs.get(record.full_sha256))[0]
    finally:
        store.close()


@pytest.mark.slow
def test_a_flower_round_of_three_clients_averages_as_the_store_and_as_pytorch(artifacts, data, tmp_path, monkeypatch):
    import torch

    from edge_peft.federated.simulation import simulate

    artifact = artifacts("bert", "int8")
    manifest = load_manifest(artifact)
    spec = manifest.adapter
    home, admin = AdapterStore.open(tmp_path / "home")  # the global adapter's home: the server pushes each round
    device_token = home.add_device("phone-9")
    home.add_base(spec.to_dict())
    home.close()
    monkeypatch.setenv(ADMIN_TOKEN_ENV, admin)
    with StoreServer(tmp_path / "home") as server:
        settings = FederatedSettings(artifact=str(artifact), data_dir=str(split(data, tmp_path / "clients")),
                                     rounds=1, local_steps=2, batch_size=4, max_seq_len=32,
                                     out=str(tmp_path / "server"), store=server.url)
        history = simulate(settings, clients=3, parallel=2)
        with StoreClient(server.url, device_token) as client:  # a device pulls the round's global as any other
            assert pull(client, spec.base_fingerprint, tmp_path / "pulled")["version"] == 1
    assert [h["round"] for h in history] == [0, 1] and history[1]["devices"] == 3
    assert history[1]["num-examples"] == sum(SIZES) and history[1]["refused"] == 0
    assert history[1]["store-version"] == 1
    flower = load_adapter(tmp_path / "server" / "round-1", spec)
    pulled = load_adapter(tmp_path / "pulled", spec)
    for key, value in flower.items():
        np.testing.assert_array_equal(pulled[key], value)

    # the same three devices' round, trained again here (deterministic on one thread), through the store
    start = {peft_key(n): v for n, v in initial_trainable(artifact, manifest).items()}
    updates = [train_round(settings, tmp_path / "clients" / f"client-{i}.jsonl", spec.base_fingerprint, start, 1, 1)
               for i in range(3)]
    assert [u.examples for u in updates] == list(SIZES)
    store = store_average(tmp_path, spec, [(u.tensors, u.examples) for u in updates])
    for key in trained_shapes(spec):
        assert np.abs(flower[key]).max() > 0
        np.testing.assert_allclose(flower[key], store[key], rtol=0, atol=1e-6)

    # PyTorch: the mean of the devices' weight updates (alpha/r) B_i A equals the update of the averaged B
    weights = torch.tensor(SIZES, dtype=torch.float64) / sum(SIZES)
    for m in spec.modules:
        a = torch.from_numpy(flower[lora_key(m.name, "A")]).double()
        b_key = lora_key(m.name, "B")
        per_device = torch.stack([spec.scaling * torch.from_numpy(u.tensors[b_key]).double() @ a for u in updates])
        expected = (weights[:, None, None] * per_device).sum(0)
        got = spec.scaling * torch.from_numpy(flower[b_key]).double() @ a
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop(procs) -> None:
    """Terminate the processes this test started and the children they spawned (Flower's SuperExec)."""
    import psutil

    def gone_or(action, default=None):  # any of them may exit on its own while we look
        try:
            return action()
        except psutil.NoSuchProcess:
            return default

    started = [q for p in procs if p.poll() is None and (q := gone_or(lambda: psutil.Process(p.pid)))]
    family = started + [c for p in started for c in gone_or(lambda: p.children(recursive=True), [])]
    for p in family:
        gone_or(p.terminate)
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        gone_or(p.kill)


@pytest.mark.slow
def test_real_superlink_and_supernodes_on_loopback_train_int8_and_a_rank_prefix(artifacts, data, tmp_path):
    """flower-superlink, two flower-supernode processes (one sends a rank-2 prefix) and `flwr run`, over loopback."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    artifact = artifacts("bert", "int8")
    clients = split(data, tmp_path / "clients")
    link, *node_ports = free_ports(3)
    app, home, out = tmp_path / "app", tmp_path / "flwr-home", tmp_path / "server"
    app.mkdir()
    home.mkdir()
    (app / "pyproject.toml").write_text(f"""
[project]
name = "edgepefttest"
version = "1.0.0"

[tool.flwr.app]
publisher = "edgepeft"

[tool.flwr.app.components]
serverapp = "edge_peft.federated.apps:server"
clientapp = "edge_peft.federated.apps:client"

[tool.flwr.app.config]
artifact = "{artifact}"
rounds = 1
local-steps = 2
batch-size = 4
max-seq-len = 32
encoding = "int8"
min-clients = 2
out = "{out}"
""")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    procs = [subprocess.Popen([bin_dir / "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                               "--database", str(tmp_path / "link.db")], **quiet)]
    try:
        for i, (port, rank) in enumerate(zip(node_ports, (4, 2))):
            procs.append(subprocess.Popen(
                [bin_dir / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                 "--node-config", f"data='{clients / f'client-{i}.jsonl'}' rank={rank}"], **quiet))
        submitted = None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            if submitted is None or submitted.returncode != 0:  # the SuperLink may not listen yet
                submitted = subprocess.run([bin_dir / "flwr", "run", str(app), "local"], capture_output=True,
                                           text=True, env=env, timeout=60)
            history = out / "history.json"
            if history.is_file() and len(json.loads(history.read_text())) == 2:
                break
            time.sleep(1)
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
        rounds = json.loads((out / "history.json").read_text())
    finally:
        stop(procs)
    assert rounds[1]["devices"] == 2 and rounds[1]["refused"] == 0
    assert rounds[1]["num-examples"] == SIZES[0] + SIZES[1]
    assert rounds[1]["bytes-up"] < 0.3 * 4 * sum(np.prod(s) for s in trained_shapes(
        load_manifest(artifact).adapter).values())  # int8, and one device sent half the rank
    spec = load_manifest(artifact).adapter
    merged = load_adapter(out / "round-1", spec)
    for m in spec.modules:
        b = merged[lora_key(m.name, "B")]
        assert np.abs(b[:, :2]).max() > 0 and np.abs(b[:, 2:]).max() > 0  # channels 2, 3 come from device 0 alone
