"""The store at fleet scale: PostgreSQL metadata, S3 blobs (moto's server on loopback) and several store
processes on one database and bucket; the one-line refusals of bad backend options."""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading

import httpx
import numpy as np
import psycopg
import pytest
from click.testing import CliRunner

from edge_peft.adapters.peft_format import encode_adapter
from edge_peft.store import pg
from edge_peft.store.__main__ import main
from edge_peft.store.backends import StoreLocation, open_store
from edge_peft.store.local_server import StoreServer, free_port
from edge_peft.store.s3 import MULTIPART_BYTES, S3BlobStore
from edge_peft.store.storage import StoreError
from edge_peft.store.testing import make_manifest, random_tensors
from edge_peft.store.wire import PUSH_MEDIA_TYPE, encode_push


def push_body(spec, seed: int) -> bytes:
    data = encode_adapter(spec, random_tensors(spec, np.random.default_rng(seed)))
    meta = {"spec": spec.to_dict(), "samples": 10, "steps": 3, "metrics": {}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}
    return encode_push(meta, data)


@pytest.mark.slow  # starts PostgreSQL (about 1 s, once per session)
def test_postgres_migrates_once_and_refuses_a_newer_schema(postgres):
    dsn = postgres.new_database("migrations")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # replicas starting together
        stores = list(pool.map(lambda _: pg.PostgresMetadata(dsn), range(3)))
    assert all(s.schema_version() == pg.SCHEMA_VERSION for s in stores)
    with psycopg.connect(dsn, autocommit=True) as con:
        assert con.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
        con.execute("UPDATE schema_version SET version = %s", (pg.SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="upgrade edge-peft"):
        pg.PostgresMetadata(dsn)
    for store in stores:
        store.close()


@pytest.mark.slow  # starts the S3 server, uploads 16 MiB: about 3 s
def test_s3_blobs_are_content_addressed_verified_and_whole(s3_server):
    blobs = S3BlobStore(s3_server.new_bucket("blob-checks") + "/adapters", s3_server.endpoint)
    small = b"adapter bytes"
    sha = blobs.put(small)
    assert sha == hashlib.sha256(small).hexdigest() and blobs.key(sha) == f"adapters/{sha[:2]}/{sha[2:]}"
    assert blobs.get(sha) == small and blobs.exists(sha) and blobs.put(small) == sha
    large = np.random.default_rng(0).bytes(2 * MULTIPART_BYTES + 12345)  # three parts
    big = blobs.put(large)
    head = blobs.client.head_object(Bucket=blobs.bucket, Key=blobs.key(big))
    assert head["ETag"].strip('"').endswith("-3")  # stored by a multipart upload
    assert not blobs.client.list_multipart_uploads(Bucket=blobs.bucket).get("Uploads")  # none left open
    assert blobs.get(big) == large and sorted(blobs.all()) == sorted([sha, big])
    blobs.client.put_object(Bucket=blobs.bucket, Key=blobs.key(sha), Body=b"rotten")  # corrupted in the bucket
    with pytest.raises(StoreError, match="corrupt") as err:
        blobs.get(sha)
    assert err.value.status == 500
    blobs.delete(sha)
    with pytest.raises(StoreError, match="missing"):
        blobs.get(sha)

    class Faulty(S3BlobStore):  # a server that keeps other bytes than it was sent
        def _upload(self, sha: str, data: bytes) -> None:
            super()._upload(sha, data[:-1] + b"?")

    faulty = Faulty(f"s3://{blobs.bucket}/adapters", s3_server.endpoint)
    with pytest.raises(StoreError, match="other bytes") as err:
        faulty.put(b"pushed adapter")
    assert err.value.status == 503 and not faulty.exists(hashlib.sha256(b"pushed adapter").hexdigest())


def test_both_backends_keep_the_same_records(store_location):
    """The whole metadata and blob interface through the service, on SQLite + directory and PostgreSQL + S3."""
    store, admin = open_store(store_location)
    assert admin and store.authenticate(admin).kind == "admin"
    tokens = {d: store.add_device(d) for d in ("phone-1", "phone-2", "phone-3")}
    with pytest.raises(StoreError) as err:
        store.add_device("phone-1")
    assert err.value.status == 409
    spec = make_manifest(labels=2).adapter
    assert store.add_base(spec.to_dict())[1] and not store.add_base(spec.to_dict())[1]
    pushed = {}
    for i, device in enumerate(tokens):
        data = encode_adapter(spec, random_tensors(spec, np.random.default_rng(i)))
        meta = {"spec": spec.to_dict(), "samples": 10 + i, "steps": 3, "metrics": {"loss": 0.5}, "parent": None,
                "sha256": hashlib.sha256(data).hexdigest()}
        pushed[device], created = store.push(spec.base_fingerprint, device, meta, data)
        assert created and pushed[device].number == 1 and store.blobs.get(pushed[device].sha256) == data
    again, created = store.push(spec.base_fingerprint, "phone-3", meta, data)
    assert not created and again.id == pushed["phone-3"].id  # the same tensors again: the same version
    assert store.metadata.device_usage("phone-3") == (1, pushed["phone-3"].size)
    record, created, report = store.aggregate(spec.base_fingerprint)
    assert created and record.number == 1 and report["devices"] == 3
    assert sorted(record.inputs) == sorted(v.id for v in store.metadata.latest_versions(spec.base_fingerprint))
    assert store.aggregate(spec.base_fingerprint)[1] is False  # nothing new: the same global version
    store.revoke_token("phone-2")
    with pytest.raises(StoreError):
        store.authenticate(tokens["phone-2"])
    removed = store.remove_device("phone-2")
    assert removed.versions_and_aggregates == 1 and not store.blobs.exists(pushed["phone-2"].sha256)
    assert [d.id for d in store.metadata.devices()] == ["phone-1", "phone-3"]
    removed = store.remove_base(spec.base_fingerprint)
    assert not store.metadata.bases() and not store.blobs.exists(record.full_sha256)
    assert store.metadata.referenced_blobs() == set()
    store.close()


@pytest.mark.slow  # its own S3 server, stopped mid-test: about 4 s
def test_an_unreachable_bucket_refuses_pushes_with_503_and_records_nothing(tmp_path, monkeypatch):
    from edge_peft.store.local_services import LocalS3

    s3 = LocalS3().start()
    try:
        location = StoreLocation(tmp_path / "store", blobs=s3.new_bucket("going-away"), s3_endpoint=s3.endpoint)
        for key in s3.env:
            monkeypatch.delenv(key, raising=False)
        with pytest.raises(StoreError, match="Unable to locate credentials.*check --blobs, --s3-endpoint and the AWS_"):
            open_store(location)
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        store, _ = open_store(location)  # SQLite metadata in the data directory, blobs in the bucket
    finally:
        s3.stop()
    store.add_device("phone-1")
    spec = make_manifest().adapter
    store.add_base(spec.to_dict())
    data = encode_adapter(spec, random_tensors(spec, np.random.default_rng(0)))
    meta = {"spec": spec.to_dict(), "samples": 1, "steps": 1, "metrics": {}, "parent": None,
            "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(StoreError, match="the blob store failed") as err:
        store.push(spec.base_fingerprint, "phone-1", meta, data)
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "5"}
    assert store.metadata.versions(spec.base_fingerprint) == []
    store.close()


@pytest.mark.slow  # two store processes and 16 pushes: about 6 s per backend
def test_two_processes_number_versions_gap_free_and_make_one_global_version(store_location):
    store, admin = open_store(store_location)
    tokens = {d: store.add_device(d) for d in ("phone-1", "phone-2")}
    spec = make_manifest(fingerprint="sha256:" + "7" * 64).adapter
    store.add_base(spec.to_dict())
    store.close()
    options = {"--database": store_location.database, "--blobs": store_location.blobs} if store_location.database else {}
    data_dir = store_location.data_dir
    with StoreServer(data_dir, options=options) as one, StoreServer(data_dir, options=options, port=free_port()) as two:
        urls = [one.url, two.url]

        def push(i: int) -> tuple[int, dict]:
            device = ("phone-1", "phone-2")[i % 2]
            r = httpx.post(f"{urls[(i // 2) % 2]}/v1/bases/{spec.base_fingerprint}/devices/{device}/versions",
                           content=push_body(spec, i), timeout=60,
                           headers={"Authorization": f"Bearer {tokens[device]}", "Content-Type": PUSH_MEDIA_TYPE})
            return r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(push, range(16)))
            again = list(pool.map(push, range(4)))  # the same tensors again, to either process
        assert {status for status, _ in answers} == {201} and {status for status, _ in again} == {200}
        for device in tokens:
            numbers = sorted(a["number"] for _, a in answers if a["device"] == device)
            assert numbers == list(range(1, 9)), numbers  # unique and gap-free across the two processes
        assert [a["number"] for _, a in again] == [a["number"] for _, a in answers[:4]]

        barrier = threading.Barrier(2)

        def aggregate(url: str) -> dict:
            barrier.wait()
            return httpx.post(f"{url}/v1/bases/{spec.base_fingerprint}/aggregates", json={"min_devices": 1},
                              headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(aggregate, urls))
    assert [r["number"] for r in results] == [1, 1] and sorted(r["created"] for r in results) == [False, True]
    store, _ = open_store(store_location)
    assert [a.number for a in store.metadata.aggregates(spec.base_fingerprint)] == [1]
    assert store.blobs.get(results[0]["full_sha256"])  # the one global file exists and verifies
    store.close()


@pytest.mark.parametrize("options, message", [
    (["--database", "mysql://db/x"], "is not a PostgreSQL URL"),
    (["--database", "postgresql://edge@127.0.0.1:1/none"], "cannot connect to PostgreSQL at postgresql://edge@127.0.0.1:1/none"),
    (["--blobs", "s3:/nobucket"], "is not s3://BUCKET"),
])
def test_bad_backend_options_are_one_line_errors(tmp_path, options, message):
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "s"), "--port", str(free_port()), *options])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output


@pytest.mark.slow  # needs the S3 server
def test_a_missing_bucket_is_a_one_line_error(tmp_path, s3_server):
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "s"), "--port", str(free_port()),
                                       "--blobs", "s3://no-such-bucket/x", "--s3-endpoint", s3_server.endpoint])
    assert result.exit_code == 2 and "cannot use bucket 'no-such-bucket'" in result.output and "create it" in result.output
