"""SIGKILL the server in the middle of uploads, restart it: acknowledged versions intact, nothing partial."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from edge_peft.artifact.adapter_section import AdapterSpec
from edge_peft.adapters.peft_format import decode_adapter, encode_adapter
from edge_peft.store.service import AdapterStore, content_digest
from edge_peft.store.local_server import StoreServer
from edge_peft.store.testing import make_manifest, random_tensors
from edge_peft.store.wire import PUSH_MEDIA_TYPE, encode_push

pytestmark = pytest.mark.slow  # six devices push for seconds before the kill

DEVICES = [f"dev-{i}" for i in range(6)]
PER_DEVICE = 40


def body(spec: AdapterSpec, tensors: dict, samples: int) -> bytes:
    data = encode_adapter(spec, tensors)
    meta = {"spec": spec.to_dict(), "samples": samples, "steps": 1, "metrics": {}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}
    return encode_push(meta, data)


def test_sigkill_mid_upload_leaves_only_complete_acknowledged_versions(tmp_path):
    data_dir = tmp_path / "store"
    store, _ = AdapterStore.open(data_dir)
    tokens = {d: store.add_device(d) for d in DEVICES}
    manifest = make_manifest(layers=4, hidden=512, rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    spec = manifest.adapter
    store.add_base(spec.to_dict())
    adapters = {d: [random_tensors(spec, np.random.default_rng([i, k])) for k in range(PER_DEVICE)]
                for i, d in enumerate(DEVICES)}
    url_of = lambda server, d: f"{server.url}/v1/bases/{spec.base_fingerprint}/devices/{d}/versions"
    acks: list[tuple[str, int, dict]] = []
    attempted = {d: 0 for d in DEVICES}
    interrupted, failures = [], []
    stop = threading.Event()

    def pusher(device: str, server: StoreServer) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {tokens[device]}", "Content-Type": PUSH_MEDIA_TYPE},
                          timeout=30) as http:
            for k, tensors in enumerate(adapters[device]):
                if stop.is_set():
                    return
                attempted[device] = k + 1
                try:
                    response = http.post(url_of(server, device), content=body(spec, tensors, k + 1))
                except httpx.TransportError:
                    interrupted.append(device)
                    return
                if response.status_code != 201:
                    failures.append(f"{device} #{k}: {response.status_code} {response.text}")
                    return
                acks.append((device, k, response.json()))

    server = StoreServer(data_dir, max_body_mb=16).start()
    threads = [threading.Thread(target=pusher, args=(d, server)) for d in DEVICES]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acks) < 3 * len(DEVICES) and time.monotonic() < deadline:
        time.sleep(0.01)
    # One upload certainly in flight: headers and half of the declared body sent, the rest never.
    partial = body(spec, random_tensors(spec, np.random.default_rng(999)), 1)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST /v1/bases/{spec.base_fingerprint}/devices/dev-0/versions HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {tokens['dev-0']}\r\nContent-Type: {PUSH_MEDIA_TYPE}\r\n"
                 f"Content-Length: {len(partial)}\r\n\r\n".encode() + partial[: len(partial) // 2])
    time.sleep(0.05)
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    sock.close()
    assert not failures
    assert len(acks) >= 3 * len(DEVICES) and interrupted, "the kill must land while devices are uploading"

    with StoreServer(data_dir, max_body_mb=16) as server:
        # Every acknowledged version is intact and served byte-exactly.
        for device, k, ack in acks:
            response = httpx.get(f"{url_of(server, device)}/{ack['number']}",
                                 headers={"Authorization": f"Bearer {tokens[device]}"})
            assert response.status_code == 200
            assert hashlib.sha256(response.content).hexdigest() == ack["full_sha256"]
            assert content_digest(spec, decode_adapter(response.content)[0]) == content_digest(spec, adapters[device][k])
        # Every stored version is complete: its blobs verify, numbers have no gaps, and version n is adapter n-1.
        reopened, _ = AdapterStore.open(data_dir)
        for device in DEVICES:
            versions = reopened.metadata.versions(spec.base_fingerprint, device)
            assert [v.number for v in versions] == list(range(1, len(versions) + 1))
            assert len(versions) <= attempted[device]
            for v in versions:
                reopened.blobs.get(v.sha256)
                data, sha = reopened.adapter_file(v)
                assert sha == v.full_sha256 and content_digest(spec, decode_adapter(data)[0]) == v.content_sha256 \
                    == content_digest(spec, adapters[device][v.number - 1])
        half = hashlib.sha256(partial.split(b"\n", 1)[1]).hexdigest()
        assert reopened.metadata.find_version(spec.base_fingerprint, "dev-0", sha256=half) is None
        # Resending everything that was attempted (what the outbox does) duplicates nothing.
        for device in DEVICES:
            with httpx.Client(headers={"Authorization": f"Bearer {tokens[device]}",
                                       "Content-Type": PUSH_MEDIA_TYPE}) as http:
                for k in range(attempted[device]):
                    response = http.post(url_of(server, device), content=body(spec, adapters[device][k], k + 1))
                    assert response.status_code in (200, 201) and response.json()["number"] == k + 1
            assert len(reopened.metadata.versions(spec.base_fingerprint, device)) == attempted[device]
