"""The journal's database: SQLite (embedded, one process or one host) or PostgreSQL (shared
by replicas), behind one small interface, so the journal has one code path for both.

Why a thin layer over `sqlite3` and `psycopg` 3 (with `psycopg_pool`) rather than SQLAlchemy
Core: the journal is a dozen short statements, and the two dialects differ in four places
only (placeholders, the clock, `FOR UPDATE SKIP LOCKED`, the migration lock); a layer of a
hundred lines states those differences where they are read, adds two small dependencies
instead of a large one, and keeps SQLite's one-connection-under-a-lock design that the
benchmarks were measured with.

SQL is written once, with `?` placeholders and three tokens: `$NOW` (the database's clock in
epoch seconds, so leases do not depend on the replicas' clocks), `$REAL` (a float column:
PostgreSQL's REAL is 4 bytes, too coarse for timestamps) and `$SKIP_LOCKED` (`FOR UPDATE
SKIP LOCKED` on PostgreSQL, where replicas claim rows at once; nothing on SQLite, whose
`BEGIN IMMEDIATE` already makes each claim alone).
"""
from __future__ import annotations

import abc
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import ServiceError

log = logging.getLogger(__name__)
Rows = list[dict[str, Any]]
POOL_SIZE = 16         # connections per replica: journal calls are short; 128 threads share them
POOL_TIMEOUT = 5.0     # seconds to wait for a free connection: past it, a 503 (PostgreSQL is away)


class Conflict(Exception):
    """A unique constraint refused a row (a racing Idempotency-Key, say)."""


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached. Never carries the URL: it may hold a password."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(503, f"The job journal ({what}) is unavailable; try again shortly",
                         headers={"Retry-After": "5"})
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.message} ({self.reason})"


class Database(abc.ABC):
    """What the journal needs: one statement, or several in one transaction."""

    dialect = ""
    name = ""

    def query(self, sql: str, args: Iterable[Any] = ()) -> Rows:
        """Run one statement in its own transaction; its rows ([] for none)."""
        rows: Rows = []
        with self.transaction(single=True) as tx:  # may end early, quietly, once the database is closed
            rows = tx.query(sql, args)
        return rows

    @abc.abstractmethod
    def transaction(self, single: bool = False) -> contextlib.AbstractContextManager[Transaction]:
        """Statements in one transaction; `single`: one statement, atomic by itself, sent
        without BEGIN and COMMIT (most of the journal's calls: a round trip or two saved)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection; later calls answer nothing."""

    def problem(self) -> str | None:
        """None if the database answers now; else why not (for a readiness check)."""
        try:
            self.query("SELECT 1 AS ok")
        except DatabaseUnavailable as exc:
            return str(exc)
        return None

    @abc.abstractmethod
    def sql(self, text: str) -> str:
        """`text` in this dialect (placeholders, `$NOW`, `$REAL`)."""


class Transaction:
    """Statements run on one connection, in one transaction."""

    def __init__(self, database: Database, run: Callable[[str, tuple], Rows],
                 run_many: Callable[[str, list[tuple]], None] | None = None) -> None:
        self._database, self._run, self._run_many = database, run, run_many

    def query(self, sql: str, args: Iterable[Any] = ()) -> Rows:
        return self._run(self._database.sql(sql), tuple(args))

    def many(self, sql: str, rows: list[tuple]) -> None:
        """One statement for many rows (sent in one batch where the driver can)."""
        if self._run_many is None:
            for args in rows:
                self.query(sql, args)
        else:
            self._run_many(self._database.sql(sql), rows)


class SqliteDatabase(Database):
    """One connection shared under a lock: SQLite writes are serial anyway, and each call is
    a short transaction. `BEGIN IMMEDIATE` takes the write lock at once, so other processes
    on the same file (a second gunicorn, a restart overlapping) wait their turn."""

    dialect = "sqlite"
    name = "SQLite"
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self.closed = False
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill

    def sql(self, text: str) -> str:
        return text.replace("$NOW", self.NOW).replace("$REAL", "REAL").replace("$SKIP_LOCKED", "")

    def _run(self, sql: str, args: tuple) -> Rows:
        try:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from None

    def _run_many(self, sql: str, rows: list[tuple]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from None

    @contextlib.contextmanager
    def transaction(self, single: bool = False) -> Iterator[Transaction]:
        with self._lock:
            if self.closed:  # stopping: work still winding down writes nothing any more
                yield Transaction(self, lambda sql, args: [])
                return
            if single:
                yield Transaction(self, self._run, self._run_many)
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self, self._run, self._run_many)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._db.close()


class PostgresDatabase(Database):
    """A pool of connections to PostgreSQL (`psycopg_pool`), each statement or transaction
    on one of them. Connection errors become `DatabaseUnavailable`, which names PostgreSQL
    and never the URL."""

    dialect = "postgresql"
    name = "PostgreSQL"
    NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self._psycopg, self.url = psycopg, url
        self.closed = False
        self._pool = ConnectionPool(url, min_size=1, max_size=POOL_SIZE, timeout=POOL_TIMEOUT, open=False,
                                    kwargs={"autocommit": True, "row_factory": dict_row},
                                    check=ConnectionPool.check_connection, name="journal")
        self.connect().close()  # fail at start-up, with a clear message, if it cannot be reached
        self._pool.open()

    def sql(self, text: str) -> str:
        if "%" in text:
            raise ValueError("a literal % in journal SQL")  # psycopg would read it as a placeholder
        return (text.replace("?", "%s").replace("$NOW", self.NOW).replace("$REAL", "DOUBLE PRECISION")
                .replace("$SKIP_LOCKED", "FOR UPDATE SKIP LOCKED"))

    def connect(self):
        """A connection of its own (migrations hold their lock on one)."""
        from psycopg.rows import dict_row
        try:
            return self._psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except self._psycopg.OperationalError as exc:
            raise DatabaseUnavailable(self.name, self.describe(exc)) from None

    def problem(self) -> str | None:
        """On a connection of its own, with a short timeout: not behind the pool's wait."""
        try:
            with self._psycopg.connect(self.url, autocommit=True, connect_timeout=2) as connection:
                connection.execute("SELECT 1")
        except self._psycopg.Error as exc:
            return str(DatabaseUnavailable(self.name, self.describe(exc)))
        return None

    def describe(self, exc: BaseException) -> str:
        """An error's text without the URL's password (libpq does not echo it; this is the net)."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = urlsplit(self.url).password
        return text.replace(password, "[redacted]") if password else text

    def _run_on(self, connection):
        def run(sql: str, args: tuple) -> Rows:
            try:
                cursor = connection.execute(sql, args)
            except self._psycopg.errors.IntegrityError as exc:
                raise Conflict(self.describe(exc)) from None
            return cursor.fetchall() if cursor.description else []
        return run

    def _run_many_on(self, connection):
        def run_many(sql: str, rows: list[tuple]) -> None:
            try:
                with connection.cursor() as cursor:
                    cursor.executemany(sql, rows)  # pipelined: one round trip, not one per row
            except self._psycopg.errors.IntegrityError as exc:
                raise Conflict(self.describe(exc)) from None
        return run_many

    @contextlib.contextmanager
    def transaction(self, single: bool = False) -> Iterator[Transaction]:
        if self.closed:
            yield Transaction(self, lambda sql, args: [])
            return
        from psycopg_pool import PoolClosed, PoolTimeout
        try:
            with self._pool.connection() as connection, \
                    contextlib.nullcontext() if single else connection.transaction():
                yield Transaction(self, self._run_on(connection), self._run_many_on(connection))
        except (self._psycopg.OperationalError, PoolTimeout, PoolClosed) as exc:
            if self.closed:  # stopping: work still winding down writes nothing any more
                log.debug("journal closed; not run")
                return
            raise DatabaseUnavailable(self.name, self.describe(exc)) from None

    def close(self) -> None:
        self.closed = True
        self._pool.close(timeout=5)


def open_database(database_url: str | None, sqlite_path: str) -> Database:
    """PostgreSQL when `database_url` is set, else SQLite at `sqlite_path`."""
    if database_url:
        return PostgresDatabase(database_url)
    return SqliteDatabase(sqlite_path)
