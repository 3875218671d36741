"""The adapter store's operations, independent of HTTP: the server and the local CLI both call these."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters.peft_format import (PEFT_TASK_TYPES, check_tensors, complete_tensors, decode_adapter, encode_adapter,
                                    expand_if_compact)
from ..adapters.ranks import CHANNELS_KEY
from ..artifact.adapter_section import AdapterSpec
from ..errors import UserError
from ..variants import get_variant
from .aggregate import FederatedAverage
from .auth import ADMIN, authenticate, check_device_id, check_fingerprint, hash_token, new_token, Principal
from .blobs import SHA256_HEX, FileBlobStore
from .db import SqliteMetadata
from .storage import AggregateRecord, BlobStore, MetadataStore, NewVersion, Parent, StoreError, VersionRecord

DB_NAME = "store.sqlite3"
BLOBS_NAME = "blobs"
DEFAULT_MAX_BODY_BYTES = 64 << 20
LAST_SEEN_RESOLUTION = timedelta(seconds=60)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class PushRequest:
    """The validated JSON metadata of a push."""

    spec: AdapterSpec
    samples: int
    steps: int
    metrics: dict[str, Any]
    parent: Parent | None
    sha256: str


class AdapterStore:
    """Bases, devices, adapter versions and global aggregates over a metadata store and a blob store."""

    def __init__(self, metadata: MetadataStore, blobs: BlobStore, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.max_body_bytes = max_body_bytes

    @classmethod
    def open(cls, data_dir: str | os.PathLike, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> tuple["AdapterStore", str | None]:
        """Open (creating and migrating) the embedded store in ``data_dir``.

        Returns the store and, only when this call created it, the new admin token (to show once).
        """
        data_dir = Path(data_dir)
        if data_dir.exists() and not data_dir.is_dir():
            raise UserError(f"{data_dir} is a file: pass a directory as --data-dir")
        store = cls(SqliteMetadata(data_dir / DB_NAME), FileBlobStore(data_dir / BLOBS_NAME), max_body_bytes)
        return store, store._create_admin_token()

    def _create_admin_token(self) -> str | None:
        if self.metadata.admin_token_hash() is not None:
            return None
        token = new_token(ADMIN)
        return token if self.metadata.set_admin_token_hash(hash_token(token), utc_now()) else None

    def reset_admin_token(self) -> str:
        """Replace the admin token (the old one stops working) and return the new one."""
        token = new_token(ADMIN)
        self.metadata.set_admin_token_hash(hash_token(token), utc_now(), replace=True)
        return token

    # --- identities ------------------------------------------------------------------------------

    def add_device(self, device: str) -> str:
        """Register a device and return its token (only its hash is kept)."""
        token = new_token(check_device_id(device))
        self.metadata.add_device(device, hash_token(token), utc_now())
        return token

    def authenticate(self, token: str | None) -> Principal:
        principal = authenticate(self.metadata, token)
        if principal.kind == "device":
            now = datetime.now(timezone.utc)
            self.metadata.touch_device(principal.id, now.isoformat(timespec="milliseconds"),
                                       (now - LAST_SEEN_RESOLUTION).isoformat(timespec="milliseconds"))
        return principal

    # --- push ------------------------------------------------------------------------------------

    def push(self, base: str, device: str, meta: Any, data: bytes) -> tuple[VersionRecord, bool]:
        """Validate and store one adapter; the same tensors again return the existing version (False).

        Nothing is written unless every check passes; blobs are stored before the one metadata transaction,
        so a crash can leave at most an unreferenced blob, never a version without its bytes.
        """
        check_fingerprint(base)
        check_device_id(device)
        request = parse_push_meta(meta, base)
        if hashlib.sha256(data).hexdigest() != request.sha256:
            raise StoreError(400, "the adapter bytes do not match the sha256 sent: the upload was corrupted; push again")
        existing = self.metadata.find_version(base, device, sha256=request.sha256)
        if existing is not None:
            return existing, False
        spec, spec_dict = request.spec, request.spec.to_dict()
        registered = self.metadata.base(base)
        if registered is not None and registered.spec != spec_dict:
            raise StoreError(409, f"base {base[:19]}... is registered with a different adapter spec (rank, targets, "
                                  "seeds or task): export with the same settings as the adapters already stored")
        self._check_spec_size(spec)
        if request.parent is not None:
            self._require_parent(base, device, request.parent)
        tensors, file_meta = self._checked_tensors(spec, data)
        full_tensors = complete_tensors(spec, tensors)
        content = content_digest(full_tensors)
        existing = self.metadata.find_version(base, device, content_sha256=content)
        if existing is not None:
            return existing, False
        if len(full_tensors) == len(tensors) and CHANNELS_KEY not in file_meta:
            full = data
        else:  # B-only or compact (some rank channels) push: serve the full-rank PEFT file
            meta = {k: v for k, v in file_meta.items() if k != CHANNELS_KEY}
            full = encode_adapter(spec, full_tensors, extra_meta=meta)
        self.blobs.put(data)
        full_sha = self.blobs.put(full) if full is not data else request.sha256
        new = NewVersion(base, spec_dict, device, request.sha256, len(data), full_sha, len(full), content,
                         request.samples, request.steps, request.metrics, request.parent, utc_now())
        return self.metadata.record_version(new)

    def _require_parent(self, base: str, device: str, parent: Parent) -> None:
        """The version a push was trained from must be in this store (versions are never deleted)."""
        if parent.kind == "global":
            found, what = self.metadata.aggregate(base, parent.version), f"global version {parent.version}"
        else:
            owner = parent.device or device
            found, what = self.metadata.version(base, owner, parent.version), f"version {parent.version} of device {owner!r}"
        if found is None:
            raise StoreError(422, f"parent {what} does not exist for this base: pull the parent from this store "
                                  "before training, or push to the store it came from")

    def _check_spec_size(self, spec: AdapterSpec) -> None:
        """Refuse a spec whose full adapter would dwarf the body limit (A is rebuilt in memory)."""
        nbytes = 4 * sum(math.prod(shape) for shape in spec.expected_shapes().values())
        if nbytes > 4 * self.max_body_bytes:
            raise StoreError(413, f"the spec describes a {nbytes >> 20} MiB adapter, over this store's limit: "
                                  "raise the server's --max-body-mb")

    @staticmethod
    def _checked_tensors(spec: AdapterSpec, data: bytes) -> tuple[dict[str, np.ndarray], dict]:
        """Parse the pushed safetensors (never pickle) and refuse anything that does not fit ``spec`` (422)."""
        try:
            tensors, file_meta = decode_adapter(data, "pushed adapter")
            tensors = expand_if_compact(spec, tensors, file_meta, "pushed adapter")
            check_tensors(spec, tensors, "pushed adapter")
            spec.kind.check_seeded(spec.modules, tensors, "pushed adapter")
        except UserError as exc:
            raise StoreError(422, str(exc)) from None
        for key in ("base_fingerprint", "variant", "seed"):
            if key in file_meta and file_meta[key] != getattr(spec, key):
                raise StoreError(422, f"the adapter file says {key}={file_meta[key]!r}, the spec sent says "
                                      f"{getattr(spec, key)!r}: push the run directory the adapter was trained in")
        return tensors, file_meta

    # --- pull ------------------------------------------------------------------------------------

    def spec(self, base: str) -> AdapterSpec:
        record = self.metadata.base(check_fingerprint(base))
        if record is None:
            raise StoreError(404, f"base {base[:19]}... has no adapters in this store: push one first, or check --base")
        return AdapterSpec.from_dict(record.spec)

    def device_version(self, base: str, device: str, number: int | None) -> VersionRecord:
        """A device's version (latest when ``number`` is None); its full PEFT file is blob ``full_sha256``."""
        record = self.metadata.version(check_fingerprint(base), check_device_id(device), number)
        if record is None:
            which = "any version" if number is None else f"version {number}"
            raise StoreError(404, f"device {device!r} has no {which} for base {base[:19]}...: check --device/--version")
        return record

    def global_version(self, base: str, number: int | None) -> AggregateRecord:
        """A global aggregate (latest when ``number`` is None); its full PEFT file is blob ``full_sha256``."""
        record = self.metadata.aggregate(check_fingerprint(base), number)
        if record is None:
            which = "no global version yet" if number is None else f"no global version {number}"
            raise StoreError(404, f"base {base[:19]}... has {which}: run `edge-peft store aggregate` first")
        return record

    # --- aggregate -------------------------------------------------------------------------------

    def aggregate(self, base: str) -> tuple[AggregateRecord, bool]:
        """Federated-average the latest version of every device into a new global version.

        Returns the latest global version unchanged (False) when no device pushed since it was made.
        """
        spec = self.spec(base)
        latest = self.metadata.latest_versions(base)
        if not latest:
            raise StoreError(409, f"base {base[:19]}... has no device versions to aggregate: push adapters first")
        inputs = [v.id for v in latest]
        current = self.metadata.aggregate(base, None)
        if current is not None and sorted(current.inputs) == sorted(inputs):
            return current, False
        try:
            average = FederatedAverage(spec)
            for v in latest:
                tensors, _ = decode_adapter(self.blobs.get(v.full_sha256), f"device {v.device} version {v.number}")
                average.add(spec, tensors, v.samples, f"device {v.device} version {v.number}")
            data = encode_adapter(spec, average.result(), extra_meta={"devices": average.count, "samples": average.samples})
        except UserError as exc:
            raise StoreError(409, str(exc)) from None
        sha = self.blobs.put(data)
        return self.metadata.record_aggregate(base, inputs, sha, len(data), average.samples, utc_now())


def content_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and values: equal for equal tensors however the file was written
    (safetensors does not fix the order of header metadata, so file bytes are not a stable identity)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        h.update(f"{key}|{arr.dtype.newbyteorder('<').str}|{list(arr.shape)}|".encode())
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def parse_push_meta(meta: Any, base: str) -> PushRequest:
    """Validate a push's JSON metadata; StoreError(400) naming the first problem."""
    if not isinstance(meta, dict):
        raise StoreError(400, "push metadata must be a JSON object: use `edge-peft push`")
    unknown = sorted(set(meta) - {"spec", "samples", "steps", "metrics", "parent", "sha256"})
    if unknown:
        raise StoreError(400, f"push metadata has unknown fields {unknown}: use a matching `edge-peft push`")
    sha = meta.get("sha256")
    if not isinstance(sha, str) or not SHA256_HEX.match(sha):
        raise StoreError(400, "push metadata needs sha256 (64 lowercase hex digits of the adapter bytes)")
    counts = {}
    for key in ("samples", "steps"):
        value = meta.get(key)
        if type(value) is not int or value < 0:
            raise StoreError(400, f"push metadata needs {key} as an integer >= 0 (from the run's summary.json)")
        counts[key] = value
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict):
        raise StoreError(400, "push metadata metrics must be a JSON object")
    return PushRequest(parse_spec(meta.get("spec"), base), counts["samples"], counts["steps"], metrics,
                       parse_parent(meta.get("parent")), sha)


def parse_spec(raw: Any, base: str) -> AdapterSpec:
    """An ``AdapterSpec`` from JSON, checked for the values the store and PEFT rely on."""
    if not isinstance(raw, dict):
        raise StoreError(400, "push metadata needs spec: the manifest's adapter spec (AdapterSpec.to_dict())")
    try:
        spec = AdapterSpec.from_dict(raw)
    except UserError as exc:
        raise StoreError(400, str(exc)) from None
    problems = []
    if spec.base_fingerprint != base:
        problems.append("its base_fingerprint is not the base pushed to")
    try:
        get_variant(spec.variant)
    except UserError as exc:
        problems.append(str(exc).split(":")[0])
    if spec.task not in PEFT_TASK_TYPES:
        problems.append(f"task {spec.task!r} not in {tuple(PEFT_TASK_TYPES)}")
    if not spec.modules:
        problems.append("no adapter modules")
    sizes = [v for m in spec.modules for v in (m.rank, m.in_features, m.out_features)]
    sizes += [d for t in spec.modules_to_save for d in (t.shape if isinstance(t.shape, list) else [None])]
    if any(type(v) is not int or v <= 0 for v in sizes):
        problems.append("ranks and shapes must be positive integers")
    if any(type(m.a_seed) is not int or m.a_seed < 0 for m in spec.modules) or type(spec.seed) is not int:
        problems.append("seeds must be integers >= 0")
    if type(spec.alpha) not in (int, float) or not math.isfinite(spec.alpha):
        problems.append("alpha must be a number")
    names = [m.name for m in spec.modules] + [t.name for t in spec.modules_to_save]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        problems.append("module names must be distinct non-empty strings")
    if problems:
        raise StoreError(400, f"push spec is invalid ({'; '.join(problems)}): push the run's own manifest spec")
    return spec


def parse_parent(raw: Any) -> Parent | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("kind") not in ("global", "device") or type(raw.get("version")) is not int \
            or raw["version"] < 1 or set(raw) - {"kind", "version", "device"}:
        raise StoreError(400, 'push metadata parent must be null or {"kind": "global"|"device", "version": N >= 1}')
    device = raw.get("device")
    if device is not None:
        if raw["kind"] != "device":
            raise StoreError(400, "push metadata parent.device is only valid with kind 'device'")
        check_device_id(device)
    return Parent(raw["kind"], raw["version"], device)
