"""Content-addressed blobs in an S3-compatible bucket (boto3): ``<prefix>/ab/cdef...`` named by the sha256.

An object appears whole or not at all: a single PUT, or for large adapters a multipart upload that becomes
visible only when completed (an interrupted one is aborted, and leaves no object under the final key). Each
upload carries its SHA-256 and is read back and hashed before ``put`` returns, so the version row that
references it commits only after the bytes under the key are known good; ``get`` verifies them again.
Endpoint, region and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles).
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Iterator
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .blobs import SHA256_HEX
from .storage import StoreError

MULTIPART_BYTES = 8 << 20  # adapters over this go up in 8 MiB parts
MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes); StoreError(400) naming the fix."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise StoreError(400, f"--blobs {url[:80]!r} is not s3://BUCKET[/PREFIX]: pass e.g. s3://adapters/store")
    return parts.netloc, parts.path.strip("/")


class S3BlobStore:
    """``BlobStore`` on one bucket and key prefix; the boto3 client is shared by the server's threads."""

    def __init__(self, url: str, endpoint: str | None = None, region: str | None = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = url
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32,
                        request_checksum_calculation="when_required", response_checksum_validation="when_required")
        session = boto3.session.Session()  # its own: credentials read now, not cached by boto3's default session
        self.client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                                       use_threads=False)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(500, f"cannot use bucket {self.bucket!r} at {self.client.meta.endpoint_url} ({_reason(exc)}): "
                                  "create it, or check --blobs, --s3-endpoint and the AWS_* credentials") from None

    def key(self, sha256: str) -> str:
        if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
            raise StoreError(400, f"{str(sha256)[:70]!r} is not a hex sha256: pass the 64-character digest")
        return f"{self.prefix}/{sha256[:2]}/{sha256[2:]}" if self.prefix else f"{sha256[:2]}/{sha256[2:]}"

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Upload ``data``, then read it back: the object must hash to its key.

        The SHA-256 sent with the upload lets AWS S3 refuse corrupted bytes itself; not every S3-compatible
        server checks it (moto does not), so the read-back is what guarantees the key names its bytes.
        ``sha256``: the digest the caller already computed of exactly these bytes. Bytes already stored are
        uploaded again (the same object); the service asks ``exists`` first, saving a request per blob.
        """
        sha = sha256 or hashlib.sha256(data).hexdigest()
        try:
            self._upload(sha, data)
            stored = hashlib.sha256(self.client.get_object(Bucket=self.bucket, Key=self.key(sha))["Body"].read())
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(503, f"the blob store refused an upload ({_reason(exc)}): nothing was stored; "
                                  "push again later", {"Retry-After": "5"}) from None
        if stored.hexdigest() != sha:
            self.delete(sha)
            raise StoreError(503, f"the blob store kept other bytes than were uploaded for blob {sha[:12]}: nothing "
                                  "was stored; push again, and check the S3 server if it persists", {"Retry-After": "5"})
        return sha

    def _upload(self, sha: str, data: bytes) -> None:
        """One PUT with its SHA-256, or a multipart upload (8 MiB parts, each with its SHA-256) that
        upload_fileobj aborts if a part fails: no object appears under the key until it is complete."""
        if len(data) <= MULTIPART_BYTES:
            digest = base64.b64encode(bytes.fromhex(sha)).decode()
            self.client.put_object(Bucket=self.bucket, Key=self.key(sha), Body=data, ChecksumSHA256=digest)
        else:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self.key(sha), Config=self.transfer,
                                       ExtraArgs={"ChecksumAlgorithm": "SHA256"})

    def get(self, sha256: str) -> bytes:
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and _code(exc) in MISSING:
                raise StoreError(500, f"blob {sha256[:12]} is missing from {self.url}: restore it from the bucket's "
                                      "versions or a backup") from None
            raise StoreError(503, f"the blob store failed ({_reason(exc)}): retry later", {"Retry-After": "5"}) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(500, f"blob {sha256[:12]} in {self.url} is corrupt: restore it from the bucket's versions "
                                  "or a backup")
        return data

    def exists(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
            return True
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and _code(exc) in MISSING:
                return False
            raise StoreError(503, f"the blob store failed ({_reason(exc)}): retry later", {"Retry-After": "5"}) from None

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def all(self) -> Iterator[str]:
        """The sha256 of every blob under the prefix."""
        start = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", ()):
                sha = item["Key"][len(start):].replace("/", "")
                if SHA256_HEX.fullmatch(sha):
                    yield sha


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _reason(exc: Exception) -> str:
    return (_code(exc) or type(exc).__name__) if isinstance(exc, ClientError) else str(exc).splitlines()[0][:160]
