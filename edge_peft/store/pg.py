"""PostgreSQL metadata store (psycopg 3 with a connection pool): the SQL of ``sql.py``, safe across processes.

Writers of one device (numbering, quota) and of one base's aggregates take a transaction-scoped advisory lock
(``pg_advisory_xact_lock``), so several store processes number versions gap-free and make one global version
from the same inputs; the unique constraints stay as the backstop. Migrations run under an advisory lock too,
so processes starting together migrate once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool, PoolTimeout

from .sql import FULL_BUILT_COLUMN, TRAINED_COLUMNS, SqlMetadata
from .storage import StoreError

_BIG = "BIGINT NOT NULL"
# Append only, as in db.py; PostgreSQL's own list (its types differ from SQLite's).
MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated TEXT NOT NULL)",
        "CREATE TABLE bases (fingerprint TEXT PRIMARY KEY, spec_json TEXT NOT NULL, created TEXT NOT NULL)",
        "CREATE TABLE devices (id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, created TEXT NOT NULL, last_seen TEXT)",
        f"""CREATE TABLE versions (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            base TEXT NOT NULL REFERENCES bases(fingerprint),
            device TEXT NOT NULL REFERENCES devices(id),
            number {_BIG},
            sha256 TEXT NOT NULL, size {_BIG},
            full_sha256 TEXT NOT NULL, full_size {_BIG}, content_sha256 TEXT NOT NULL,
            samples {_BIG}, steps {_BIG}, metrics_json TEXT NOT NULL,
            parent_kind TEXT, parent_device TEXT, parent_number BIGINT,
            created TEXT NOT NULL,
            UNIQUE (base, device, number), UNIQUE (base, device, content_sha256))""",
        f"""CREATE TABLE aggregates (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            base TEXT NOT NULL REFERENCES bases(fingerprint),
            number {_BIG},
            full_sha256 TEXT NOT NULL, full_size {_BIG}, samples {_BIG},
            created TEXT NOT NULL,
            UNIQUE (base, number))""",
        """CREATE TABLE aggregate_inputs (
            aggregate_id BIGINT NOT NULL REFERENCES aggregates(id),
            version_id BIGINT NOT NULL REFERENCES versions(id),
            PRIMARY KEY (aggregate_id, version_id))""",
        "CREATE INDEX versions_by_device ON versions (device)",
    ),
    TRAINED_COLUMNS,
    FULL_BUILT_COLUMN,
]
SCHEMA_VERSION = len(MIGRATIONS)
MIGRATION_LOCK = 0x6564676570656674  # "edgepeft": one advisory lock id for schema changes
POOL_SIZE = 8


class Row:
    """A result row read by position or by column name, like ``sqlite3.Row``."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: list[str], values: Sequence[Any]) -> None:
        self._names, self._values = names, values

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key] if isinstance(key, int) else self._values[self._names.index(key)]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)


def _row_factory(cursor: psycopg.Cursor) -> Any:
    names = [c.name for c in cursor.description or ()]
    return lambda values: Row(names, values)


class _Connection:
    """A psycopg connection speaking ``sql.py``'s ``?`` placeholders."""

    def __init__(self, con: psycopg.Connection) -> None:
        self.con = con

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        return self.con.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.con.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    parts = urlsplit(dsn)
    host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    return f"{parts.scheme}://{parts.username + '@' if parts.username else ''}{host}{parts.path}"


class PostgresMetadata(SqlMetadata):
    """``MetadataStore`` on PostgreSQL, one pool of connections per process."""

    integrity_errors = (psycopg.IntegrityError,)

    def __init__(self, dsn: str, pool_size: int = POOL_SIZE) -> None:
        self.where = redact(dsn)
        try:
            psycopg.connect(dsn, connect_timeout=10).close()  # a clear error now rather than a pool timeout later
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreError(500, f"cannot connect to PostgreSQL at {self.where} ({reason}): check --database "
                                  "and that the server is running") from None
        self.pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, open=True, timeout=60,
                                   kwargs={"autocommit": True, "row_factory": _row_factory})
        try:
            self.migrate()
        except BaseException:
            self.pool.close()
            raise

    def close(self) -> None:
        self.pool.close()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[_Connection]:
        try:
            with self.pool.connection() as con:
                yield _Connection(con)
        except PoolTimeout:
            raise StoreError(503, f"no PostgreSQL connection free at {self.where} within 60 s: retry later",
                             {"Retry-After": "5"}) from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_Connection]:
        try:
            with self._connect() as wrapped, wrapped.con.transaction():
                yield wrapped
        except errors.DiskFull as exc:
            raise StoreError(507, f"PostgreSQL cannot write the store's metadata ({exc}): nothing was stored; "
                                  "the admin must free disk space, then push again") from None

    def _lock(self, con: _Connection, key: str) -> None:
        con.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))

    def migrate(self) -> None:
        """Bring the schema up to ``SCHEMA_VERSION`` in one transaction; refuse a newer schema."""
        with self._transaction() as con:
            con.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            self._apply_migrations(con, MIGRATIONS, self.where)
