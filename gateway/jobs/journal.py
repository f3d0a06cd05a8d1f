"""The job journal: every job, item, upstream prediction id and saved file, in SQLite (WAL)
or, with DATABASE_URL, in PostgreSQL shared by replicas (see database.py, migrations.py).

Written before and after each step that costs money or produces a file, so a restart (or
another replica) can pick up exactly where the last process stopped. Owners are "admin" or a
hash of the user's token; the token itself is written only encrypted (TOKEN_ENCRYPTION_KEY),
and only while its job is unfinished.

Claims: the replica running a job holds it (`claimed_by`) under a lease (`lease_until`, on
the database's clock) that it renews while it works; a job whose lease expired is adopted
by another replica. A replica's name is `<host>:<port>.<slot>/<instance>` (see replica.py): a
job held by an earlier instance of the same slot (a restart) is taken over at once.
"""
from __future__ import annotations

import json
import logging
import time
from enum import StrEnum
from typing import Any

from gateway.errors import ServiceError
from gateway.jobs.database import Database, Rows, SqliteDatabase, open_database
from gateway.jobs.migrations import migrate

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"      # some items failed or were canceled, some succeeded
    FAILED = "failed"
    CANCELED = "canceled"


UNFINISHED_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)
UNFINISHED_SQL = "status IN ('queued', 'running')"
FINAL_SQL = "status NOT IN ('queued', 'running')"
# Free to take: nobody holds it, its lease ran out, or an earlier instance of this replica
# held it (parameters: the replica's prefix length, its prefix, the replica itself).
FREE_SQL = ("(claimed_by IS NULL OR lease_until IS NULL OR lease_until < $NOW "
            "OR (substr(claimed_by, 1, ?) = ? AND claimed_by <> ?))")
WEBHOOK_PENDING = ("webhook IS NOT NULL AND webhook_delivered = 0 AND " + FINAL_SQL +
                   " AND (webhook_lease_until IS NULL OR webhook_lease_until < $NOW)")


def replica_prefix(replica: str) -> str:
    """`host:port.slot/` of a replica name `host:port.slot/instance`."""
    return replica.rpartition("/")[0] + "/"


def _free_args(replica: str) -> tuple:
    prefix = replica_prefix(replica)
    return len(prefix), prefix, replica


class Journal:
    def __init__(self, database: Database | str) -> None:
        """On `database` (a SQLite path is opened here), migrated to the latest schema."""
        self.db = SqliteDatabase(database) if isinstance(database, str) else database
        migrate(self.db)

    def _run(self, sql: str, args: Any = ()) -> Rows:
        return self.db.query(sql, args)

    # -- jobs and items -----------------------------------------------------------------------
    def add_job(self, job: dict[str, Any], items: list[tuple[int, str, str]], replica: str | None = None,
                lease: float = 0.0) -> None:
        """A new job and its items, claimed by `replica` (which runs it) for `lease` seconds.
        Raises database.Conflict for an Idempotency-Key the owner already used."""
        if self.db.dialect == "postgresql" and any("\x00" in prompt for _, prompt, _ in items):
            # PostgreSQL's text cannot hold NUL (SQLite's can): a clear 400, not a 500.
            raise ServiceError(400, "Invalid prompt: it contains a NUL character (\\u0000), which the job "
                               "journal (PostgreSQL) cannot store", field="prompt" if len(items) == 1 else "prompts")
        with self.db.transaction() as tx:
            tx.query(
                "INSERT INTO jobs (id, owner, kind, model, params, folder, status, webhook, idempotency_key, "
                "request_hash, created_at, claimed_by, lease_until, token_sealed) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,$NOW + ?,?)",
                (job["id"], job["owner"], job["kind"], job["model"], json.dumps(job["params"]),
                 job["folder"], "queued", job.get("webhook"), job.get("idempotency_key"),
                 job.get("request_hash"), time.time(), replica, lease, job.get("token_sealed")))
            tx.many("INSERT INTO items (job_id, idx, prompt, stem, status) VALUES (?,?,?,?, 'queued')",
                    [(job["id"], idx, prompt, stem) for idx, prompt, stem in items])

    def job(self, job_id: str) -> dict[str, Any] | None:
        if "\x00" in job_id:  # from a URL: no job has one (and PostgreSQL's text cannot hold it)
            return None
        rows = self._run("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def by_idempotency_key(self, owner: str, key: str) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key))
        return rows[0] if rows else None

    def items(self, job_id: str) -> list[dict[str, Any]]:
        return self._run("SELECT * FROM items WHERE job_id = ? ORDER BY idx", (job_id,))

    def jobs_of(self, owner: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        where, args = ("WHERE owner = ?", [owner]) if owner else ("", [])
        return self._run(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                         [*args, limit, offset])

    def unfinished_jobs(self) -> list[dict[str, Any]]:
        return self._run(f"SELECT * FROM jobs WHERE {UNFINISHED_SQL} ORDER BY created_at")

    def undelivered_webhooks(self) -> list[dict[str, Any]]:
        return self._run(f"SELECT * FROM jobs WHERE webhook IS NOT NULL AND webhook_delivered = 0 AND {FINAL_SQL}")

    def job_of_folder(self, folder: str) -> dict[str, Any] | None:
        if "\x00" in folder:  # as in `job`
            return None
        rows = self._run("SELECT * FROM jobs WHERE folder = ?", (folder,))
        return rows[0] if rows else None

    def set_job(self, job_id: str, **fields: Any) -> None:
        names = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE jobs SET {names} WHERE id = ?", [*fields.values(), job_id])

    def set_item(self, job_id: str, idx: int, **fields: Any) -> None:
        if "files" in fields:
            fields["files"] = json.dumps(fields["files"])
        names = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE items SET {names} WHERE job_id = ? AND idx = ?", [*fields.values(), job_id, idx])

    def mark_running(self, job_id: str, idx: int, prediction_id: str, started_at: float) -> None:
        """Record an item's prediction; `running` only if the item is not final already (a
        create held open may answer after the item was canceled: it must not come back)."""
        self._run("UPDATE items SET prediction_id = ?, started_at = COALESCE(started_at, ?), "
                  "status = CASE WHEN status IN ('succeeded', 'failed', 'canceled') THEN status "
                  "ELSE 'running' END WHERE job_id = ? AND idx = ?", [prediction_id, started_at, job_id, idx])

    def reset_items(self, job_id: str, indexes: list[int]) -> None:
        """Make failed items runnable again (retry): same names, fresh state."""
        marks = ",".join("?" * len(indexes))
        self._run(f"UPDATE items SET status = 'queued', prediction_id = NULL, "
                  f"error = NULL, files = '[]', started_at = NULL, finished_at = NULL "
                  f"WHERE job_id = ? AND idx IN ({marks})", [job_id, *indexes])

    def cancel_unfinished_items(self, job_id: str, error: str) -> None:
        """Every item not final yet becomes canceled (a job canceled where nobody runs it)."""
        self._run(f"UPDATE items SET status = 'canceled', error = ?, finished_at = ? "
                  f"WHERE job_id = ? AND {UNFINISHED_SQL}", (error, time.time(), job_id))

    # -- claims -----------------------------------------------------------------------------------
    def claim(self, job_id: str, replica: str, lease: float) -> dict[str, Any] | None:
        """Take the job if it is free (see FREE_SQL); the job, or None if another replica holds it."""
        rows = self._run(f"UPDATE jobs SET claimed_by = ?, lease_until = $NOW + ? WHERE id = ? AND {FREE_SQL} "
                         f"RETURNING *", (replica, lease, job_id, *_free_args(replica)))
        return rows[0] if rows else None

    def adopt(self, replica: str, lease: float, admin: bool, sealed: bool, limit: int = 20) -> list[dict]:
        """Claim up to `limit` unfinished jobs that are free and that this replica can run:
        admin jobs if `admin` (a server token is configured), user jobs with a sealed token if
        `sealed` (the key is configured). Rows another replica is claiming are skipped."""
        runnable = " OR ".join(["owner = 'admin'"] * admin + ["token_sealed IS NOT NULL"] * sealed)
        if not runnable:
            return []
        where = f"{UNFINISHED_SQL} AND ({runnable}) AND {FREE_SQL}"
        return self._run(
            f"UPDATE jobs SET claimed_by = ?, lease_until = $NOW + ? WHERE id IN "
            f"(SELECT id FROM jobs WHERE {where} ORDER BY created_at LIMIT ? $SKIP_LOCKED) AND {where} RETURNING *",
            (replica, lease, *_free_args(replica), limit, *_free_args(replica)))

    def orphans(self, replica: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Free unfinished user jobs (they wait for a token: their owner's next call)."""
        return self._run(f"SELECT id, owner FROM jobs WHERE {UNFINISHED_SQL} AND owner <> 'admin' AND {FREE_SQL} "
                         f"ORDER BY created_at LIMIT ?", (*_free_args(replica), limit))

    def renew(self, replica: str, lease: float, jobs: set[str], deliveries: set[str] = frozenset()) -> set[str]:
        """Extend the leases of `jobs` and of the webhook `deliveries` that this replica still
        holds; the job ids it holds."""
        rows: Rows = []
        if not jobs and not deliveries:
            return set()
        with self.db.transaction() as tx:
            if deliveries:
                tx.query(f"UPDATE jobs SET webhook_lease_until = $NOW + ? WHERE webhook_claimed_by = ? "
                         f"AND webhook_delivered = 0 AND id IN ({','.join('?' * len(deliveries))})",
                         (lease, replica, *deliveries))
            if jobs:
                rows = tx.query(f"UPDATE jobs SET lease_until = $NOW + ? WHERE claimed_by = ? "
                                f"AND id IN ({','.join('?' * len(jobs))}) RETURNING id", (lease, replica, *jobs))
        return {row["id"] for row in rows}

    def release(self, job_id: str, replica: str) -> None:
        """This replica no longer runs the job: nothing of it runs here any more."""
        self._run("UPDATE jobs SET claimed_by = NULL, lease_until = NULL WHERE id = ? AND claimed_by = ?",
                  (job_id, replica))

    def release_all(self, replica: str) -> None:
        """Stopping: let other replicas adopt at once what this one held."""
        with self.db.transaction() as tx:
            tx.query("UPDATE jobs SET claimed_by = NULL, lease_until = NULL WHERE claimed_by = ?", (replica,))
            tx.query("UPDATE jobs SET webhook_claimed_by = NULL, webhook_lease_until = NULL "
                     "WHERE webhook_claimed_by = ?", (replica,))

    def request_cancel(self, job_id: str) -> None:
        self._run(f"UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND {UNFINISHED_SQL}", (job_id,))

    def cancel_requests(self, replica: str) -> list[str]:
        """The jobs this replica holds whose cancel was asked for (on any replica)."""
        return [row["id"] for row in self._run(
            f"SELECT id FROM jobs WHERE claimed_by = ? AND cancel_requested = 1 AND {UNFINISHED_SQL}", (replica,))]

    # -- webhooks ---------------------------------------------------------------------------------
    def claim_webhooks(self, replica: str, lease: float, job_id: str | None = None, limit: int = 20) -> list[dict]:
        """Claim pending deliveries (one job's, or any): each is sent by one replica at a time."""
        only, args = ("AND id = ?", (job_id,)) if job_id else ("", ())
        return self._run(
            f"UPDATE jobs SET webhook_claimed_by = ?, webhook_lease_until = $NOW + ? WHERE id IN "
            f"(SELECT id FROM jobs WHERE {WEBHOOK_PENDING} {only} ORDER BY finished_at LIMIT ? $SKIP_LOCKED) "
            f"AND {WEBHOOK_PENDING} RETURNING *", (replica, lease, *args, limit))

    def webhook_done(self, job_id: str, delivered: bool) -> None:
        """Delivered (1), or given up after every attempt (-1): not sent again either way."""
        self._run("UPDATE jobs SET webhook_delivered = ?, webhook_claimed_by = NULL, webhook_lease_until = NULL "
                  "WHERE id = ?", (1 if delivered else -1, job_id))

    # -- retention --------------------------------------------------------------------------------
    def remove_finished(self, before: float, limit: int = 500) -> list[str]:
        """Delete up to `limit` jobs that finished before `before` (epoch seconds) and that no
        replica holds, with their items; their folders' names (the files stay)."""
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT id, folder FROM jobs WHERE {FINAL_SQL} AND finished_at < ? "
                            f"AND (claimed_by IS NULL OR lease_until < $NOW) ORDER BY finished_at LIMIT ?",
                            (before, limit))
            ids = [row["id"] for row in rows]
            if ids:
                marks = ",".join("?" * len(ids))
                tx.query(f"DELETE FROM items WHERE job_id IN ({marks})", ids)
                tx.query(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
        return [row["folder"] for row in rows]

    # -- model schemas (engine/schemas.py's SchemaStore) -----------------------------------
    def load_schema(self, key: str) -> tuple[float, dict[str, Any]] | None:
        rows = self._run("SELECT fetched_at, document FROM model_schemas WHERE key = ?", (key,))
        return (rows[0]["fetched_at"], json.loads(rows[0]["document"])) if rows else None

    def save_schema(self, key: str, fetched_at: float, document: dict[str, Any]) -> None:
        self._run("INSERT INTO model_schemas (key, fetched_at, document) VALUES (?,?,?) ON CONFLICT (key) "
                  "DO UPDATE SET fetched_at = excluded.fetched_at, document = excluded.document",
                  (key, fetched_at, json.dumps(document)))

    def problem(self) -> str | None:
        """None if the database answers; else why not (naming the database, never its URL).
        For a readiness check."""
        return self.db.problem()

    def close(self) -> None:
        """Close the database; later calls do nothing (the next process resumes from here)."""
        self.db.close()


def open_journal(database_url: str | None, sqlite_path: str) -> Journal:
    """The journal on PostgreSQL (`database_url`) or SQLite (`sqlite_path`), migrated."""
    return Journal(open_database(database_url, sqlite_path))
