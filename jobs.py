"""Durable jobs: every generation (async job or synchronous request) is journaled, and a
restarted service finishes what the last one started without creating anything twice."""
from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from auth import Caller
from errors import ServiceError
from generation import GenerationItem
from journal import FINAL_ITEM, Journal
from lost_creates import find_lost_creates
from model_functions import ModelSpec, resolve_model
from service import GenerationService
from settings import Settings
from webhooks import WebhookSender

log = logging.getLogger(__name__)
NOT_FOUND = "Job not found"


def owner_of(caller: Caller) -> str:
    return "admin" if caller.is_admin else f"user:{caller.account}"


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")


class ItemHooks:
    """Writes an item's steps to the journal as they happen. A sent create is not journaled:
    a create whose answer is lost is found again at resume by one scan of the upstream's
    recent predictions, so creates never wait on the journal."""

    def __init__(self, manager: "JobManager", job_id: str, claimed: set[str]) -> None:
        self._manager, self._job_id, self._claimed = manager, job_id, claimed

    def claimed(self) -> set[str]:
        return set(self._claimed)

    def created(self, item: GenerationItem) -> None:
        self._claimed.add(item.prediction_id)
        self._manager.journal.mark_running(self._job_id, item.index, item.prediction_id,
                                           item.timings.get("started", time.time()))

    def done(self, item: GenerationItem) -> None:
        self._manager.journal.set_item(self._job_id, item.index, status=item.state, files=item.files,
                                       error=item.error, finished_at=time.time())
        self._manager.item_done(self._job_id)

    def stopped(self, item: GenerationItem) -> None:
        self._manager.item_stopped(self._job_id)


class JobManager:
    def __init__(self, settings: Settings, service: GenerationService, journal: Journal) -> None:
        self.settings, self.service, self.journal = settings, service, journal
        self._running: dict[str, dict[str, Any]] = {}
        self._orphans: dict[str, list[str]] = {}   # user jobs waiting for their owner's token
        self._lock = threading.Lock()
        self._webhooks = WebhookSender(settings.webhook_secret, settings.webhook_attempts,
                                       settings.webhook_allow_private,
                                       lambda job_id: journal.set_job(job_id, webhook_delivered=1))

    # -- running --------------------------------------------------------------------
    def _new_job(self, caller: Caller, spec: ModelSpec, prompts: list[str], stems: list[str],
                 params: dict, kind: str, **extra: Any) -> str:
        job_id = "job_" + secrets.token_hex(10)
        folder, _ = self.service.new_folder()
        self.journal.add_job({"id": job_id, "owner": owner_of(caller), "kind": kind, "model": spec.id,
                              "params": params, "folder": folder.name, **extra},
                             [(i, p, s) for i, (p, s) in enumerate(zip(prompts, stems))])
        return job_id

    def _launch(self, caller: Caller, job_id: str, timeout: float, label: str,
                resuming: bool = False) -> list[GenerationItem]:
        """Build the unfinished items of a job from the journal and start them."""
        job = self.journal.job(job_id)
        spec, params = resolve_model(job["model"]), json.loads(job["params"])
        if resuming:
            self._recover_lost_creates(caller, job, params)
        rows = self.journal.items(job_id)
        claimed = {r["prediction_id"] for r in rows if r["prediction_id"]}
        hooks = ItemHooks(self, job_id, claimed)
        folder = Path(self.settings.output_dir) / job["folder"]
        shown = os.path.join(self.settings.output_dir, job["folder"])
        deadline = self.service.clock() + timeout
        items = [GenerationItem(r["idx"], r["prompt"], r["stem"], {"prompt": r["prompt"], **params}, folder, shown,
                                deadline, label, timeout, prediction_id=r["prediction_id"], hooks=hooks)
                 for r in rows if r["status"] not in FINAL_ITEM]
        with self._lock:
            self._running[job_id] = {"items": items, "remaining": len(items), "live": len(items)}
        self.journal.set_job(job_id, status="running")
        if items:
            self.service.start(caller, spec, items)
        else:
            self.item_done(job_id, count=0)
        return items

    def _recover_lost_creates(self, caller: Caller, job: dict, params: dict) -> None:
        """Items with no journaled prediction may still have one upstream (the last process
        died before the create's answer came back). One scan of the account's predictions
        since the job began, matched by the exact input, adopts them instead of creating
        them again."""
        rows = self.journal.items(job["id"])
        missing = [r for r in rows if r["status"] not in FINAL_ITEM and not r["prediction_id"]]
        if not missing:
            return
        claimed = {r["prediction_id"] for r in rows if r["prediction_id"]}
        with self.service.sessions.using(caller.token) as session:  # held: not closed mid-scan
            found = find_lost_creates(session, [(r["idx"], {"prompt": r["prompt"], **params}) for r in missing],
                                      job["created_at"], claimed, max_pages=100)
        for idx, state in found.items():
            self.journal.set_item(job["id"], idx, status="running", prediction_id=state.id)

    def item_done(self, job_id: str, count: int = 1) -> None:
        """An item is final; when the last one is, the job is."""
        with self._lock:
            entry = self._running.get(job_id)
            if entry is None:
                return
            entry["remaining"] -= count
            if entry["remaining"] > 0:
                return
            self._forget_if_stopped(job_id)
        self._finish(job_id)

    def item_stopped(self, job_id: str) -> None:
        """An item's worker has returned: nothing of it runs upstream or on disk any more."""
        with self._lock:
            entry = self._running.get(job_id)
            if entry is not None:
                entry["live"] -= 1
                self._forget_if_stopped(job_id)

    def _forget_if_stopped(self, job_id: str) -> None:
        """Under the lock: a job is running here until every item is final *and* stopped."""
        entry = self._running[job_id]
        if entry["remaining"] <= 0 and entry["live"] <= 0:
            del self._running[job_id]

    def _finish(self, job_id: str) -> None:
        states = [r["status"] for r in self.journal.items(job_id)]
        if "canceled" in states:
            status = "canceled"
        elif all(s == "succeeded" for s in states):
            status = "succeeded"
        else:
            status = "partial" if "succeeded" in states else "failed"
        self.journal.set_job(job_id, status=status, finished_at=time.time())
        job = self.journal.job(job_id)
        if job["webhook"]:
            self._webhooks.send(job_id, job["webhook"], json.dumps(self.render(job)).encode())

    def run_sync(self, caller: Caller, spec: ModelSpec, prompts: list[str], stems: list[str],
                 params: dict, timeout: float, label: str) -> tuple[str, list[GenerationItem]]:
        """A synchronous request, journaled like a job: it answers within `timeout`.
        Returns the job id (the caller may read it at /jobs/<id>) and the items."""
        job_id = self._new_job(caller, spec, prompts, stems, params, "sync")
        items = self._launch(caller, job_id, timeout, label)
        self.service.wait(items, self.service.clock() + timeout)
        return job_id, items

    def submit(self, caller: Caller, spec: ModelSpec, prompts: list[str], stems: list[str], params: dict,
               webhook: str | None, idempotency_key: str | None, request_hash: str) -> tuple[str, bool]:
        """Start a job; return (job id, whether it is new). Same key and body: the same job."""
        owner = owner_of(caller)
        if idempotency_key:
            existing = self.journal.by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return self._same_request(existing, request_hash), False
        try:
            job_id = self._new_job(caller, spec, prompts, stems, params, "job", webhook=webhook,
                                   idempotency_key=idempotency_key, request_hash=request_hash)
        except sqlite3.IntegrityError:  # a concurrent submit with the same key won
            return self._same_request(self.journal.by_idempotency_key(owner, idempotency_key), request_hash), False
        self._launch(caller, job_id, self.settings.job_timeout, "JOB_TIMEOUT")
        return job_id, True

    @staticmethod
    def _same_request(job: dict, request_hash: str) -> str:
        if job["request_hash"] != request_hash:
            raise ServiceError(409, "Idempotency-Key was already used with a different request body")
        return job["id"]

    # -- reading and control ------------------------------------------------------------
    def visible(self, job_id: str, caller: Caller) -> dict:
        """The job if the caller may see it; 404 otherwise (never 403: no existence leaks)."""
        job = self.journal.job(job_id) if isinstance(job_id, str) else None
        if job is None or (not caller.is_admin and job["owner"] != owner_of(caller)):
            raise ServiceError(404, NOT_FOUND)
        return job

    def render(self, job: dict) -> dict[str, Any]:
        rows = self.journal.items(job["id"])
        with self._lock:
            live = {item.index: item.live_status for item in self._running.get(job["id"], {}).get("items", [])}
        for row in rows:  # a create held open is not journaled, but its item is running
            if row["status"] == "queued" and live.get(row["idx"]) == "running":
                row["status"] = "running"
        counts = {s: 0 for s in ("queued", "running", "succeeded", "failed", "canceled")}
        for row in rows:
            counts[row["status"]] += 1
        return {
            "job_id": job["id"], "status": job["status"], "model_name": job["model"],
            "created_at": _iso(job["created_at"]), "finished_at": _iso(job["finished_at"]),
            "total": len(rows), "counts": counts,
            "items": [{"index": r["idx"], "prompt": r["prompt"], "status": r["status"],
                       "files": json.loads(r["files"]),
                       "urls": [f"/files/{job['folder']}/{os.path.basename(f)}" for f in json.loads(r["files"])],
                       "error": r["error"], "prediction_id": r["prediction_id"],
                       "started_at": _iso(r["started_at"]), "finished_at": _iso(r["finished_at"])}
                      for r in rows],
        }

    def list(self, caller: Caller, page: int, per_page: int) -> dict[str, Any]:
        owner = None if caller.is_admin else owner_of(caller)
        rows = self.journal.jobs_of(owner, per_page + 1, (page - 1) * per_page)
        return {"jobs": [{"job_id": j["id"], "status": j["status"], "model_name": j["model"], "kind": j["kind"],
                          "created_at": _iso(j["created_at"]), "status_url": f"/jobs/{j['id']}"}
                         for j in rows[:per_page]],
                "page": page, "per_page": per_page, "next_page": page + 1 if len(rows) > per_page else None}

    def cancel(self, job_id: str, caller: Caller) -> dict:
        job = self.visible(job_id, caller)
        with self._lock:
            items = list(self._running.get(job_id, {}).get("items", []))
        self.service.cancel(items)
        return self.journal.job(job["id"])

    def retry(self, job_id: str, caller: Caller) -> list[int]:
        """Run the failed and canceled items again, into the same names."""
        job = self.visible(job_id, caller)
        if job["status"] in ("queued", "running"):
            raise ServiceError(409, "The job is still running; retry it once it has finished")
        with self._lock:
            stopping = job_id in self._running
        if stopping:  # canceled, but a worker is still winding down (e.g. canceling upstream)
            raise ServiceError(409, "The job's last run is still stopping; retry it in a few seconds")
        again = [r["idx"] for r in self.journal.items(job_id) if r["status"] in ("failed", "canceled")]
        if again:
            self.journal.reset_items(job_id, again)
            self.journal.set_job(job_id, finished_at=None, webhook_delivered=0)
            self._launch(caller, job_id, self.settings.job_timeout, "JOB_TIMEOUT")
        return again

    def file_path(self, relative: str, caller: Caller) -> Path:
        """The saved file at `<folder>/<name>` if the caller owns its job; 404 otherwise."""
        parts = relative.split("/")
        if len(parts) != 2 or any(not p or p.startswith(".") or "\\" in p for p in parts):
            raise ServiceError(404, "File not found")
        job = self.journal.job_of_folder(parts[0])
        if job is None or (not caller.is_admin and job["owner"] != owner_of(caller)):
            raise ServiceError(404, "File not found")
        path = Path(self.settings.output_dir) / parts[0] / parts[1]
        if not path.is_file():
            raise ServiceError(404, "File not found")
        return path

    # -- restart ------------------------------------------------------------------------
    def resume(self) -> None:
        """Pick up every unfinished job: admin jobs now, user jobs when their owner next
        calls (the user's token is never stored, and it is needed to reach Replicate)."""
        for job in self.journal.unfinished_jobs():
            if job["owner"] == "admin":
                if not self.settings.replicate_api_token:
                    log.warning("job %s waits: REPLICATE_API_TOKEN is not configured", job["id"])
                    continue
                log.info("resuming job %s", job["id"])
                self._launch(Caller(self.settings.replicate_api_token, True), job["id"],
                             self.settings.job_timeout, "JOB_TIMEOUT", resuming=True)
            else:
                self._orphans.setdefault(job["owner"], []).append(job["id"])
        for job in self.journal.undelivered_webhooks():
            self._webhooks.send(job["id"], job["webhook"], json.dumps(self.render(job)).encode())

    def adopt(self, caller: Caller) -> None:
        """Resume the caller's own unfinished jobs, now that their token is at hand."""
        if caller.is_admin or not self._orphans:
            return
        with self._lock:
            waiting = self._orphans.pop(owner_of(caller), [])
        for job_id in waiting:
            log.info("resuming job %s for its owner", job_id)
            self._launch(caller, job_id, self.settings.job_timeout, "JOB_TIMEOUT", resuming=True)
