"""The read side of jobs: who may see a job, how a job and a list of jobs are shown, and
which saved file a download path names. Nothing here changes a job."""
from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.accounts import Caller
from gateway.config import Settings
from gateway.engine.files import download_urls
from gateway.engine.items import ItemStatus
from gateway.errors import ServiceError
from gateway.jobs.journal import Journal
from gateway.signing import file_signer

NOT_FOUND = "Job not found"


def iso(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


class JobViews:
    def __init__(self, settings: Settings, journal: Journal,
                 live_statuses: Callable[[str], dict[int, ItemStatus]]) -> None:
        self._settings, self._journal, self._live_statuses = settings, journal, live_statuses
        self._signer = file_signer(settings)

    def visible(self, job_id: str, caller: Caller) -> dict:
        """The job if the caller may see it; 404 otherwise (never 403: no existence leaks)."""
        job = self._journal.job(job_id) if isinstance(job_id, str) else None
        if job is None or (not caller.is_admin and job["owner"] != caller.owner):
            raise ServiceError(404, NOT_FOUND)
        return job

    def render(self, job: dict) -> dict[str, Any]:
        """A job as `GET /jobs/<id>` and webhooks show it."""
        rows = self._journal.items(job["id"])
        live = self._live_statuses(job["id"])
        for row in rows:  # a create held open is not journaled, but its item is running
            if row["status"] == ItemStatus.QUEUED and live.get(row["idx"]) == ItemStatus.RUNNING:
                row["status"] = ItemStatus.RUNNING
        counts = {status.value: 0 for status in ItemStatus}
        for row in rows:
            counts[row["status"]] += 1
        return {
            "job_id": job["id"], "status": job["status"], "model_name": job["model"],
            "created_at": iso(job["created_at"]), "finished_at": iso(job["finished_at"]),
            "total": len(rows), "counts": counts, "items": [self._item(job, row) for row in rows],
        }

    def list(self, caller: Caller, page: int, per_page: int) -> dict[str, Any]:
        """The caller's jobs (every job for the admin), newest first."""
        owner = None if caller.is_admin else caller.owner
        rows = self._journal.jobs_of(owner, per_page + 1, (page - 1) * per_page)
        return {"jobs": [{"job_id": j["id"], "status": j["status"], "model_name": j["model"], "kind": j["kind"],
                          "created_at": iso(j["created_at"]), "status_url": f"/jobs/{j['id']}"}
                         for j in rows[:per_page]],
                "page": page, "per_page": per_page, "next_page": page + 1 if len(rows) > per_page else None}

    def file_path(self, relative: str, caller: Caller | None) -> Path:
        """The saved file at `<folder>/<name>` if the caller owns its job (None: a signed
        link, already checked, which anyone may use); 404 otherwise."""
        parts = relative.split("/")
        if len(parts) != 2 or any(not p or p.startswith(".") or "\\" in p for p in parts):
            raise ServiceError(404, "File not found")
        job = self._journal.job_of_folder(parts[0])
        if job is None or (caller is not None and not caller.is_admin and job["owner"] != caller.owner):
            raise ServiceError(404, "File not found")
        path = Path(self._settings.output_dir) / parts[0] / parts[1]
        try:
            exists = path.is_file()
        except OSError:  # a name too long for the filesystem names no file either
            exists = False
        if not exists:
            raise ServiceError(404, "File not found")
        return path


    def _item(self, job: dict, row: dict) -> dict[str, Any]:
        files = json.loads(row["files"])
        urls = download_urls(job["folder"], files)
        return {"index": row["idx"], "prompt": row["prompt"], "status": row["status"], "files": files,
                "urls": urls, "signed_urls": self._signer.sign_all(urls, self._settings.public_base_url or ""),
                "error": row["error"], "prediction_id": row["prediction_id"], "started_at": iso(row["started_at"]),
                "finished_at": iso(row["finished_at"])}
