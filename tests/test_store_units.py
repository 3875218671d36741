"""Store parts without a server: migrations, blobs, tokens, push validation, robust federated averaging."""

from __future__ import annotations

import contextlib
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
from edge_peft.store.aggregate import AggregationPolicy, Source, aggregate
from edge_peft.store.auth import authenticate, check_device_id, check_fingerprint
from edge_peft.store.bases import parse_spec, spec_difference
from edge_peft.store.backends import open_store
from edge_peft.store.blobs import STALE_TEMP_SECONDS, FileBlobStore
from edge_peft.store.push_meta import parse_push_meta
from edge_peft.store.service import AdapterStore, content_digest
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


def test_a_store_of_the_previous_schema_keeps_serving_its_stored_full_files(tmp_path, monkeypatch):
    """Versions pushed before B-only pushes were built at pull keep their stored full file, and their quota."""
    path = tmp_path / "store.sqlite3"
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:-1])
    db.SqliteMetadata(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as con:
        con.execute("INSERT INTO bases VALUES ('sha256:b', '{}', 't')")
        con.execute("INSERT INTO devices (id, token_hash, created) VALUES ('phone-1', 'h', 't')")
        con.execute("INSERT INTO versions (base, device, number, sha256, size, full_sha256, full_size, content_sha256, "
                    "samples, steps, metrics_json, created) VALUES ('sha256:b', 'phone-1', 1, 'p', 4, 'f', 8, 'c', 1, "
                    "1, '{}', 't')")
    monkeypatch.undo()
    meta = db.SqliteMetadata(path)
    assert meta.schema_version() == len(db.MIGRATIONS)
    (version,) = meta.versions("sha256:b")
    assert not version.full_built and meta.device_usage("phone-1") == (1, 12)  # pushed 4 + stored full 8
    meta.close()


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
    assert FileBlobStore(tmp_path / "blobs").remove_partial_writes() == 1
    assert not stale.exists() and fresh.exists()


def test_tokens_are_stored_only_as_hashes(tmp_path):
    store, admin = AdapterStore.open(tmp_path / "store")
    assert admin and AdapterStore.open(tmp_path / "store")[1] is None  # shown once
    token = store.add_device("phone-1")
    raw = b"".join(f.read_bytes() for f in (tmp_path / "store").glob("store.sqlite3*"))  # the WAL too
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


@pytest.mark.parametrize("device", ["../etc", "a/b", "..", ".hidden", "-x", "admin", "x" * 65, "a b", "é", "phone\n",
                                    ["phone"], None])
def test_device_ids_refuse_traversal_and_odd_names(device):
    with pytest.raises(StoreError) as err:
        check_device_id(device)
    assert err.value.status == 400


@pytest.mark.parametrize("fp", ["sha256:" + "g" * 64, "sha256:../../x", "md5:" + "a" * 64, "sha256:" + "A" * 64,
                                "sha256:" + "a" * 64 + "\n"])
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
    {"samples": -1}, {"samples": True}, {"steps": 1.5}, {"samples": 2**63}, {"steps": 2**53}, {"sha256": "xyz"},
    {"sha256": "a" * 64 + "\n"}, {"metrics": []}, {"metrics": {"loss": float("nan")}}, {"metrics": {"x": [[[[[[[[[[1]]]]]]]]]]}},
    {"metrics": {"big": 2**64}}, {"metrics": {"blob": "x" * (65 << 10)}}, {"extra": 1},
    {"parent": {"kind": "global", "version": 0}}, {"parent": {"kind": "other", "version": 1}},
    {"parent": {"kind": "global", "version": 2**60}}, {"parent": {"kind": "device", "version": 1, "device": "p\n"}},
    {"parent": {"kind": "global", "version": 1, "device": "p"}},
])
def test_push_metadata_is_validated(change):
    spec = spec_of()
    meta = {**push_meta(spec, b"x"), **change}
    with pytest.raises(StoreError) as err:
        parse_push_meta(meta)
    assert err.value.status == 400 and "\n" not in str(err.value)


def test_registered_specs_are_checked_and_differences_named():
    spec = spec_of()
    with pytest.raises(StoreError, match="base_fingerprint"):
        parse_spec(spec.to_dict(), "sha256:" + "0" * 64)
    bad = spec.to_dict()
    bad["modules"][0]["rank"] = 0
    with pytest.raises(StoreError, match="positive"):
        parse_spec(bad)
    for odd in ({**spec.to_dict(), "task": ["causal-lm"]}, {**spec.to_dict(), "modules": "x"}, [], {"rank": 1}):
        with pytest.raises(StoreError) as err:
            parse_spec(odd)
        assert err.value.status == 400
    registered = spec.to_dict()
    other = spec_of(rank=8).to_dict()
    assert spec_difference(registered, registered) is None
    assert spec_difference(registered, {**registered, "alpha": 32.0}) == "spec.alpha is 32.0, the registered spec has 8.0"
    assert "spec.modules[0].rank is 8" in spec_difference(registered, {**other, "alpha": registered["alpha"],
                                                                        "rank": registered["rank"]})
    assert spec_difference(registered, {**registered, "seed": True}) == "spec.seed is True, the registered spec has 0"
    assert spec_difference(registered, "x") == "spec is 'x', the registered spec has " + repr(registered)[:57] + "..."


def test_store_completes_b_only_pushes_to_the_same_full_file(store_location):
    store, _ = open_store(store_location)
    store.add_device("phone-1")
    spec = spec_of(labels=2)
    store.add_base(spec.to_dict())
    full = random_tensors(spec, np.random.default_rng(1))
    full_bytes = encode_adapter(spec, full)
    b_only = encode_adapter(spec, {k: v for k, v in full.items() if ".lora_A." not in k})
    record, created = store.push(spec.base_fingerprint, "phone-1", push_meta(spec, b_only), b_only)
    assert created and record.sha256 == hashlib.sha256(b_only).hexdigest() != record.full_sha256
    assert record.full_built and not store.blobs.exists(record.full_sha256)  # built at pull, not stored
    assert store.metadata.device_usage("phone-1") == (1, len(b_only))
    data, sha = store.adapter_file(record)
    assert sha == hashlib.sha256(data).hexdigest() == record.full_sha256 and len(data) == record.full_size
    served, _ = decode_adapter(data)
    assert set(served) == set(full)
    for key in full:
        np.testing.assert_array_equal(served[key], full[key])  # A regenerated bit-identically
    assert record.content_sha256 == content_digest(spec, full) == content_digest(spec, served)
    again, created = store.push(spec.base_fingerprint, "phone-1", push_meta(spec, full_bytes), full_bytes)
    assert not created and again.id == record.id  # same tensors, sent in full: one version
    assert len(store.metadata.versions(spec.base_fingerprint)) == 1
    store.close()


def test_aggregation_reads_each_b_only_push_once_and_matches_reading_twice(store_location):
    """The default clipping needs every device's norm before the sum: recorded at push, the store reads each
    adapter once, and only its pushed B (half the full file here); the result is the two-pass one, exactly."""
    store, _ = open_store(store_location)
    spec = spec_of(labels=3)
    store.add_base(spec.to_dict())
    rng = np.random.default_rng(11)
    adapters = [random_tensors(spec, rng, scale=s) for s in (0.01, 0.02, 0.05, 0.3)]
    records = []
    for i, tensors in enumerate(adapters):
        store.add_device(f"phone-{i}")
        b_only = encode_adapter(spec, {k: v for k, v in tensors.items() if ".lora_A." not in k})
        records.append(store.push(spec.base_fingerprint, f"phone-{i}", push_meta(spec, b_only), b_only)[0])
    assert all(r.trained_sha256 == r.sha256 and r.norms and len(r.norms) == 2 for r in records)
    reads: list[str] = []
    get = store.blobs.get
    store.blobs.get = lambda sha: reads.append(sha) or get(sha)
    record, _, report = store.aggregate(spec.base_fingerprint)
    assert sorted(reads) == sorted(r.sha256 for r in records)  # once each, the B-only blob
    assert report["clipped"] == 2
    once = decode_adapter(get(record.full_sha256))[0]
    twice, _ = aggregate(spec, sources(adapters, [10] * 4), AggregationPolicy())  # norms read from the tensors
    for key, value in twice.items():
        np.testing.assert_array_equal(once[key], value)
    store.close()


def test_lora_fa_push_with_a_foreign_a_is_refused(store_location):
    store, _ = open_store(store_location)
    store.add_device("phone-1")
    spec = spec_of()
    store.add_base(spec.to_dict())
    tensors = random_tensors(spec, np.random.default_rng(2))
    tensors[lora_key(spec.modules[0].name, "A")] += 0.001
    data = encode_adapter(spec, tensors)
    with pytest.raises(StoreError, match="frozen LoRA-FA A") as err:
        store.push(spec.base_fingerprint, "phone-1", push_meta(spec, data), data)
    assert err.value.status == 422 and store.metadata.versions(spec.base_fingerprint) == []
    store.close()


def sources(adapters: list[dict], samples: list[int]) -> list[Source]:
    return [Source(f"device {i}", n, lambda t=t: t) for i, (t, n) in enumerate(zip(adapters, samples))]


def test_sample_weighted_average_of_lora_fa_is_the_average_weight_update():
    spec = spec_of(labels=3)
    rng = np.random.default_rng(3)
    adapters = [random_tensors(spec, rng) for _ in range(3)]
    samples = [10, 30, 60]
    policy = AggregationPolicy(weighting="samples", clip_norm="off")
    merged, report = aggregate(spec, sources(adapters, samples), policy)
    assert report["devices"] == 3 and report["clipped"] == 0
    w = np.array(samples) / sum(samples)
    for m in spec.modules:
        a, b = lora_a_from_seed(m.a_seed, m.rank, m.in_features), lora_key(m.name, "B")
        np.testing.assert_array_equal(merged[lora_key(m.name, "A")], a)
        expected_update = sum(wi * t[b].astype(np.float64) @ a for wi, t in zip(w, adapters))
        np.testing.assert_allclose(merged[b] @ a, expected_update, rtol=1e-5, atol=1e-7)
    head = "base_model.model.score.weight"
    np.testing.assert_allclose(merged[head], sum(wi * t[head] for wi, t in zip(w, adapters)), rtol=1e-6)


def test_default_aggregation_weighs_equally_and_clips_each_device_to_the_median_norm():
    spec = spec_of(labels=3)
    rng = np.random.default_rng(4)
    adapters = [random_tensors(spec, rng, scale=s) for s in (0.01, 0.02, 0.03, 100.0)]
    merged, report = aggregate(spec, sources(adapters, [1, 1, 1, 10**15]), AggregationPolicy())
    b_keys = [lora_key(m.name, "B") for m in spec.modules]
    norm = lambda t: np.sqrt(sum(np.sum(np.square(t[k], dtype=np.float64)) for k in b_keys))
    bound = np.median([norm(t) for t in adapters])
    assert report["clipped"] == 2 and report["clip_bounds"]["adapter"] == pytest.approx(bound)
    clipped = [{k: t[k] * min(1.0, bound / norm(t)) for k in b_keys} for t in adapters]
    for k in b_keys:  # equal weights: 10**15 samples buy nothing
        np.testing.assert_allclose(merged[k], sum(c[k] for c in clipped) / 4, rtol=1e-5, atol=1e-8)
    assert norm(merged) <= bound * (1 + 1e-6)


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_robust_means_ignore_one_extreme_device(method):
    spec = spec_of()
    rng = np.random.default_rng(5)
    honest = [random_tensors(spec, rng) for _ in range(9)]
    attacker = {k: v * 1e6 for k, v in random_tensors(spec, rng).items()}
    policy = AggregationPolicy(method=method, clip_norm="off")
    merged, _ = aggregate(spec, sources(honest + [attacker], [1] * 10), policy)
    key = lora_key(spec.modules[0].name, "B")
    stacked = np.stack([t[key] for t in honest])
    assert np.all(merged[key] >= stacked.min(axis=0) - 1e-7) and np.all(merged[key] <= stacked.max(axis=0) + 1e-7)


def test_aggregation_needs_enough_devices_and_a_valid_policy():
    spec = spec_of()
    two = sources([random_tensors(spec, np.random.default_rng(i)) for i in range(2)], [5, 5])
    with pytest.raises(UserError, match="at least 3"):
        aggregate(spec, two, AggregationPolicy())
    assert aggregate(spec, two, AggregationPolicy(min_devices=2))[1]["devices"] == 2
    for bad in ({"min_devices": 0}, {"clip_norm": -1}, {"clip_norm": "nan"}, {"method": "max"}, {"trim": 0.5},
                {"weighting": "samples", "method": "median"}, {"unknown": 1}, [], {"sample_cap": 1.5}):
        with pytest.raises(StoreError) as err:
            AggregationPolicy.from_dict(bad)
        assert err.value.status == 400


def test_aggregation_refuses_an_input_that_is_not_finite():
    """A stored adapter holding Inf (say, pushed to an older store) makes no global version."""
    spec = spec_of()
    adapters = [random_tensors(spec, np.random.default_rng(i)) for i in range(3)]
    adapters[2][lora_key(spec.modules[0].name, "B")][0, 0] = np.inf
    with pytest.raises(UserError, match="NaN or Inf"):
        aggregate(spec, sources(adapters, [1] * 3), AggregationPolicy(clip_norm="off"))


def test_aggregation_refuses_plain_lora():
    spec = spec_of(variant="lora")
    with pytest.raises(UserError, match="not the average of their updates"):
        aggregate(spec, sources([random_tensors(spec, np.random.default_rng(0))] * 3, [1] * 3), AggregationPolicy())


def test_decode_never_unpickles(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with pytest.raises(UserError, match="not a valid safetensors"):
        decode_adapter(pickle.dumps(Boom()))
    assert not (tmp_path / "pwned").exists()
