"""The storage interfaces the store is written against, and the records they hold.

The default implementations are SQLite (``db.SqliteMetadata``) and a local content-addressed
directory (``blobs.FileBlobStore``); ``pg.PostgresMetadata`` and ``s3.S3BlobStore`` implement the same two
protocols for several store processes (``backends.open_store`` picks them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .limits import StoreLimits


class StoreError(Exception):
    """A request the store refuses: ``status`` is the HTTP status, the message names problem and fix."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class Parent:
    """What a version was trained from: a global aggregate or a device version of the same base."""

    kind: str  # "global" | "device"
    version: int
    device: str | None = None  # for kind "device": whose version (None: the pushing device)


@dataclass(frozen=True)
class NewVersion:
    """A validated push, ready to be recorded once its blobs are stored."""

    base: str
    spec: dict[str, Any]
    device: str
    sha256: str
    size: int
    full_sha256: str
    full_size: int
    content_sha256: str
    samples: int
    steps: int
    metrics: dict[str, Any]
    parent: Parent | None
    created: str
    norms: list[float] | None = None  # the trained tensors' norm per clipping group (aggregate.version_norms)
    trained_sha256: str | None = None  # the pushed blob, when it holds exactly the trained tensors in fp32
    full_built: bool = False  # the full file is not stored: a pull builds it from the trained blob (seeded A added)

    @property
    def stored_bytes(self) -> int:
        """What this version adds to its device's quota: the pushed file and, if stored too, the full one."""
        return self.size + (self.full_size if self.full_sha256 != self.sha256 and not self.full_built else 0)


@dataclass(frozen=True)
class VersionRecord:
    """One stored device adapter: ``sha256`` is what was pushed, ``full_sha256`` the full PEFT file served,
    ``content_sha256`` the digest of its tensors (the identity that makes re-pushes idempotent)."""

    id: int
    base: str
    device: str
    number: int
    sha256: str
    size: int
    full_sha256: str
    full_size: int
    content_sha256: str
    samples: int
    steps: int
    metrics: dict[str, Any]
    parent: Parent | None
    created: str
    norms: list[float] | None = None  # None: pushed before the store recorded them
    trained_sha256: str | None = None  # None: read the trained tensors from the full file
    full_built: bool = False  # True: no blob ``full_sha256``; a pull builds the file from ``trained_sha256``


@dataclass(frozen=True)
class AggregateRecord:
    """One global version of a base: the federated average of ``inputs`` (version ids)."""

    id: int
    base: str
    number: int
    full_sha256: str
    full_size: int
    samples: int
    inputs: list[int] = field(default_factory=list)
    created: str = ""


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    created: str
    last_seen: str | None


@dataclass(frozen=True)
class BaseRecord:
    fingerprint: str
    spec: dict[str, Any]
    created: str


class MetadataStore(Protocol):
    """Bases, devices, versions and aggregates. Every write is one transaction."""

    def admin_token_hash(self) -> str | None: ...

    def set_admin_token_hash(self, token_hash: str, now: str, replace: bool = False) -> bool:
        """Store the admin token hash; without ``replace`` only if none exists. True if stored."""

    def add_device(self, device: str, token_hash: str, now: str) -> None:
        """Register a device; StoreError(409) if the id is taken."""

    def device_token_hash(self, device: str) -> str | None: ...

    def touch_device(self, device: str, now: str, unless_seen_after: str) -> None:
        """Set last_seen, skipping the write when it is already more recent than ``unless_seen_after``."""

    def set_device_token_hash(self, device: str, token_hash: str) -> bool:
        """Replace a device's token hash (rotation, revocation); False if there is no such device."""

    def remove_device(self, device: str) -> list[str] | None:
        """Delete a device and its versions (and their rows in aggregate inputs); the blobs they referenced,
        or None if there is no such device."""

    def device_usage(self, device: str) -> tuple[int, int]:
        """(versions, bytes) a device keeps across bases."""

    def devices(self) -> list[DeviceRecord]: ...

    def base(self, fingerprint: str) -> BaseRecord | None: ...

    def bases(self) -> list[BaseRecord]: ...

    def add_base(self, fingerprint: str, spec: dict[str, Any], now: str) -> bool:
        """Register a base with its spec; False (nothing changed) if the fingerprint is registered already."""

    def remove_base(self, fingerprint: str) -> list[str] | None:
        """Delete a base with its versions and aggregates; the blobs they referenced, or None if unknown."""

    def referenced_blobs(self) -> set[str]:
        """Every blob a version or an aggregate references."""

    def blob_referenced(self, sha256: str) -> bool: ...

    def find_version(self, base: str, device: str, sha256: str | None = None,
                     content_sha256: str | None = None) -> VersionRecord | None:
        """A device's version pushed as exactly these bytes (``sha256``) or holding these tensors."""

    def record_version(self, new: NewVersion, limits: StoreLimits | None = None) -> tuple[VersionRecord, bool]:
        """Atomically: require the base registered with the same spec, return the existing version with the
        same tensors (False), else check the device's quota (``limits.check_quota``), number and insert (True)."""

    def version(self, base: str, device: str, number: int | None) -> VersionRecord | None:
        """A device's version ``number`` for ``base``, or its latest when ``number`` is None."""

    def versions(self, base: str, device: str | None = None) -> list[VersionRecord]: ...

    def latest_versions(self, base: str) -> list[VersionRecord]:
        """The latest version of every device that pushed for ``base``."""

    def record_aggregate(self, base: str, inputs: list[int], full_sha256: str, full_size: int,
                         samples: int, now: str) -> tuple[AggregateRecord, bool]:
        """Number and insert a global version; return the latest one instead (False) if its inputs are the same."""

    def aggregate(self, base: str, number: int | None) -> AggregateRecord | None: ...

    def aggregates(self, base: str) -> list[AggregateRecord]: ...


class BlobStore(Protocol):
    """Immutable byte blobs addressed by their hex sha256."""

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store ``data`` durably (a no-op if present) and return its sha256 (``sha256``: already computed)."""

    def get(self, sha256: str) -> bytes:
        """The blob's bytes; StoreError(500) if it is missing or corrupt."""

    def exists(self, sha256: str) -> bool: ...
