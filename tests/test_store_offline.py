"""Offline first: pushes queue in <run>/outbox while the store is down; sync delivers each exactly once."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edge_peft.store import client
from edge_peft.store.__main__ import main
from edge_peft.store.service import AdapterStore
from edge_peft.store.local_server import StoreServer, free_port
from edge_peft.store.testing import make_manifest, random_tensors, write_run


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def entries(run):
    return sorted(p.name for p in (run / "outbox").iterdir() if not p.name.startswith("."))


@pytest.mark.slow
def test_push_while_down_then_sync_delivers_exactly_once(tmp_path):
    data_dir = tmp_path / "store"
    store, _ = AdapterStore.open(data_dir)
    token = store.add_device("phone-17")
    manifest = make_manifest()
    spec = manifest.adapter
    store.add_base(spec.to_dict())
    rng = np.random.default_rng(0)
    runs = [write_run(tmp_path / f"run{i}", manifest, random_tensors(spec, rng), samples=10 + i) for i in range(2)]
    # Both adapters queue in one run directory's outbox (a run pushed twice after more training).
    run = runs[0]
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("push", str(run), "--store", url, "--token", token)
    assert result.exit_code == 75 and "queued in" in result.output and "sync" in result.output, result.output
    assert "--token" in result.output  # the hint a user can run as is
    assert len(entries(run)) == 1
    assert cli("push", str(run), "--store", url, "--token", token).exit_code == 75  # queued, not delivered
    assert len(entries(run)) == 1  # the same adapter is not queued twice
    shutil.copy(runs[1] / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_model.safetensors")
    assert cli("push", str(run), "--store", url, "--token", token).exit_code == 75
    assert len(entries(run)) == 2
    result = cli("sync", str(run), "--store", url, "--token", token, "--attempts", "2", "--backoff", "0")
    assert result.exit_code == 2 and "2 adapter(s) still queued" in result.output, result.output
    queued = tmp_path / "queued-copy"
    shutil.copytree(run / "outbox", queued)

    port = int(url.rsplit(":", 1)[1])
    with StoreServer(data_dir, port=port):
        result = cli("sync", str(run), "--token", token)  # the store URL was recorded with each entry
        assert result.exit_code == 0, result.output
        assert "pushed version 1" in result.output and "pushed version 2" in result.output
        assert entries(run) == []
        versions = store.metadata.versions(spec.base_fingerprint, "phone-17")
        assert [(v.number, v.samples) for v in versions] == [(1, 10), (2, 10)]
        # A crash after the store acknowledged but before the entries were removed: they are sent again.
        shutil.rmtree(run / "outbox")
        shutil.copytree(queued, run / "outbox")
        result = cli("sync", str(run), "--store", url, "--token", token)
        assert result.exit_code == 0 and result.output.count("already stored as version") == 2, result.output
        assert entries(run) == []
        assert len(store.metadata.versions(spec.base_fingerprint, "phone-17")) == 2


@pytest.mark.slow
def test_refused_entry_stays_queued(tmp_path):
    data_dir = tmp_path / "store"
    store, _ = AdapterStore.open(data_dir)
    token = store.add_device("phone-1")
    manifest = make_manifest()
    store.add_base(manifest.adapter.to_dict())
    run = write_run(tmp_path / "run", manifest, random_tensors(manifest.adapter,
                                                               np.random.default_rng(1)), samples=5)
    with StoreServer(data_dir) as server:
        result = cli("push", str(run), "--store", server.url, "--token", token.split(".")[0] + ".wrong")
        assert result.exit_code == 2 and "401" in result.output and "stays queued" in result.output
        assert len(entries(run)) == 1
        assert cli("sync", str(run), "--token", token).exit_code == 0
        assert entries(run) == [] and len(store.metadata.versions(manifest.fingerprint)) == 1


def test_sync_backoff_doubles_and_is_bounded(tmp_path):
    manifest = make_manifest()
    run = write_run(tmp_path / "run", manifest, random_tensors(manifest.adapter,
                                                               np.random.default_rng(2)), samples=5)
    url = f"http://127.0.0.1:{free_port()}"
    base, meta, data = client.build_push(run)
    client.enqueue(run, base, meta, data, url)
    waits = []
    with pytest.raises(client.StoreUnreachable):
        client.flush(run, None, "phone-1.secret", attempts=6, backoff=1.0, max_backoff=5.0, sleep=waits.append)
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert len(entries(run)) == 1


class KeepAliveThenDrop:
    """An HTTP/1.1 server on loopback that answers the first request of each connection with keep-alive and closes
    the connection, unanswered, when a second request arrives on it: what a client sees when the server's
    keep-alive ran out just as it reused the connection."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    @staticmethod
    def _connection(conn) -> None:
        with conn:
            buffered = b""
            for answer in (True, False):
                while b"\r\n\r\n" not in buffered:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffered) < length:
                    buffered += conn.recv(65536)
                buffered = buffered[length:]
                if answer:
                    body = b'{"ok": true}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.sock.close()


def test_a_request_on_a_connection_the_store_closed_is_sent_again_when_repeatable():
    """A pull (GET) or a push (deduplicated by its tensors) goes out again on a fresh connection; adding a device,
    which is not repeatable, reports the store unreachable instead of perhaps registering it twice."""
    server = KeepAliveThenDrop()
    try:
        with client.StoreClient(server.url, "phone.x") as store:
            assert store.request("GET", "/healthz").json() == {"ok": True}
            assert store.request("GET", "/healthz").json() == {"ok": True}  # the reused connection was dropped
            assert server.connections == 2
            assert store.request("POST", "/v1/bases/b/devices/d/versions", content=b"x", repeatable=True).json()
            assert server.connections == 3
            with pytest.raises(client.StoreUnreachable, match="RemoteProtocolError"):
                store.request("POST", "/v1/devices", json={"id": "phone-2"})
            assert server.connections == 3
    finally:
        server.close()
