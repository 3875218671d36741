"""``MetadataStore`` written once in SQL that SQLite and PostgreSQL both run (``db.py``, ``pg.py``).

A dialect subclass supplies connections (``_connect``), write transactions (``_transaction``), a lock that
serialises the writers of one key across processes (``_lock``), its migrations and the integrity error its
driver raises. Queries use ``?`` placeholders; the PostgreSQL connection wrapper turns them into ``%s``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Protocol, Sequence

from .limits import StoreLimits
from .storage import AggregateRecord, BaseRecord, DeviceRecord, NewVersion, Parent, StoreError, VersionRecord

ADMIN_KEY = "admin_token_hash"


TRAINED_COLUMNS = (  # migration: what aggregation reads instead of each full file twice (see NewVersion)
    "ALTER TABLE versions ADD COLUMN norms_json TEXT",
    "ALTER TABLE versions ADD COLUMN trained_sha256 TEXT",
)
FULL_BUILT_COLUMN = (  # migration: a B-only push's full file is built at pull instead of stored (see NewVersion)
    "ALTER TABLE versions ADD COLUMN full_built INTEGER NOT NULL DEFAULT 0",
)

class Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...


class SqlMetadata:
    """Bases, devices, versions and aggregates over a SQL database; every write is one transaction."""

    integrity_errors: tuple[type[Exception], ...] = ()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Connection]:
        raise NotImplementedError

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        raise NotImplementedError

    def _lock(self, con: Connection, key: str) -> None:
        """Serialise the transactions that take the same ``key`` until they end (SQLite: the write lock does)."""

    def _apply_migrations(self, con: Connection, migrations: Sequence[tuple[str, ...]], where: str) -> None:
        """Bring the schema to ``len(migrations)`` inside the caller's transaction; refuse a newer schema."""
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = con.execute("SELECT version FROM schema_version").fetchone()
        current = row[0] if row else 0
        if row is None:
            con.execute("INSERT INTO schema_version (version) VALUES (0)")
        if current > len(migrations):
            raise StoreError(500, f"{where} has schema version {current}, this edge-peft knows up to "
                                  f"{len(migrations)}: upgrade edge-peft")
        for statements in migrations[current:]:
            for sql in statements:
                con.execute(sql)
        con.execute("UPDATE schema_version SET version = ?", (len(migrations),))

    def schema_version(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT version FROM schema_version").fetchone()[0]

    # --- admin and devices -------------------------------------------------------------------

    def admin_token_hash(self) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT value FROM settings WHERE key = ?", (ADMIN_KEY,)).fetchone()
        return row[0] if row else None

    def set_admin_token_hash(self, token_hash: str, now: str, replace: bool = False) -> bool:
        conflict = "DO UPDATE SET value = excluded.value, updated = excluded.updated" if replace else "DO NOTHING"
        with self._transaction() as con:
            cur = con.execute(f"INSERT INTO settings (key, value, updated) VALUES (?, ?, ?) ON CONFLICT (key) {conflict}",
                              (ADMIN_KEY, token_hash, now))
        return cur.rowcount == 1

    def add_device(self, device: str, token_hash: str, now: str) -> None:
        try:
            with self._transaction() as con:
                con.execute("INSERT INTO devices (id, token_hash, created) VALUES (?, ?, ?)", (device, token_hash, now))
        except self.integrity_errors:
            raise StoreError(409, f"device {device!r} is already registered: choose another id") from None

    def device_token_hash(self, device: str) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT token_hash FROM devices WHERE id = ?", (device,)).fetchone()
        return row[0] if row else None

    def set_device_token_hash(self, device: str, token_hash: str) -> bool:
        with self._transaction() as con:
            return con.execute("UPDATE devices SET token_hash = ? WHERE id = ?", (token_hash, device)).rowcount == 1

    def remove_device(self, device: str) -> list[str] | None:
        with self._transaction() as con:
            self._lock(con, f"device:{device}")
            if con.execute("SELECT 1 FROM devices WHERE id = ?", (device,)).fetchone() is None:
                return None
            blobs = _blobs_of(con, "SELECT sha256, full_sha256 FROM versions WHERE device = ?", (device,))
            con.execute("DELETE FROM aggregate_inputs WHERE version_id IN (SELECT id FROM versions WHERE device = ?)",
                        (device,))
            con.execute("DELETE FROM versions WHERE device = ?", (device,))
            con.execute("DELETE FROM devices WHERE id = ?", (device,))
        return blobs

    def device_usage(self, device: str) -> tuple[int, int]:
        with self._connect() as con:
            return _usage(con, device)

    def touch_device(self, device: str, now: str, unless_seen_after: str) -> None:
        """Set last_seen, skipping the write when it is already more recent than ``unless_seen_after``."""
        with self._transaction() as con:
            con.execute("UPDATE devices SET last_seen = ? WHERE id = ? AND (last_seen IS NULL OR last_seen < ?)",
                        (now, device, unless_seen_after))

    def devices(self) -> list[DeviceRecord]:
        with self._connect() as con:
            rows = con.execute("SELECT id, created, last_seen FROM devices ORDER BY id").fetchall()
        return [DeviceRecord(r["id"], r["created"], r["last_seen"]) for r in rows]

    # --- bases and versions ------------------------------------------------------------------

    def base(self, fingerprint: str) -> BaseRecord | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM bases WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return _base(row) if row else None

    def bases(self) -> list[BaseRecord]:
        with self._connect() as con:
            return [_base(r) for r in con.execute("SELECT * FROM bases ORDER BY created").fetchall()]

    def add_base(self, fingerprint: str, spec: dict, now: str) -> bool:
        with self._transaction() as con:
            cur = con.execute("INSERT INTO bases (fingerprint, spec_json, created) VALUES (?, ?, ?) "
                              "ON CONFLICT (fingerprint) DO NOTHING", (fingerprint, json.dumps(spec, sort_keys=True), now))
        return cur.rowcount == 1

    def remove_base(self, fingerprint: str) -> list[str] | None:
        with self._transaction() as con:
            self._lock(con, f"aggregate:{fingerprint}")
            if con.execute("SELECT 1 FROM bases WHERE fingerprint = ?", (fingerprint,)).fetchone() is None:
                return None
            blobs = _blobs_of(con, "SELECT sha256, full_sha256 FROM versions WHERE base = ? UNION ALL "
                                   "SELECT full_sha256, full_sha256 FROM aggregates WHERE base = ?", (fingerprint,) * 2)
            con.execute("DELETE FROM aggregate_inputs WHERE aggregate_id IN (SELECT id FROM aggregates WHERE base = ?)",
                        (fingerprint,))
            con.execute("DELETE FROM aggregate_inputs WHERE version_id IN (SELECT id FROM versions WHERE base = ?)",
                        (fingerprint,))
            con.execute("DELETE FROM aggregates WHERE base = ?", (fingerprint,))
            con.execute("DELETE FROM versions WHERE base = ?", (fingerprint,))
            con.execute("DELETE FROM bases WHERE fingerprint = ?", (fingerprint,))
        return blobs

    def referenced_blobs(self) -> set[str]:
        with self._connect() as con:
            return set(_blobs_of(con, "SELECT sha256, full_sha256 FROM versions UNION ALL "
                                      "SELECT full_sha256, full_sha256 FROM aggregates", ()))

    def blob_referenced(self, sha256: str) -> bool:
        with self._connect() as con:
            return con.execute("SELECT 1 FROM versions WHERE sha256 = ? OR full_sha256 = ? UNION ALL "
                               "SELECT 1 FROM aggregates WHERE full_sha256 = ? LIMIT 1", (sha256,) * 3).fetchone() is not None

    def find_version(self, base: str, device: str, sha256: str | None = None,
                     content_sha256: str | None = None) -> VersionRecord | None:
        column, value = ("sha256", sha256) if sha256 else ("content_sha256", content_sha256)
        with self._connect() as con:
            row = con.execute(f"SELECT * FROM versions WHERE base = ? AND device = ? AND {column} = ?",
                              (base, device, value)).fetchone()
        return _version(row) if row else None

    def record_version(self, new: NewVersion, limits: StoreLimits | None = None) -> tuple[VersionRecord, bool]:
        with self._transaction() as con:
            self._lock(con, f"device:{new.device}")  # numbering and the device's quota, across processes
            row = con.execute("SELECT spec_json FROM bases WHERE fingerprint = ?", (new.base,)).fetchone()
            if row is None or json.loads(row[0]) != new.spec:
                raise StoreError(409, f"base {new.base[:19]}... was removed or registered again with another spec "
                                      "while this push was checked: push again")
            existing = con.execute("SELECT * FROM versions WHERE base = ? AND device = ? AND content_sha256 = ?",
                                   (new.base, new.device, new.content_sha256)).fetchone()
            if existing is not None:
                return _version(existing), False
            if limits is not None:
                limits.check_quota(new.device, *_usage(con, new.device), new.stored_bytes)
            number = con.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM versions WHERE base = ? AND device = ?",
                                 (new.base, new.device)).fetchone()[0]
            p = new.parent
            row = con.execute(
                """INSERT INTO versions (base, device, number, sha256, size, full_sha256, full_size, content_sha256,
                   samples, steps, metrics_json, parent_kind, parent_device, parent_number, created, norms_json,
                   trained_sha256, full_built)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *""",
                (new.base, new.device, number, new.sha256, new.size, new.full_sha256, new.full_size,
                 new.content_sha256, new.samples, new.steps, json.dumps(new.metrics, sort_keys=True), p and p.kind,
                 p and p.device, p and p.version, new.created, json.dumps(new.norms) if new.norms else None,
                 new.trained_sha256, int(new.full_built))).fetchall()[0]
            con.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (new.created, new.device))
        return _version(row), True

    def version(self, base: str, device: str, number: int | None) -> VersionRecord | None:
        with self._connect() as con:
            if number is None:
                row = con.execute("SELECT * FROM versions WHERE base = ? AND device = ? ORDER BY number DESC LIMIT 1",
                                  (base, device)).fetchone()
            else:
                row = con.execute("SELECT * FROM versions WHERE base = ? AND device = ? AND number = ?",
                                  (base, device, number)).fetchone()
        return _version(row) if row else None

    def versions(self, base: str, device: str | None = None) -> list[VersionRecord]:
        where, args = ("base = ? AND device = ?", (base, device)) if device is not None else ("base = ?", (base,))
        with self._connect() as con:
            rows = con.execute(f"SELECT * FROM versions WHERE {where} ORDER BY id", args).fetchall()
        return [_version(r) for r in rows]

    def latest_versions(self, base: str) -> list[VersionRecord]:
        with self._connect() as con:
            rows = con.execute(
                """SELECT v.* FROM versions v
                   JOIN (SELECT device, MAX(number) AS n FROM versions WHERE base = ? GROUP BY device) l
                     ON v.device = l.device AND v.number = l.n
                   WHERE v.base = ? ORDER BY v.device""", (base, base)).fetchall()
        return [_version(r) for r in rows]

    # --- aggregates ----------------------------------------------------------------------------

    def record_aggregate(self, base: str, inputs: list[int], full_sha256: str, full_size: int,
                         samples: int, now: str) -> tuple[AggregateRecord, bool]:
        with self._transaction() as con:
            self._lock(con, f"aggregate:{base}")  # two processes aggregating the same inputs make one version
            latest = _latest_aggregate(con, base)
            same = (sorted(latest.inputs) == sorted(inputs) if inputs else latest.full_sha256 == full_sha256) \
                if latest is not None else False  # no inputs: a global made elsewhere (a Flower server's round)
            if same:
                return latest, False
            number = (latest.number if latest else 0) + 1
            row = con.execute("""INSERT INTO aggregates (base, number, full_sha256, full_size, samples, created)
                                 VALUES (?, ?, ?, ?, ?, ?) RETURNING *""",
                              (base, number, full_sha256, full_size, samples, now)).fetchall()[0]
            con.executemany("INSERT INTO aggregate_inputs (aggregate_id, version_id) VALUES (?, ?)",
                            [(row["id"], v) for v in inputs])
            record = _aggregate(con, row)
        return record, True

    def aggregate(self, base: str, number: int | None) -> AggregateRecord | None:
        with self._connect() as con:
            if number is None:
                return _latest_aggregate(con, base)
            row = con.execute("SELECT * FROM aggregates WHERE base = ? AND number = ?", (base, number)).fetchone()
            return _aggregate(con, row) if row else None

    def aggregates(self, base: str) -> list[AggregateRecord]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM aggregates WHERE base = ? ORDER BY number", (base,)).fetchall()
            return [_aggregate(con, r) for r in rows]


def _usage(con: Connection, device: str) -> tuple[int, int]:
    """(versions, bytes) a device keeps: pushed files, and the full files the store completed and stored."""
    row = con.execute("SELECT COUNT(*), COALESCE(SUM(size + CASE WHEN full_sha256 != sha256 AND full_built = 0 "
                      "THEN full_size ELSE 0 END), 0) "
                      "FROM versions WHERE device = ?", (device,)).fetchone()
    return int(row[0]), int(row[1])  # PostgreSQL sums bigints as numeric


def _blobs_of(con: Connection, sql: str, args: tuple) -> list[str]:
    """The distinct blob digests in the two columns ``sql`` selects."""
    return sorted({sha for row in con.execute(sql, args).fetchall() for sha in row})


def _latest_aggregate(con: Connection, base: str) -> AggregateRecord | None:
    row = con.execute("SELECT * FROM aggregates WHERE base = ? ORDER BY number DESC LIMIT 1", (base,)).fetchone()
    return _aggregate(con, row) if row else None


def _base(row: Any) -> BaseRecord:
    return BaseRecord(row["fingerprint"], json.loads(row["spec_json"]), row["created"])


def _version(row: Any) -> VersionRecord:
    parent = None
    if row["parent_kind"] is not None:
        parent = Parent(row["parent_kind"], row["parent_number"], row["parent_device"])
    return VersionRecord(
        row["id"], row["base"], row["device"], row["number"], row["sha256"], row["size"], row["full_sha256"],
        row["full_size"], row["content_sha256"], row["samples"], row["steps"], json.loads(row["metrics_json"]),
        parent, row["created"], json.loads(row["norms_json"]) if row["norms_json"] else None, row["trained_sha256"],
        bool(row["full_built"]))


def _aggregate(con: Connection, row: Any) -> AggregateRecord:
    inputs = [r[0] for r in con.execute("SELECT version_id FROM aggregate_inputs WHERE aggregate_id = ? ORDER BY version_id",
                                        (row["id"],)).fetchall()]
    return AggregateRecord(row["id"], row["base"], row["number"], row["full_sha256"], row["full_size"],
                           row["samples"], inputs, row["created"])
