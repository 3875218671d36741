"""SQLite metadata store with an ordered list of schema migrations (the embedded default)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

from .data_dir import private_file
from .sql import FULL_BUILT_COLUMN, TRAINED_COLUMNS, SqlMetadata
from .storage import StoreError

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
    TRAINED_COLUMNS,
    FULL_BUILT_COLUMN,
]
SCHEMA_VERSION = len(MIGRATIONS)
# Connections kept open between operations: opening one, and closing the last one (a WAL checkpoint), cost a
# push about a millisecond each, several times over.
IDLE_CONNECTIONS = 8


class SqliteMetadata(SqlMetadata):
    """``MetadataStore`` on one SQLite file in WAL mode; each operation borrows a connection from a few kept open."""

    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._idle: list[sqlite3.Connection] = []
        self._idle_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for name in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
            if name == self.path or name.exists():
                private_file(name)  # SQLite gives its -wal and -shm files the database file's mode
        self.migrate()

    def close(self) -> None:
        """Close the connections kept open (the store can still be used: it opens new ones)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()

    def _open(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = FULL")  # an acknowledged version survives power loss
        return con

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one operation (one thread at a time); closed instead of kept after an error."""
        with self._idle_lock:
            con = self._idle.pop() if self._idle else None
        con = con or self._open()
        try:
            yield con
        except BaseException:
            con.close()
            raise
        with self._idle_lock:
            if len(self._idle) < IDLE_CONNECTIONS and not con.in_transaction:
                self._idle.append(con)
                return
        con.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE serialises all writers, so ``_lock`` has nothing to add."""
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
            self._apply_migrations(con, MIGRATIONS, str(self.path))
