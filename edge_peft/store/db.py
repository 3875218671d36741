"""SQLite metadata store with an ordered list of schema migrations (the embedded default)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterator

from .data_dir import private_file
from .limits import StoreLimits
from .storage import AggregateRecord, BaseRecord, DeviceRecord, NewVersion, Parent, StoreError, VersionRecord

# Append only: migration i (1-based) takes the schema from version i-1 to i. Never edit a released one.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated TEXT NOT NULL)",
        "CREATE TABLE bases (fingerprint TEXT PRIMARY KEY, spec_json TEXT NOT NULL, created TEXT NOT NULL)",
        "CREATE TABLE devices (id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, created TEXT NOT NULL, last_seen TEXT)",
        """CREATE TABLE versions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            base TEXT NOT NULL REFERENCES bases(fingerprint),
            device TEXT NOT NULL REFERENCES devices(id),
            number INTEGER NOT NULL,
            sha256 TEXT NOT NULL, size INTEGER NOT NULL,
            full_sha256 TEXT NOT NULL, full_size INTEGER NOT NULL, content_sha256 TEXT NOT NULL,
            samples INTEGER NOT NULL, steps INTEGER NOT NULL, metrics_json TEXT NOT NULL,
            parent_kind TEXT, parent_device TEXT, parent_number INTEGER,
            created TEXT NOT NULL,
            UNIQUE (base, device, number), UNIQUE (base, device, content_sha256))""",
        """CREATE TABLE aggregates (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            base TEXT NOT NULL REFERENCES bases(fingerprint),
            number INTEGER NOT NULL,
            full_sha256 TEXT NOT NULL, full_size INTEGER NOT NULL, samples INTEGER NOT NULL,
            created TEXT NOT NULL,
            UNIQUE (base, number))""",
        """CREATE TABLE aggregate_inputs (
            aggregate_id INTEGER NOT NULL REFERENCES aggregates(id),
            version_id INTEGER NOT NULL REFERENCES versions(id),
            PRIMARY KEY (aggregate_id, version_id))""",
    ),
    (  # per-device quotas count a device's versions across bases
        "CREATE INDEX versions_by_device ON versions (device)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
ADMIN_KEY = "admin_token_hash"


class SqliteMetadata:
    """``MetadataStore`` on one SQLite file in WAL mode; a short-lived connection per operation."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for name in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
            if name == self.path or name.exists():
                private_file(name)  # SQLite gives its -wal and -shm files the database file's mode
        self.migrate()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA synchronous = FULL")  # an acknowledged version survives power loss
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE serialises writers so numbering cannot race."""
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):  # SQLITE_FULL: "database or disk is full"
                    raise StoreError(507, f"the store cannot write its metadata ({exc}): nothing was stored; "
                                          "the admin must free disk space, then push again") from None
                raise

    def migrate(self) -> None:
        """Bring the schema up to ``SCHEMA_VERSION`` in one transaction; refuse a newer schema."""
        with self._connect() as con:
            con.execute("PRAGMA journal_mode = WAL")
        with self._transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = con.execute("SELECT version FROM schema_version").fetchone()
            current = row[0] if row else 0
            if row is None:
                con.execute("INSERT INTO schema_version (version) VALUES (0)")
            if current > SCHEMA_VERSION:
                raise StoreError(500, f"{self.path} has schema version {current}, this edge-peft knows up to "
                                      f"{SCHEMA_VERSION}: upgrade edge-peft")
            for statements in MIGRATIONS[current:]:
                for sql in statements:
                    con.execute(sql)
            con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT version FROM schema_version").fetchone()[0]

    # --- admin and devices -------------------------------------------------------------------

    def admin_token_hash(self) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT value FROM settings WHERE key = ?", (ADMIN_KEY,)).fetchone()
        return row[0] if row else None

    def set_admin_token_hash(self, token_hash: str, now: str, replace: bool = False) -> bool:
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._transaction() as con:
            cur = con.execute(f"{verb} INTO settings (key, value, updated) VALUES (?, ?, ?)", (ADMIN_KEY, token_hash, now))
        return cur.rowcount == 1

    def add_device(self, device: str, token_hash: str, now: str) -> None:
        try:
            with self._transaction() as con:
                con.execute("INSERT INTO devices (id, token_hash, created) VALUES (?, ?, ?)", (device, token_hash, now))
        except sqlite3.IntegrityError:
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
            cur = con.execute("INSERT OR IGNORE INTO bases (fingerprint, spec_json, created) VALUES (?, ?, ?)",
                              (fingerprint, json.dumps(spec, sort_keys=True), now))
        return cur.rowcount == 1

    def remove_base(self, fingerprint: str) -> list[str] | None:
        with self._transaction() as con:
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
            return con.execute("SELECT 1 FROM versions WHERE sha256 = ?1 OR full_sha256 = ?1 UNION ALL "
                               "SELECT 1 FROM aggregates WHERE full_sha256 = ?1 LIMIT 1", (sha256,)).fetchone() is not None

    def find_version(self, base: str, device: str, sha256: str | None = None,
                     content_sha256: str | None = None) -> VersionRecord | None:
        column, value = ("sha256", sha256) if sha256 else ("content_sha256", content_sha256)
        with self._connect() as con:
            row = con.execute(f"SELECT * FROM versions WHERE base = ? AND device = ? AND {column} = ?",
                              (base, device, value)).fetchone()
        return _version(row) if row else None

    def record_version(self, new: NewVersion, limits: StoreLimits | None = None) -> tuple[VersionRecord, bool]:
        with self._transaction() as con:
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
            cur = con.execute(
                """INSERT INTO versions (base, device, number, sha256, size, full_sha256, full_size, content_sha256,
                   samples, steps, metrics_json, parent_kind, parent_device, parent_number, created)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (new.base, new.device, number, new.sha256, new.size, new.full_sha256, new.full_size,
                 new.content_sha256, new.samples, new.steps, json.dumps(new.metrics, sort_keys=True), p and p.kind,
                 p and p.device, p and p.version, new.created))
            con.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (new.created, new.device))
            row = con.execute("SELECT * FROM versions WHERE id = ?", (cur.lastrowid,)).fetchone()
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
        with self._connect() as con:
            rows = con.execute("SELECT * FROM versions WHERE base = ? AND (? IS NULL OR device = ?) ORDER BY id",
                               (base, device, device)).fetchall()
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
            latest = _latest_aggregate(con, base)
            if latest is not None and sorted(latest.inputs) == sorted(inputs):
                return latest, False
            number = (latest.number if latest else 0) + 1
            cur = con.execute("""INSERT INTO aggregates (base, number, full_sha256, full_size, samples, created)
                                 VALUES (?, ?, ?, ?, ?, ?)""", (base, number, full_sha256, full_size, samples, now))
            con.executemany("INSERT INTO aggregate_inputs (aggregate_id, version_id) VALUES (?, ?)",
                            [(cur.lastrowid, v) for v in inputs])
            record = _aggregate(con, con.execute("SELECT * FROM aggregates WHERE id = ?", (cur.lastrowid,)).fetchone())
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


def _usage(con: sqlite3.Connection, device: str) -> tuple[int, int]:
    """(versions, bytes) a device keeps: pushed files, and the full files the store completed from them."""
    row = con.execute("SELECT COUNT(*), COALESCE(SUM(size + CASE WHEN full_sha256 != sha256 THEN full_size ELSE 0 END), 0) "
                      "FROM versions WHERE device = ?", (device,)).fetchone()
    return row[0], row[1]


def _blobs_of(con: sqlite3.Connection, sql: str, args: tuple) -> list[str]:
    """The distinct blob digests in the two columns ``sql`` selects."""
    return sorted({sha for row in con.execute(sql, args).fetchall() for sha in row})


def _latest_aggregate(con: sqlite3.Connection, base: str) -> AggregateRecord | None:
    row = con.execute("SELECT * FROM aggregates WHERE base = ? ORDER BY number DESC LIMIT 1", (base,)).fetchone()
    return _aggregate(con, row) if row else None


def _base(row: sqlite3.Row) -> BaseRecord:
    return BaseRecord(row["fingerprint"], json.loads(row["spec_json"]), row["created"])


def _version(row: sqlite3.Row) -> VersionRecord:
    parent = None
    if row["parent_kind"] is not None:
        parent = Parent(row["parent_kind"], row["parent_number"], row["parent_device"])
    return VersionRecord(
        row["id"], row["base"], row["device"], row["number"], row["sha256"], row["size"], row["full_sha256"],
        row["full_size"], row["content_sha256"], row["samples"], row["steps"], json.loads(row["metrics_json"]),
        parent, row["created"])


def _aggregate(con: sqlite3.Connection, row: sqlite3.Row) -> AggregateRecord:
    inputs = [r[0] for r in con.execute("SELECT version_id FROM aggregate_inputs WHERE aggregate_id = ? ORDER BY version_id",
                                        (row["id"],)).fetchall()]
    return AggregateRecord(row["id"], row["base"], row["number"], row["full_sha256"], row["full_size"],
                           row["samples"], inputs, row["created"])

