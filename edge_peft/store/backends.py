"""Where a store keeps its metadata and blobs: SQLite and a blob directory in ``--data-dir`` (the default),
or PostgreSQL (``--database postgresql://...``) and an S3-compatible bucket (``--blobs s3://bucket/prefix``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .blobs import FileBlobStore
from .data_dir import open_private
from .limits import StoreLimits
from .service import BLOBS_NAME, DB_NAME, AdapterStore
from .storage import BlobStore, MetadataStore, StoreError

FLEET_EXTRA = 'install the fleet backends: pip install "edge-peft[fleet]"'


@dataclass(frozen=True)
class StoreLocation:
    """The ``serve``/``store`` options naming the backends; None means the local default in ``data_dir``."""

    data_dir: Path = Path("./store")
    database: str | None = None
    blobs: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None

    @property
    def local(self) -> bool:
        """Whether anything lives in ``data_dir`` (then it is locked, and one machine owns the store)."""
        return self.database is None or self.blobs is None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "data_dir": str(self.data_dir)})

    @classmethod
    def from_json(cls, text: str) -> "StoreLocation":
        fields = json.loads(text)
        return cls(**{**fields, "data_dir": Path(fields["data_dir"])})


def open_store(location: StoreLocation, limits: StoreLimits = StoreLimits()) -> tuple[AdapterStore, str | None]:
    """Open (creating and migrating) the store ``location`` names; the admin token if this call created it."""
    if location.database is None and location.blobs is None:
        return AdapterStore.open(location.data_dir, limits)
    lock = open_private(location.data_dir) if location.local else None
    try:
        metadata = _metadata(location)
        blobs = _blobs(location)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return AdapterStore.start(metadata, blobs, limits, lock)


def _metadata(location: StoreLocation) -> MetadataStore:
    if location.database is None:
        from .db import SqliteMetadata

        return SqliteMetadata(location.data_dir / DB_NAME)
    if not location.database.startswith(("postgresql://", "postgres://")):
        raise StoreError(400, f"--database {location.database[:40]!r}... is not a PostgreSQL URL: pass "
                              "postgresql://USER@HOST:PORT/DB (the password in PGPASSWORD), or leave it out for SQLite")
    try:
        from .pg import PostgresMetadata
    except ImportError:
        raise StoreError(500, f"--database needs psycopg: {FLEET_EXTRA}") from None
    return PostgresMetadata(location.database)


def _blobs(location: StoreLocation) -> BlobStore:
    if location.blobs is None:
        return FileBlobStore(location.data_dir / BLOBS_NAME)
    try:
        from .s3 import S3BlobStore
    except ImportError:
        raise StoreError(500, f"--blobs needs boto3: {FLEET_EXTRA}") from None
    return S3BlobStore(location.blobs, location.s3_endpoint, location.s3_region)
