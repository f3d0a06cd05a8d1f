"""The job journal: every job, item, upstream prediction id and saved file, in SQLite (WAL).

Written before and after each step that costs money or produces a file, so a restart can
pick up exactly where the last process stopped. Owners are "admin" or a hash of the user's
token; the token itself is never written.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
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
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created_at);
CREATE INDEX IF NOT EXISTS jobs_folder ON jobs(folder);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    stem TEXT NOT NULL,
    status TEXT NOT NULL,              -- queued running succeeded failed canceled
    prediction_id TEXT,
    files TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    started_at REAL,
    finished_at REAL,
    PRIMARY KEY (job_id, idx)
);
"""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"      # some items failed or were canceled, some succeeded
    FAILED = "failed"
    CANCELED = "canceled"


UNFINISHED_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)


class Journal:
    """One connection shared under a lock: SQLite writes are serial anyway, and each call is
    a short transaction."""

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._closed = False
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
            self._db.executescript(SCHEMA)

    def _run(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._closed:  # stopping: work still winding down writes nothing any more
                log.debug("journal closed; not run: %s", sql.split(" ", 1)[0])
                return []
            return self._db.execute(sql, tuple(args)).fetchall()

    def add_job(self, job: dict[str, Any], items: list[tuple[int, str, str]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, owner, kind, model, params, folder, status, webhook, "
                    "idempotency_key, request_hash, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (job["id"], job["owner"], job["kind"], job["model"], json.dumps(job["params"]),
                     job["folder"], "queued", job.get("webhook"), job.get("idempotency_key"),
                     job.get("request_hash"), time.time()))
                self._db.executemany(
                    "INSERT INTO items (job_id, idx, prompt, stem, status) VALUES (?,?,?,?, 'queued')",
                    [(job["id"], idx, prompt, stem) for idx, prompt, stem in items])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return dict(rows[0]) if rows else None

    def by_idempotency_key(self, owner: str, key: str) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key))
        return dict(rows[0]) if rows else None

    def items(self, job_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._run("SELECT * FROM items WHERE job_id = ? ORDER BY idx", (job_id,))]

    def jobs_of(self, owner: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        where, args = ("WHERE owner = ?", [owner]) if owner else ("", [])
        return [dict(r) for r in self._run(
            f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?", [*args, limit, offset])]

    def unfinished_jobs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._run(
            "SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at")]

    def undelivered_webhooks(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._run(
            "SELECT * FROM jobs WHERE webhook IS NOT NULL AND webhook_delivered = 0 "
            "AND status NOT IN ('queued', 'running')")]

    def job_of_folder(self, folder: str) -> dict[str, Any] | None:
        rows = self._run("SELECT * FROM jobs WHERE folder = ?", (folder,))
        return dict(rows[0]) if rows else None

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

    def close(self) -> None:
        """Close the database; later calls do nothing (the next process resumes from here)."""
        with self._lock:
            self._closed = True
            self._db.close()
