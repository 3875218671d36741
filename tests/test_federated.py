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
def test_a_flower_round_of_three_clients_averages_as_the_store_and_as_pytorch(artifacts, data, tmp_path):
    import torch

    from edge_peft.federated.simulation import simulate

    artifact = artifacts("bert", "int8")
    settings = FederatedSettings(artifact=str(artifact), data_dir=str(split(data, tmp_path / "clients")), rounds=1,
                                 local_steps=2, batch_size=4, max_seq_len=32, out=str(tmp_path / "server"))
    history = simulate(settings, clients=3, parallel=2)
    assert [h["round"] for h in history] == [0, 1] and history[1]["devices"] == 3
    assert history[1]["num-examples"] == sum(SIZES) and history[1]["refused"] == 0
    manifest = load_manifest(artifact)
    spec = manifest.adapter
    flower = load_adapter(tmp_path / "server" / "round-1", spec)

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
