"""The adapter store's operations, independent of HTTP: the server and the local CLI both call these."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np

from ..adapters.compressed import FP32, SCALE_SUFFIX
from ..adapters.peft_format import (adapter_digest, check_tensors, complete_tensors, decode_adapter, encode_adapter,
                                    expand_if_compact)
from ..adapters.ranks import CHANNELS_KEY
from ..adapters.sparse import TOPK
from ..adapters.updates import ENCODING_KEY, TOPK_KEY, decode_update, file_encoding
from ..artifact.adapter_section import AdapterSpec
from ..artifact.names import a_name, peft_key
from ..errors import UserError
from ..variants import lora_a_from_seed
from .aggregate import AggregationPolicy, Source, aggregate, version_norms
from .auth import ADMIN, REVOKED, Principal, authenticate, check_device_id, check_fingerprint, hash_token, new_token
from .bases import parse_spec, spec_difference
from .blobs import STALE_TEMP_SECONDS, FileBlobStore
from .data_dir import DataDirLock, open_private
from .db import SqliteMetadata
from .limits import StoreLimits
from .push_meta import PushRequest, parse_push_meta
from .storage import (AggregateRecord, BaseRecord, BlobStore, MetadataStore, NewVersion, Parent, StoreError,
                      VersionRecord)

DB_NAME = "store.sqlite3"
BLOBS_NAME = "blobs"
LAST_SEEN_RESOLUTION = timedelta(seconds=60)
MAX_TOTAL_SAMPLES = 2**63 - 1
PREFETCH = 4  # adapters read ahead while aggregating
T = TypeVar("T")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Removed:
    """What an admin removal deleted."""

    versions_and_aggregates: int
    blobs: int


class AdapterStore:
    """Bases, devices, adapter versions and global aggregates over a metadata store and a blob store."""

    def __init__(self, metadata: MetadataStore, blobs: BlobStore, limits: StoreLimits = StoreLimits(),
                 lock: DataDirLock | None = None) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.limits = limits
        self.lock = lock
        self._writing: Counter[str] = Counter()  # blobs that pushes in this process are storing right now
        self._writing_lock = threading.Lock()

    @classmethod
    def open(cls, data_dir: str | Path, limits: StoreLimits = StoreLimits()) -> tuple["AdapterStore", str | None]:
        """Open (creating 0700 and migrating) the embedded store in ``data_dir``.

        The first process to open it removes what killed processes left (temp files, unreferenced blobs).
        Returns the store and, only when this call created it, the new admin token (to show once).
        """
        data_dir = Path(data_dir)
        lock = open_private(data_dir)
        return cls.start(SqliteMetadata(data_dir / DB_NAME), FileBlobStore(data_dir / BLOBS_NAME), limits, lock)

    @classmethod
    def start(cls, metadata: MetadataStore, blobs: BlobStore, limits: StoreLimits = StoreLimits(),
              lock: DataDirLock | None = None) -> tuple["AdapterStore", str | None]:
        """The store over ready backends: leftovers removed (a local data directory only), the admin token
        created if none exists yet (returned only by the call that created it)."""
        store = cls(metadata, blobs, limits, lock)
        if lock is not None:
            store.remove_leftovers(everything=lock.alone)
            lock.share()
        return store, store._create_admin_token()

    def close(self) -> None:
        """Release the data directory (other processes may then clean it up) and database connections."""
        if self.lock is not None:
            self.lock.release()
        if hasattr(self.metadata, "close"):
            self.metadata.close()

    def remove_leftovers(self, everything: bool) -> int:
        """Delete temp files of interrupted writes and blobs no row references (only when ``everything``:
        no other process has the store open); stale temp files only otherwise. Returns how many."""
        if not isinstance(self.blobs, FileBlobStore):
            return 0
        removed = self.blobs.remove_partial_writes(older_than=0 if everything else STALE_TEMP_SECONDS)
        if everything:
            orphans = set(self.blobs.all()) - self.metadata.referenced_blobs()
            for sha in orphans:
                self.blobs.delete(sha)
            removed += len(orphans)
        return removed

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

    def rotate_token(self, device: str) -> str:
        """A new token for ``device``; its old one stops working at once."""
        token = new_token(check_device_id(device))
        self._set_token_hash(device, hash_token(token))
        return token

    def revoke_token(self, device: str) -> None:
        """No token of ``device`` works until `rotate-token` issues a new one; its versions stay."""
        self._set_token_hash(check_device_id(device), REVOKED)

    def _set_token_hash(self, device: str, token_hash: str) -> None:
        if not self.metadata.set_device_token_hash(device, token_hash):
            raise StoreError(404, f"device {device!r} is not registered: check the id (`edge-peft store list`)")

    def remove_device(self, device: str) -> Removed:
        """Delete a device, its token and its versions (global versions already made stay)."""
        blobs = self.metadata.remove_device(check_device_id(device))
        if blobs is None:
            raise StoreError(404, f"device {device!r} is not registered: check the id (`edge-peft store list`)")
        return Removed(len(blobs), self._discard(blobs))

    def authenticate(self, token: str | None) -> Principal:
        principal = authenticate(self.metadata, token)
        if principal.kind == "device":
            now = datetime.now(timezone.utc)
            self.metadata.touch_device(principal.id, now.isoformat(timespec="milliseconds"),
                                       (now - LAST_SEEN_RESOLUTION).isoformat(timespec="milliseconds"))
        return principal

    # --- bases -----------------------------------------------------------------------------------

    def add_base(self, raw_spec: Any) -> tuple[BaseRecord, bool]:
        """Register a base with the adapter spec of its artifact (admin). The same spec again: (record, False);
        another spec for a registered fingerprint: StoreError(409) naming the difference."""
        spec = parse_spec(raw_spec)
        check_fingerprint(spec.base_fingerprint)
        spec_dict = spec.to_dict()
        created = self.metadata.add_base(spec.base_fingerprint, spec_dict, utc_now())
        record = self.metadata.base(spec.base_fingerprint)
        if not created and (difference := spec_difference(record.spec, spec_dict)):
            raise StoreError(409, f"base {spec.base_fingerprint[:19]}... is registered with another spec ({difference}): "
                                  "`edge-peft store remove-base` it first (its adapters go with it)")
        return record, created

    def remove_base(self, base: str) -> Removed:
        """Delete a base with every version and global version of it."""
        blobs = self.metadata.remove_base(check_fingerprint(base))
        if blobs is None:
            raise StoreError(404, f"base {base[:19]}... is not registered: check --base (`edge-peft store list`)")
        return Removed(len(blobs), self._discard(blobs))

    def spec(self, base: str) -> AdapterSpec:
        return AdapterSpec.from_dict(self._base(base).spec)

    def _base(self, base: str) -> BaseRecord:
        record = self.metadata.base(check_fingerprint(base))
        if record is None:
            raise StoreError(404, f"base {base[:19]}... is not registered in this store: the admin registers it with "
                                  "`edge-peft store add-base ARTIFACT`, or check --base")
        return record

    # --- push ------------------------------------------------------------------------------------

    def push(self, base: str, device: str, meta: Any, data: bytes) -> tuple[VersionRecord, bool]:
        """Validate and store one adapter; the same tensors again return the existing version (False).

        Nothing is written unless every check passes; blobs are stored before the one metadata transaction,
        so a crash can leave at most an unreferenced blob (removed at the next start), never a version
        without its bytes; a refused transaction (quota, full disk) removes the blobs it wrote.
        """
        check_device_id(device)
        request, registered = self._upload(base, meta, data, "the push's adapter spec",
                                           "export with the settings the store's admin registered")
        existing = self.metadata.find_version(base, device, sha256=request.sha256)
        if existing is not None:
            return existing, False
        self.limits.check_quota(device, *self.metadata.device_usage(device), len(data))
        spec = AdapterSpec.from_dict(registered.spec)
        if request.parent is not None:
            self._require_parent(base, device, request.parent)
        tensors, file_meta, encoded = self._checked_tensors(spec, data, lambda: self._parent_tensors(base, request))
        full_tensors = _complete(spec, tensors)
        trained = spec.expected_shapes(with_frozen=False)
        content = content_digest(spec, full_tensors)
        existing = self.metadata.find_version(base, device, content_sha256=content)
        if existing is not None:
            return existing, False
        trained_only = not encoded and CHANNELS_KEY not in file_meta and set(tensors) == set(trained)
        blobs, built = {request.sha256: data}, False
        if len(full_tensors) == len(tensors) and CHANNELS_KEY not in file_meta and not encoded:
            full_sha, full_size = request.sha256, len(data)  # the pushed file is the full file
        elif trained_only:  # B only, fp32: a pull builds the full file from it (``adapter_file``)
            (full_sha, full_size), built = adapter_digest(spec, full_tensors, file_meta), True
        else:  # compact (some rank channels) or encoded push: store the full-rank fp32 PEFT file
            meta = {k: v for k, v in file_meta.items() if k != CHANNELS_KEY}
            full = encode_adapter(spec, full_tensors, extra_meta=meta)
            full_sha, full_size = hashlib.sha256(full).hexdigest(), len(full)
            blobs[full_sha] = full
        new = NewVersion(base, registered.spec, device, request.sha256, len(data), full_sha, full_size, content,
                         request.samples, request.steps, request.metrics, request.parent, utc_now(),
                         version_norms(spec, full_tensors, "pushed adapter"), request.sha256 if trained_only else None,
                         built)
        return self._with_blobs(blobs, lambda: self.metadata.record_version(new, self.limits))

    def _upload(self, base: str, meta: Any, data: bytes, what: str, fix: str) -> tuple[PushRequest, BaseRecord]:
        """An upload's checked metadata and its registered base: the spec sent is exactly the base's (409 naming
        the first difference) and the bytes have the sha256 sent (400)."""
        check_fingerprint(base)
        request = parse_push_meta(meta)
        registered = self._base(base)
        if difference := spec_difference(registered.spec, request.spec):
            raise StoreError(409, f"{what} differs from the one base {base[:19]}... is registered with ({difference}): "
                                  f"{fix}")
        if hashlib.sha256(data).hexdigest() != request.sha256:
            raise StoreError(400, "the adapter bytes do not match the sha256 sent: the upload was corrupted; push again")
        return request, registered

    def _require_parent(self, base: str, device: str, parent: Parent) -> None:
        """The version a push was trained from must be in this store: a global version or the device's own.

        Another device's version is refused whatever its existence, so no push learns which versions exist.
        """
        if parent.kind == "global":
            found, what = self.metadata.aggregate(base, parent.version), f"global version {parent.version}"
        elif (parent.device or device) != device:
            raise StoreError(403, "a push may name as parent a global version or a version of the pushing device, "
                                  "not another device's: push with parent null, or train from the global version")
        else:
            found, what = self.metadata.version(base, device, parent.version), f"version {parent.version} of this device"
        if found is None:
            raise StoreError(422, f"parent {what} does not exist for this base: pull the parent from this store "
                                  "before training, or push to the store it came from")

    def _checked_tensors(self, spec: AdapterSpec, data: bytes, parent: Callable[[], dict[str, np.ndarray]]
                         ) -> tuple[dict[str, np.ndarray], dict, bool]:
        """Parse the pushed safetensors (never pickle), decode an int8 or top-k update (``parent``: the global
        version a delta is against) and refuse anything that does not fit ``spec`` (422).
        Returns (float32 tensors, the file's metadata without the encoding, whether it was encoded)."""
        try:
            tensors, file_meta = decode_adapter(data, "pushed adapter")
            if not isinstance(file_meta, dict):
                raise UserError("the pushed adapter's edge-peft metadata is not a JSON object")
            encoding, topk = file_encoding(file_meta, "pushed adapter")
            if encoding != FP32:
                tensors = _decoded(spec, tensors, encoding, topk, parent)
                file_meta = {k: v for k, v in file_meta.items() if k not in (ENCODING_KEY, TOPK_KEY)}
            tensors = expand_if_compact(spec, tensors, file_meta, "pushed adapter")
            check_tensors(spec, tensors, "pushed adapter")
            spec.kind.check_seeded(spec.modules, tensors, "pushed adapter")
        except (UserError, ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise StoreError(422, f"{exc}: push a run directory written by `edge-peft train`"
                             if not isinstance(exc, UserError) else str(exc)) from None
        for key in ("base_fingerprint", "variant", "seed"):
            if key in file_meta and file_meta[key] != getattr(spec, key):
                raise StoreError(422, f"the adapter file says {key}={str(file_meta[key])[:80]!r}, the base's spec says "
                                      f"{getattr(spec, key)!r}: push the run directory the adapter was trained in")
        return tensors, file_meta, encoding != FP32

    def _parent_tensors(self, base: str, request: PushRequest) -> dict[str, np.ndarray]:
        """The tensors of the global version a top-k delta names as its parent (UserError without one)."""
        parent = request.parent
        if parent is None or parent.kind != "global":
            raise UserError("a top-k delta must name as parent the global version it is a delta of: push it from "
                            "a run trained from a pulled global version, or push with --encoding int8")
        record = self.global_version(base, parent.version)
        return decode_adapter(self.blobs.get(record.full_sha256), f"global version {parent.version}")[0]

    # --- blobs of one write ----------------------------------------------------------------------

    def _with_blobs(self, blobs: dict[str, bytes], record: Callable[[], T]) -> T:
        """Store ``blobs`` (sha256 -> bytes), then run ``record``; if either fails, delete the blobs this
        call created that nothing references, so a refused or failed write leaves no file behind."""
        with self._writing_lock:
            self._writing.update(list(blobs))
        created, done = [], False
        try:
            for sha, data in blobs.items():
                if not self.blobs.exists(sha):
                    self.blobs.put(data, sha)  # every caller hashed these bytes already
                    created.append(sha)
            result = record()
            done = True
            return result
        finally:
            with self._writing_lock:
                self._writing.subtract(list(blobs))
                self._writing = +self._writing  # drop zero counts
                if not done:
                    self._discard_unlocked(created)

    def _discard(self, shas: list[str]) -> int:
        """Delete those of ``shas`` that no row references and no write of this process is storing."""
        with self._writing_lock:
            return self._discard_unlocked(shas)

    def _discard_unlocked(self, shas: list[str]) -> int:
        removed = 0
        for sha in shas:
            if not self._writing[sha] and not self.metadata.blob_referenced(sha):
                self.blobs.delete(sha)
                removed += 1
        return removed

    # --- pull ------------------------------------------------------------------------------------

    def device_version(self, base: str, device: str, number: int | None) -> VersionRecord:
        """A device's version (latest when ``number`` is None); its full PEFT file is blob ``full_sha256``."""
        record = self.metadata.version(check_fingerprint(base), check_device_id(device), number)
        if record is None:
            which = "any version" if number is None else f"version {number}"
            raise StoreError(404, f"device {device!r} has no {which} for base {base[:19]}...: check --device/--version")
        return record

    def adapter_file(self, record: VersionRecord | AggregateRecord) -> tuple[bytes, str]:
        """A version's full PEFT file and its sha256: the stored blob, or for a B-only push the file built from
        its trained blob and the base's seeded A (the bytes whose sha256 the push recorded)."""
        if isinstance(record, AggregateRecord) or not record.full_built:
            return self.blobs.get(record.full_sha256), record.full_sha256
        spec = self.spec(record.base)
        tensors, meta = decode_adapter(self.blobs.get(record.trained_sha256), _label(record))
        data = encode_adapter(spec, _complete(spec, tensors), extra_meta=meta)
        return data, hashlib.sha256(data).hexdigest()

    def global_version(self, base: str, number: int | None) -> AggregateRecord:
        """A global aggregate (latest when ``number`` is None); its full PEFT file is blob ``full_sha256``."""
        record = self.metadata.aggregate(check_fingerprint(base), number)
        if record is None:
            which = "no global version yet" if number is None else f"no global version {number}"
            raise StoreError(404, f"base {base[:19]}... has {which}: run `edge-peft store aggregate` first")
        return record

    # --- aggregate -------------------------------------------------------------------------------

    def aggregate(self, base: str, policy: AggregationPolicy = AggregationPolicy()) -> tuple[AggregateRecord, bool, dict]:
        """Average the latest version of every device into a new global version, as ``policy`` says.

        Returns (record, created, report); the latest global version unchanged (False) when no device pushed
        since it was made. The global file's metadata names how many devices went in, never their samples.
        """
        spec = self.spec(base)
        latest = self.metadata.latest_versions(base)
        if not latest:
            raise StoreError(409, f"base {base[:19]}... has no device versions to aggregate: push adapters first")
        inputs = [v.id for v in latest]
        current = self.metadata.aggregate(base, None)
        if current is not None and sorted(current.inputs) == sorted(inputs):
            return current, False, {}
        with Prefetch(self.blobs, [(v.trained_sha256 or v.full_sha256, _label(v)) for v in latest]) as ahead:
            sources = [Source(_label(v), v.samples, functools.partial(ahead.get, i), norms=v.norms)
                       for i, v in enumerate(latest)]
            try:
                tensors, report = aggregate(spec, sources, policy.checked())
            except UserError as exc:
                raise StoreError(409, str(exc)) from None
        data = encode_adapter(spec, tensors, extra_meta={"devices": report["devices"]})
        sha = hashlib.sha256(data).hexdigest()
        samples = min(sum(v.samples for v in latest), MAX_TOTAL_SAMPLES)
        record, created = self._with_blobs({sha: data}, lambda: self.metadata.record_aggregate(
            base, inputs, sha, len(data), samples, utc_now()))
        return record, created, report

    def add_global(self, base: str, meta: Any, data: bytes) -> tuple[AggregateRecord, bool]:
        """Store a global version averaged elsewhere (a federated learning server's round) as the base's next
        global version, for devices to pull as any other; the same tensors as the latest return it (False)."""
        request, registered = self._upload(base, meta, data, "the global adapter's spec",
                                           "average adapters of the registered export")
        spec = AdapterSpec.from_dict(registered.spec)
        tensors, file_meta, _ = self._checked_tensors(spec, data, _no_parent)
        full = encode_adapter(spec, _complete(spec, tensors), extra_meta=file_meta)
        sha = hashlib.sha256(full).hexdigest()
        return self._with_blobs({sha: full}, lambda: self.metadata.record_aggregate(
            base, [], sha, len(full), request.samples, utc_now()))



def _no_parent() -> dict[str, np.ndarray]:
    raise UserError("a global version is sent whole (fp32 or int8), not as a top-k delta")


def _label(version: VersionRecord) -> str:
    return f"device {version.device} version {version.number}"


class Prefetch:
    """Reads and parses adapters a few ahead of their use on threads (an S3 read waits on the network), for a
    caller that reads them in order: ``get(i)`` returns the tensors of blob ``i``, starting the next reads."""

    def __init__(self, blobs: BlobStore, items: list[tuple[str, str]], ahead: int = PREFETCH) -> None:
        self.blobs, self.items, self.ahead = blobs, items, ahead
        self.pool = ThreadPoolExecutor(ahead, thread_name_prefix="edge-peft-prefetch")
        self.pending: dict[int, Future] = {}

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)

    def _read(self, i: int) -> dict[str, np.ndarray]:
        sha, label = self.items[i]
        return decode_adapter(self.blobs.get(sha), label)[0]

    def get(self, i: int) -> dict[str, np.ndarray]:
        for j in range(i, min(i + self.ahead, len(self.items))):
            if j not in self.pending:
                self.pending[j] = self.pool.submit(self._read, j)
        return self.pending.pop(i).result()


def _decoded(spec: AdapterSpec, sent: dict[str, np.ndarray], encoding: str, topk: float,
             parent: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """float32 tensors of an encoded push: int8 in the shapes it was sent in (B-only, compact or a rank prefix,
    checked against the spec afterwards); a top-k delta added to every trained tensor of its parent."""
    if encoding == TOPK:
        shapes = spec.expected_shapes(with_frozen=False)
        reference = parent()
        return decode_update(shapes, sent, encoding, "pushed update", {k: reference[k] for k in shapes}, topk)
    shapes = {k: tuple(v.shape) for k, v in sent.items() if not k.endswith(SCALE_SUFFIX)}
    return decode_update(shapes, sent, encoding, "pushed update")


def content_digest(spec: AdapterSpec, tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and values of the trained tensors (a seeded A follows from the
    spec): equal for equal adapters however the file was written, in full or B only (safetensors does not fix
    the order of header metadata, so file bytes are not a stable identity)."""
    h = hashlib.sha256()
    for key in sorted(spec.expected_shapes(with_frozen=False)):
        arr = np.ascontiguousarray(tensors[key])
        h.update(f"{key}|{arr.dtype.newbyteorder('<').str}|{list(arr.shape)}|".encode())
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))  # no copy
    return h.hexdigest()


def _complete(spec: AdapterSpec, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``complete_tensors``, with a frozen-A variant's seeded A taken from a per-base cache (regenerating them
    cost a 1B-class push 13 ms of CPU; they are the same for every push to a base)."""
    if spec.kind.trains_a:
        return complete_tensors(spec, tensors)
    return {**_seeded_a(tuple((m.name, m.a_seed, m.rank, m.in_features) for m in spec.modules)), **tensors}


@functools.lru_cache(maxsize=2)  # 4 MiB for a 1B-class base at rank 8
def _seeded_a(modules: tuple[tuple[str, int, int, int], ...]) -> dict[str, np.ndarray]:
    """The seeded A of every module by PEFT key, read-only (shared by every push to the base)."""
    out = {}
    for name, seed, rank, in_features in modules:
        a = lora_a_from_seed(seed, rank, in_features)
        a.flags.writeable = False
        out[peft_key(a_name(name))] = a
    return out
