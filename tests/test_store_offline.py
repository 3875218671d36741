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
