"""Durable jobs: every generation (async job or synchronous request) is journaled, and a
restarted service finishes what the last one started without creating anything twice."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from gateway.accounts import Caller
from gateway.config import Settings
from gateway.engine.items import FINAL_ITEM_STATUSES, GenerationItem, ItemListener, ItemStatus
from gateway.engine.lost_creates import find_lost_creates
from gateway.engine.models import ModelSpec, resolve_model
from gateway.engine.service import GenerationService
from gateway.errors import ServiceError
from gateway.jobs.journal import UNFINISHED_JOB, JobStatus, Journal
from gateway.jobs.views import JobViews
from gateway.jobs.webhooks import WebhookSender

log = logging.getLogger(__name__)
STOPPING = "The service is stopping; submit the request again (or use POST /jobs, which survives restarts)"
STOP_GRACE_SECONDS = 5.0


@dataclasses.dataclass
class RunningJob:
    """A job being run by this process: its items, how many are not final yet, and how
    many workers have not returned yet (a canceled item is final before its worker stops)."""

    kind: str
    items: list[GenerationItem]
    remaining: int
    live: int


class JournalListener(ItemListener):
    """Writes an item's steps to the journal as they happen. A sent create is not journaled:
    a create whose answer is lost is found again at resume by one scan of the upstream's
    recent predictions, so creates never wait on the journal."""

    def __init__(self, manager: JobManager, job_id: str, claimed: set[str]) -> None:
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
        self._running: dict[str, RunningJob] = {}
        self._orphans: dict[str, list[str]] = {}   # user jobs waiting for their owner's token
        self._lock = threading.Lock()
        self.views = JobViews(settings, journal, self._live_statuses)
        self._webhooks = WebhookSender(settings.webhook_secret, settings.webhook_attempts,
                                       settings.webhook_allow_private,
                                       lambda job_id: journal.set_job(job_id, webhook_delivered=1))

    # -- submitting -----------------------------------------------------------------------
    def run_sync(self, caller: Caller, spec: ModelSpec, prompts: list[str], stems: list[str],
                 params: dict, timeout: float, label: str) -> tuple[str, list[GenerationItem]]:
        """A synchronous request, journaled like a job: it answers within `timeout`.
        Returns the job id (the caller may read it at /jobs/<id>) and the items."""
        job_id = self._new_job(caller, spec, prompts, stems, params, "sync")
        items = self._launch(caller, job_id, timeout, label)
        self.service.wait(items, self.service.clock() + timeout)
        return job_id, items

    def submit(self, caller: Caller, spec: ModelSpec, prompts: list[str], stems: list[str], params: dict,
               webhook: str | None, idempotency_key: str | None, request_hash: str) -> tuple[dict, bool]:
        """Start a job; return (the job, whether it is new). Same key and body: the same job."""
        if idempotency_key:
            existing = self.journal.by_idempotency_key(caller.owner, idempotency_key)
            if existing is not None:
                return self._same_request(existing, request_hash), False
        try:
            job_id = self._new_job(caller, spec, prompts, stems, params, "job", webhook=webhook,
                                   idempotency_key=idempotency_key, request_hash=request_hash)
        except sqlite3.IntegrityError:  # a concurrent submit with the same key won
            existing = self.journal.by_idempotency_key(caller.owner, idempotency_key)
            return self._same_request(existing, request_hash), False
        self._launch(caller, job_id, self.settings.job_timeout, "JOB_TIMEOUT")
        return self.journal.job(job_id), True

    @staticmethod
    def _same_request(job: dict, request_hash: str) -> dict:
        if job["request_hash"] != request_hash:
            raise ServiceError(409, "Idempotency-Key was already used with a different request body")
        return job

    def _new_job(self, caller: Caller, spec: ModelSpec, prompts: list[str], stems: list[str],
                 params: dict, kind: str, **extra: Any) -> str:
        job_id = "job_" + secrets.token_hex(10)
        folder = self.service.new_folder()
        self.journal.add_job({"id": job_id, "owner": caller.owner, "kind": kind, "model": spec.id,
                              "params": params, "folder": folder.name, **extra},
                             [(i, p, s) for i, (p, s) in enumerate(zip(prompts, stems, strict=True))])
        return job_id

    # -- running --------------------------------------------------------------------------
    def _launch(self, caller: Caller, job_id: str, timeout: float, label: str,
                resuming: bool = False) -> list[GenerationItem]:
        """Build the unfinished items of a job from the journal and start them."""
        job = self.journal.job(job_id)
        spec, params = resolve_model(job["model"]), json.loads(job["params"])
        if resuming:
            self._recover_lost_creates(caller, job, params)
        items = self._items_of(job, params, timeout, label)
        with self._lock:
            self._running[job_id] = RunningJob(job["kind"], items, len(items), len(items))
        self.journal.set_job(job_id, status=JobStatus.RUNNING)
        if items:
            self.service.start(caller, spec, items)
        else:
            self.item_done(job_id, count=0)
        return items

    def _items_of(self, job: dict, params: dict, timeout: float, label: str) -> list[GenerationItem]:
        rows = self.journal.items(job["id"])
        listener = JournalListener(self, job["id"], {r["prediction_id"] for r in rows if r["prediction_id"]})
        folder = Path(self.settings.output_dir) / job["folder"]
        shown = os.path.join(self.settings.output_dir, job["folder"])
        deadline = self.service.clock() + timeout
        return [GenerationItem(r["idx"], r["prompt"], r["stem"], {"prompt": r["prompt"], **params}, folder,
                               shown, deadline, label, timeout, prediction_id=r["prediction_id"],
                               listeners=[listener])
                for r in rows if r["status"] not in FINAL_ITEM_STATUSES]

    def _recover_lost_creates(self, caller: Caller, job: dict, params: dict) -> None:
        """Items with no journaled prediction may still have one upstream (the last process
        died before the create's answer came back): adopt those (see lost_creates)."""
        rows = self.journal.items(job["id"])
        missing = [r for r in rows if r["status"] not in FINAL_ITEM_STATUSES and not r["prediction_id"]]
        if not missing:
            return
        claimed = {r["prediction_id"] for r in rows if r["prediction_id"]}
        with self.service.sessions.using(caller.token) as session:  # held: not closed mid-scan
            found = find_lost_creates(session, [(r["idx"], {"prompt": r["prompt"], **params}) for r in missing],
                                      job["created_at"], claimed, max_pages=100)
        for idx, state in found.items():
            self.journal.set_item(job["id"], idx, status=ItemStatus.RUNNING, prediction_id=state.id)

    def item_done(self, job_id: str, count: int = 1) -> None:
        """An item is final; when the last one is, the job is."""
        with self._lock:
            running = self._running.get(job_id)
            if running is None:
                return
            running.remaining -= count
            if running.remaining > 0:
                return
            self._forget_if_stopped(job_id)
        self._finish(job_id)

    def item_stopped(self, job_id: str) -> None:
        """An item's worker has returned: nothing of it runs upstream or on disk any more."""
        with self._lock:
            if job_id in self._running:
                self._running[job_id].live -= 1
                self._forget_if_stopped(job_id)

    def _forget_if_stopped(self, job_id: str) -> None:
        """Under the lock: a job is running here until every item is final *and* stopped."""
        running = self._running[job_id]
        if running.remaining <= 0 and running.live <= 0:
            del self._running[job_id]

    def _finish(self, job_id: str) -> None:
        states = [r["status"] for r in self.journal.items(job_id)]
        if ItemStatus.CANCELED in states:
            status = JobStatus.CANCELED
        elif all(s == ItemStatus.SUCCEEDED for s in states):
            status = JobStatus.SUCCEEDED
        else:
            status = JobStatus.PARTIAL if ItemStatus.SUCCEEDED in states else JobStatus.FAILED
        self.journal.set_job(job_id, status=status, finished_at=time.time())
        job = self.journal.job(job_id)
        if job and job["webhook"]:
            self._webhooks.send(job_id, job["webhook"], json.dumps(self.views.render(job)).encode())

    def _live_statuses(self, job_id: str) -> dict[int, ItemStatus]:
        """The live status of each item this process runs for the job (for the views)."""
        with self._lock:
            running = self._running.get(job_id)
            return {item.index: item.live_status for item in running.items} if running else {}

    # -- control ----------------------------------------------------------------------------
    def cancel(self, job_id: str, caller: Caller) -> dict:
        job = self.views.visible(job_id, caller)
        with self._lock:
            running = self._running.get(job_id)
            items = list(running.items) if running else []
        self.service.cancel(items)
        return self.journal.job(job["id"])

    def retry(self, job_id: str, caller: Caller) -> list[int]:
        """Run the failed and canceled items again, into the same names."""
        job = self.views.visible(job_id, caller)
        if job["status"] in UNFINISHED_JOB:
            raise ServiceError(409, "The job is still running; retry it once it has finished")
        with self._lock:
            stopping = job_id in self._running
        if stopping:  # canceled, but a worker is still winding down (e.g. canceling upstream)
            raise ServiceError(409, "The job's last run is still stopping; retry it in a few seconds")
        again = [r["idx"] for r in self.journal.items(job_id)
                 if r["status"] in (ItemStatus.FAILED, ItemStatus.CANCELED)]
        if again:
            self.journal.reset_items(job_id, again)
            self.journal.set_job(job_id, finished_at=None, webhook_delivered=0)
            self._launch(caller, job_id, self.settings.job_timeout, "JOB_TIMEOUT")
        return again

    # -- start and stop -----------------------------------------------------------------------
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
            self._webhooks.send(job["id"], job["webhook"], json.dumps(self.views.render(job)).encode())

    def adopt(self, caller: Caller) -> None:
        """Resume the caller's own unfinished jobs, now that their token is at hand."""
        if caller.is_admin or not self._orphans:
            return
        with self._lock:
            waiting = self._orphans.pop(caller.owner, [])
        for job_id in waiting:
            log.info("resuming job %s for its owner", job_id)
            self._launch(caller, job_id, self.settings.job_timeout, "JOB_TIMEOUT", resuming=True)

    def stop(self) -> None:
        """Tell unfinished synchronous items to stop (their clients get a 503 and their
        predictions are canceled upstream), wait a little for that, then close the journal.
        Jobs are left as they are: the next process resumes them."""
        with self._lock:
            sync = [item for job in self._running.values() if job.kind == "sync" for item in job.items]
        self.service.cancel(sync, stopping=STOPPING)
        end = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < end and self._sync_running():
            time.sleep(0.05)
        self.journal.close()

    def _sync_running(self) -> bool:
        with self._lock:
            return any(job.kind == "sync" for job in self._running.values())
