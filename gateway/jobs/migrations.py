"""Versioned schema migrations of the journal, applied at start-up under a lock.

Each migration is a numbered list of statements (in the journal's SQL: `$REAL` for a float
column); `schema_version` records which have run. On PostgreSQL the whole run holds
`pg_advisory_lock`, so two replicas starting together apply each migration once (the second
waits, then finds nothing to do); on SQLite the run is one `BEGIN IMMEDIATE` transaction,
SQLite's own write lock. A newer release adds a migration at the end, never edits one.

Version 1 is the schema the SQLite journal had before versions existed (`IF NOT EXISTS`, so
such a file is adopted as it is).
"""
from __future__ import annotations

import dataclasses
import logging

from gateway.jobs.database import Database, Transaction

log = logging.getLogger(__name__)
ADVISORY_LOCK = 7_326_951_004  # any fixed number: "the journal's migrations" among this database's locks


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS = (
    Migration(1, "jobs, items and model schemas", (
        """CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            kind TEXT NOT NULL,                -- job | sync
            model TEXT NOT NULL,
            params TEXT NOT NULL,              -- JSON: the model parameters
            folder TEXT NOT NULL,
            status TEXT NOT NULL,              -- queued running succeeded partial failed canceled
            webhook TEXT,
            webhook_delivered INTEGER NOT NULL DEFAULT 0,
            idempotency_key TEXT,
            request_hash TEXT,
            created_at $REAL NOT NULL,
            finished_at $REAL
        )""",
        """CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created_at)",
        "CREATE INDEX IF NOT EXISTS jobs_folder ON jobs(folder)",
        """CREATE TABLE IF NOT EXISTS items (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            idx INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            stem TEXT NOT NULL,
            status TEXT NOT NULL,              -- queued running succeeded failed canceled
            prediction_id TEXT,
            files TEXT NOT NULL DEFAULT '[]',
            error TEXT,
            started_at $REAL,
            finished_at $REAL,
            PRIMARY KEY (job_id, idx)
        )""",
        """CREATE TABLE IF NOT EXISTS model_schemas (
            key TEXT PRIMARY KEY,              -- owner/name, owner/name:<version>, a deployment (see engine/schemas.py)
            fetched_at $REAL NOT NULL,         -- wall time: MODEL_SCHEMA_TTL runs from here, across restarts
            document TEXT NOT NULL             -- JSON
        )""",
    )),
    Migration(2, "claims, cancel requests, sealed tokens, webhook delivery claims", (
        # The replica running a job holds it under a lease it renews; an expired lease is adopted.
        "ALTER TABLE jobs ADD COLUMN claimed_by TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_until $REAL",
        # Cancel through the journal: the replica holding the lease picks it up.
        "ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
        # A user job's token, Fernet-encrypted (TOKEN_ENCRYPTION_KEY), erased when the job ends.
        "ALTER TABLE jobs ADD COLUMN token_sealed TEXT",
        # webhook_delivered: 0 pending, 1 delivered, -1 given up; the claim makes it sent once.
        "ALTER TABLE jobs ADD COLUMN webhook_claimed_by TEXT",
        "ALTER TABLE jobs ADD COLUMN webhook_lease_until $REAL",
        "CREATE INDEX jobs_status ON jobs(status, lease_until)",
        "CREATE INDEX jobs_finished ON jobs(finished_at)",
    )),
)
LATEST = MIGRATIONS[-1].version
VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at $REAL NOT NULL
)"""


def migrate(database: Database, upto: int = LATEST) -> list[int]:
    """Bring the schema to version `upto` (default: the latest); the versions applied."""
    if database.dialect == "postgresql":
        return _migrate_postgres(database, upto)
    with database.transaction() as tx:  # BEGIN IMMEDIATE: one process at a time
        return _apply(database, tx, upto)


def schema_version(database: Database) -> int:
    """The highest version applied (0: none)."""
    with database.transaction() as tx:
        tx.query(VERSION_TABLE)
        return tx.query("SELECT COALESCE(MAX(version), 0) AS version FROM schema_version")[0]["version"]


def _migrate_postgres(database, upto: int) -> list[int]:
    connection = database.connect()
    try:
        # A session lock: held across the migrations' own transactions, released at close.
        connection.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK,))
        with connection.transaction():
            return _apply(database, Transaction(database, lambda sql, args: _fetch(connection, sql, args)), upto)
    finally:
        connection.close()


def _fetch(connection, sql: str, args: tuple) -> list[dict]:
    cursor = connection.execute(sql, args)
    return cursor.fetchall() if cursor.description else []


def _apply(database: Database, tx: Transaction, upto: int) -> list[int]:
    tx.query(VERSION_TABLE)
    done = {row["version"] for row in tx.query("SELECT version FROM schema_version")}
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done or migration.version > upto:
            continue
        for statement in migration.statements:
            tx.query(statement)
        tx.query("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, $NOW)",
                 (migration.version, migration.name))
        log.info("journal schema on %s: applied migration %d (%s)", database.name, migration.version,
                 migration.name)
        applied.append(migration.version)
    return applied
