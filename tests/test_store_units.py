"""Store parts without a server: migrations, blobs, tokens, push validation, federated averaging."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time

import numpy as np
import pytest

from edge_peft.artifact.adapter_section import AdapterSpec
from edge_peft.adapters.peft_format import decode_adapter, encode_adapter
from edge_peft.artifact.names import lora_key
from edge_peft.variants import lora_a_from_seed
from edge_peft.errors import UserError
from edge_peft.store import db
from edge_peft.store.aggregate import FederatedAverage
from edge_peft.store.auth import authenticate, check_device_id, check_fingerprint
from edge_peft.store.blobs import STALE_TEMP_SECONDS, FileBlobStore
from edge_peft.store.service import AdapterStore, content_digest, parse_push_meta
from edge_peft.store.storage import StoreError
from edge_peft.store.testing import make_manifest, random_tensors
from edge_peft.store.wire import decode_push, encode_push


def spec_of(**kw) -> AdapterSpec:
    return make_manifest(**kw).adapter


def push_meta(spec: AdapterSpec, data: bytes, samples: int = 10) -> dict:
    return {"spec": spec.to_dict(), "samples": samples, "steps": 3, "metrics": {}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}


def test_migrations_create_schema_once_and_refuse_a_newer_one(tmp_path):
    path = tmp_path / "s.sqlite3"
    meta = db.SqliteMetadata(path)
    assert meta.schema_version() == db.SCHEMA_VERSION == len(db.MIGRATIONS)
    db.SqliteMetadata(path)  # re-opening applies nothing twice
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"bases", "devices", "versions", "aggregates", "aggregate_inputs"} <= tables
        con.execute("UPDATE schema_version SET version = ?", (db.SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="upgrade edge-peft"):
        db.SqliteMetadata(path)


def test_blobs_are_content_addressed_and_stale_temp_files_removed(tmp_path):
    blobs = FileBlobStore(tmp_path / "blobs")
    sha = blobs.put(b"adapter bytes")
    assert sha == hashlib.sha256(b"adapter bytes").hexdigest()
    assert (tmp_path / "blobs" / sha[:2] / sha[2:]).read_bytes() == b"adapter bytes"
    assert blobs.put(b"adapter bytes") == sha and blobs.get(sha) == b"adapter bytes"
    (tmp_path / "blobs" / sha[:2] / sha[2:]).write_bytes(b"bit rot")
    with pytest.raises(StoreError, match="corrupt"):
        blobs.get(sha)
    stale, fresh = tmp_path / "blobs" / "ab" / ".x.1.tmp", tmp_path / "blobs" / "ab" / ".y.2.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    old = time.time() - STALE_TEMP_SECONDS - 1
    os.utime(stale, (old, old))
    FileBlobStore(tmp_path / "blobs")
    assert not stale.exists() and fresh.exists()


def test_tokens_are_stored_only_as_hashes(tmp_path):
    store, admin = AdapterStore.open(tmp_path / "store")
    assert admin and AdapterStore.open(tmp_path / "store")[1] is None  # shown once
    token = store.add_device("phone-1")
    raw = (tmp_path / "store" / "store.sqlite3").read_bytes()
    assert token.encode() not in raw and admin.encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw
    assert store.authenticate(token).id == "phone-1"
    assert store.authenticate(admin).kind == "admin"
    for bad in (None, "", "phone-1", token + "x", "phone-2." + token.split(".")[1], "admin.nope", "../x.y"):
        with pytest.raises(StoreError) as err:
            authenticate(store.metadata, bad)
        assert err.value.status == 401
    with pytest.raises(StoreError) as err:
        store.add_device("phone-1")
    assert err.value.status == 409
    new_admin = store.reset_admin_token()
    assert store.authenticate(new_admin).kind == "admin"
    with pytest.raises(StoreError):
        store.authenticate(admin)


@pytest.mark.parametrize("device", ["../etc", "a/b", "..", ".hidden", "-x", "admin", "x" * 65, "a b", "é"])
def test_device_ids_refuse_traversal_and_odd_names(device):
    with pytest.raises(StoreError) as err:
        check_device_id(device)
    assert err.value.status == 400


@pytest.mark.parametrize("fp", ["sha256:" + "g" * 64, "sha256:../../x", "md5:" + "a" * 64, "sha256:" + "A" * 64])
def test_fingerprints_must_be_sha256(fp):
    with pytest.raises(StoreError):
        check_fingerprint(fp)


def test_push_body_framing_round_trips():
    meta, data = decode_push(encode_push({"a": [1, "x\ny"]}, b"\n\x00bytes\n"))
    assert meta == {"a": [1, "x\ny"]} and data == b"\n\x00bytes\n"
    for body in (b"no newline", b"{not json\nxx"):
        with pytest.raises(StoreError):
            decode_push(body)


@pytest.mark.parametrize("change", [
    {"samples": -1}, {"samples": True}, {"steps": 1.5}, {"sha256": "xyz"}, {"metrics": []}, {"extra": 1},
    {"parent": {"kind": "global", "version": 0}}, {"parent": {"kind": "other", "version": 1}},
    {"parent": {"kind": "global", "version": 1, "device": "p"}}, {"spec": {"rank": 1}},
])
def test_push_metadata_is_validated(change):
    spec = spec_of()
    meta = {**push_meta(spec, b"x"), **change}
    with pytest.raises(StoreError) as err:
        parse_push_meta(meta, spec.base_fingerprint)
    assert err.value.status == 400


def test_push_spec_must_describe_the_base_pushed_to():
    spec = spec_of()
    with pytest.raises(StoreError, match="base_fingerprint"):
        parse_push_meta(push_meta(spec, b"x"), "sha256:" + "0" * 64)
    bad = spec.to_dict()
    bad["modules"][0]["rank"] = 0
    with pytest.raises(StoreError, match="positive"):
        parse_push_meta({**push_meta(spec, b"x"), "spec": bad}, spec.base_fingerprint)


def test_store_completes_b_only_pushes_to_the_same_full_file(tmp_path):
    store, _ = AdapterStore.open(tmp_path / "store")
    store.add_device("phone-1")
    spec = spec_of(labels=2)
    full = random_tensors(spec, np.random.default_rng(1))
    full_bytes = encode_adapter(spec, full)
    b_only = encode_adapter(spec, {k: v for k, v in full.items() if ".lora_A." not in k})
    record, created = store.push(spec.base_fingerprint, "phone-1", push_meta(spec, b_only), b_only)
    assert created and record.sha256 == hashlib.sha256(b_only).hexdigest() != record.full_sha256
    served, _ = decode_adapter(store.blobs.get(record.full_sha256))
    assert set(served) == set(full)
    for key in full:
        np.testing.assert_array_equal(served[key], full[key])  # A regenerated bit-identically
    assert record.content_sha256 == content_digest(full)
    again, created = store.push(spec.base_fingerprint, "phone-1", push_meta(spec, full_bytes), full_bytes)
    assert not created and again.id == record.id  # same tensors, sent in full: one version
    assert len(store.metadata.versions(spec.base_fingerprint)) == 1


def test_lora_fa_push_with_a_foreign_a_is_refused(tmp_path):
    store, _ = AdapterStore.open(tmp_path / "store")
    store.add_device("phone-1")
    spec = spec_of()
    tensors = random_tensors(spec, np.random.default_rng(2))
    tensors[lora_key(spec.modules[0].name, "A")] += 0.001
    data = encode_adapter(spec, tensors)
    with pytest.raises(StoreError, match="frozen LoRA-FA A") as err:
        store.push(spec.base_fingerprint, "phone-1", push_meta(spec, data), data)
    assert err.value.status == 422 and store.metadata.bases() == []


def test_federated_average_of_lora_fa_is_the_average_weight_update():
    spec = spec_of(labels=3)
    rng = np.random.default_rng(3)
    adapters = [random_tensors(spec, rng) for _ in range(3)]
    samples = [10, 30, 60]
    avg = FederatedAverage(spec)
    for tensors, n in zip(adapters, samples):
        avg.add(spec, tensors, n, "x")
    merged = avg.result()
    w = np.array(samples) / sum(samples)
    for m in spec.modules:
        a, b = lora_a_from_seed(m.a_seed, m.rank, m.in_features), lora_key(m.name, "B")
        np.testing.assert_array_equal(merged[lora_key(m.name, "A")], a)
        expected_update = sum(wi * t[b].astype(np.float64) @ a for wi, t in zip(w, adapters))
        np.testing.assert_allclose(merged[b] @ a, expected_update, rtol=1e-5, atol=1e-7)
    head = "base_model.model.score.weight"
    np.testing.assert_allclose(merged[head], sum(wi * t[head] for wi, t in zip(w, adapters)), rtol=1e-6)


@pytest.mark.parametrize("other", [dict(seed=7), dict(rank=2), dict(targets=("q_proj", "k_proj"))])
def test_federated_average_refuses_other_seeds_ranks_or_targets(other):
    spec = spec_of()
    different = spec_of(**other)
    avg = FederatedAverage(spec)
    avg.add(spec, random_tensors(spec, np.random.default_rng(0)), 5, "first")
    with pytest.raises(UserError, match="only adapters exported from the same artifact"):
        avg.add(different, random_tensors(different, np.random.default_rng(0)), 5, "second")


def test_federated_average_refuses_plain_lora():
    with pytest.raises(UserError, match="not the average of their updates"):
        FederatedAverage(spec_of(variant="lora"))


def test_decode_never_unpickles(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with pytest.raises(UserError, match="not a valid safetensors"):
        decode_adapter(pickle.dumps(Boom()))
    assert not (tmp_path / "pwned").exists()
