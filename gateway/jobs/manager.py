"""Durable jobs: every generation (async job or synchronous request) is journaled, and a
restarted service, or another replica sharing the journal, finishes what the last one
started without creating anything twice.

A job is run by the replica that holds its claim (see journal.py): the one it was submitted
to, or the one that adopted it when the holder's lease ran out. Its items run there together
(resuming, the lost-create search and the job's final state are per job). Any replica
answers for any job: watching reads the journal, cancel goes through it (`cancel_requested`,
picked up by the holder's heartbeat), retry claims the job first."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway import logs
from gateway.accounts import Caller
from gateway.config import Settings
from gateway.engine.items import FINAL_ITEM_STATUSES, GenerationItem, ItemListener, ItemStatus
from gateway.engine.lost_creates import find_lost_creates
from gateway.engine.models import ModelSpec, resolve_model
from gateway.engine.service import GenerationService
from gateway.errors import ServiceError
from gateway.jobs.database import Conflict, DatabaseUnavailable
from gateway.jobs.journal import UNFINISHED_JOB, JobStatus, Journal
from gateway.jobs.replica import ReplicaIdentity
from gateway.jobs.tokens import TokenBox
from gateway.jobs.upkeep import Upkeep, remove_folders
from gateway.jobs.views import JobViews
from gateway.jobs.webhooks import WebhookSender

log = logging.getLogger(__name__)
STILL_STOPPING = "The job's last run is still stopping; retry it in a few seconds"
STOPPING = "The service is stopping; submit the request again (or use POST /jobs, which survives restarts)"
STOP_GRACE_SECONDS = 5.0
CANCELED = "Canceled by request"


@dataclasses.dataclass
class RunningJob:
    """A job being run by this process: its items, how many are not final yet, and how
    many workers have not returned yet (a canceled item is final before its worker stops)."""

    kind: str
    items: list[GenerationItem]
    remaining: int
    live: int
    finished: bool = False   # the job's final state is journaled


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
        try:
            self._manager.journal.mark_running(self._job_id, item.index, item.prediction_id,
                                               item.timings.get("started", time.time()))
        except DatabaseUnavailable as exc:  # found again upstream if this process dies before the next write
            log.warning("job %s item %d: journaling its prediction failed: %s", self._job_id, item.index, exc)

    def done(self, item: GenerationItem) -> None:
        try:
            self._manager.journal.set_item(self._job_id, item.index, status=item.state, files=item.files,
                                           error=item.error, finished_at=time.time())
        except DatabaseUnavailable as exc:  # the job goes on; see JobManager.item_done
            log.warning("job %s item %d: journaling its end failed: %s", self._job_id, item.index, exc)
        self._manager.item_done(self._job_id)

    def stopped(self, item: GenerationItem) -> None:
        self._manager.item_stopped(self._job_id)


class JobManager:
    def __init__(self, settings: Settings, service: GenerationService, journal: Journal,
                 replica: str | None = None, specs: Callable[[str], ModelSpec] = resolve_model) -> None:
        # `specs` turns a journaled model name back into its spec (from the kept schemas:
        # a resumed or adopted job of any model runs as it was submitted).
        self.settings, self.service, self.journal, self._specs = settings, service, journal, specs
        self._identity = None if replica else ReplicaIdentity(settings.port)
        self.replica = replica or self._identity.name
        self.lease = settings.claim_lease_seconds
        self.tokens = TokenBox(settings.token_encryption_key)
        self._running: dict[str, RunningJob] = {}
        self._orphans: dict[str, list[str]] = {}   # user jobs waiting for their owner's token
        self._held: set[str] = set()               # jobs this process has claimed (leases it renews)
        self._sending: set[str] = set()            # webhook deliveries this process has claimed
        self._lock = threading.Lock()
        self.views = JobViews(settings, journal, self._live_statuses)
        self._webhooks = WebhookSender(settings.webhook_secret, settings.webhook_attempts,
                                       settings.webhook_allow_private, self._webhook_done)
        self._upkeep = Upkeep(self, self.lease, settings.job_retention_days * 86400)

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
        except Conflict:  # a concurrent submit with the same key won (on any replica)
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
                              "params": params, "folder": folder.name, "token_sealed": self._sealed(caller),
                              **extra},
                             [(i, p, s) for i, (p, s) in enumerate(zip(prompts, stems, strict=True))],
                             replica=self.replica, lease=self.lease)
        with self._lock:
            self._held.add(job_id)
        return job_id

    def _sealed(self, caller: Caller) -> str | None:
        """A user's token, encrypted, if TOKEN_ENCRYPTION_KEY is set (admin jobs run on the
        server's token, which every replica has)."""
        return None if caller.is_admin else self.tokens.seal(caller.token)

    # -- running --------------------------------------------------------------------------
    def _launch(self, caller: Caller, job_id: str, timeout: float, label: str,
                resuming: bool = False) -> list[GenerationItem]:
        """Build the unfinished items of a job from the journal and start them (this
        replica holds the job's claim)."""
        job = self.journal.job(job_id)
        spec, params = self._specs(job["model"]), json.loads(job["params"])
        if resuming:
            self._recover_lost_creates(caller, job, params)
        with logs.log_fields(job_id=job_id):  # the items' log lines carry it (they copy this context)
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
        spec = self._specs(job["model"])  # what was sent: a prompt-less model takes it in its own input
        wanted = [(r["idx"], spec.upstream_input({"prompt": r["prompt"], **params})) for r in missing]
        with self.service.sessions.using(caller.token) as session:  # held: not closed mid-scan
            found = find_lost_creates(session, wanted, job["created_at"], claimed, max_pages=100)
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
        try:
            self._finish(job_id)
        except DatabaseUnavailable as exc:
            # Not journaled as finished: once its claim runs out (it is not renewed after this),
            # a replica adopts it again and finishes it from what the journal has.
            log.warning("job %s: journaling its end failed: %s", job_id, exc)
        with self._lock:
            running.finished = True
            forgotten = self._forget_if_stopped(job_id)
        if forgotten:
            self._release(job_id)

    def item_stopped(self, job_id: str) -> None:
        """An item's worker has returned: nothing of it runs upstream or on disk any more."""
        with self._lock:
            if job_id not in self._running:
                return
            self._running[job_id].live -= 1
            forgotten = self._forget_if_stopped(job_id)
        if forgotten:
            self._release(job_id)

    def _forget_if_stopped(self, job_id: str) -> bool:
        """Under the lock: a job is running here (and its claim held) until its final state
        is journaled *and* every item's worker has stopped; True once it is forgotten."""
        running = self._running[job_id]
        if running.finished and running.live <= 0:
            del self._running[job_id]
            return True
        return False

    def _finish(self, job_id: str) -> None:
        states = [r["status"] for r in self.journal.items(job_id)]
        if ItemStatus.CANCELED in states:
            status = JobStatus.CANCELED
        elif all(s == ItemStatus.SUCCEEDED for s in states):
            status = JobStatus.SUCCEEDED
        else:
            status = JobStatus.PARTIAL if ItemStatus.SUCCEEDED in states else JobStatus.FAILED
        # The token is needed no more: erased with the job's end.
        self.journal.set_job(job_id, status=status, finished_at=time.time(), token_sealed=None)
        job = self.journal.job(job_id)
        if job and self.service.metrics:
            self.service.metrics.jobs.labels(job["kind"], status).inc()
        if job and job["webhook"]:
            self._send_webhooks(job_id)

    def _webhook_done(self, job_id: str, delivered: bool) -> None:
        with self._lock:
            self._sending.discard(job_id)  # its claim is no longer renewed
        if self.service.metrics:
            self.service.metrics.webhooks.labels("delivered" if delivered else "given_up").inc()
        self.journal.webhook_done(job_id, delivered)

    def _send_webhooks(self, job_id: str | None = None) -> None:
        """Send the pending webhooks this replica can claim (one job's, or any): a delivery
        is claimed in the journal, so it is sent by one replica even when several race."""
        for job in self.journal.claim_webhooks(self.replica, self.lease, job_id):
            with self._lock:
                self._sending.add(job["id"])
            self._webhooks.send(job["id"], job["webhook"], json.dumps(self.views.render(job)).encode())

    def _live_statuses(self, job_id: str) -> dict[int, ItemStatus]:
        """The live status of each item this process runs for the job (for the views)."""
        with self._lock:
            running = self._running.get(job_id)
            return {item.index: item.live_status for item in running.items} if running else {}

    # -- control ----------------------------------------------------------------------------
    def cancel(self, job_id: str, caller: Caller) -> dict:
        """Cancel the job wherever it runs: here at once; on another replica through the
        journal (its heartbeat picks the request up); nowhere (its replica died, or it
        waits for its owner): from here, after claiming it."""
        job = self.views.visible(job_id, caller)
        if job["status"] in UNFINISHED_JOB:
            self.journal.request_cancel(job["id"])
        with self._lock:
            running = self._running.get(job["id"])
            items = list(running.items) if running else []
        if running is not None:
            self.service.cancel(items)
        elif job["status"] in UNFINISHED_JOB:
            claimed = self._claim(job["id"])
            if claimed is not None:
                self._cancel_here(claimed, self._caller_for(claimed, caller))
        return self.journal.job(job["id"])

    def _cancel_here(self, job: dict, caller: Caller | None) -> None:
        """Cancel a job that no process runs (this replica holds its claim): its predictions
        upstream (those journaled, and those whose answer was lost), then its items."""
        if caller is None:
            log.warning("job %s canceled without a token: its running predictions, if any, are not "
                        "canceled upstream", job["id"])
        else:
            self._recover_lost_creates(caller, job, json.loads(job["params"]))
            running = [r["prediction_id"] for r in self.journal.items(job["id"])
                       if r["prediction_id"] and r["status"] not in FINAL_ITEM_STATUSES]
            with self.service.sessions.using(caller.token) as session:
                for prediction_id in running:
                    try:
                        session.cancel(prediction_id)
                    except Exception as exc:  # best effort: the prediction ends at its own deadline
                        log.warning("cancel of %s failed: %s", prediction_id, type(exc).__name__)
        self.journal.cancel_unfinished_items(job["id"], CANCELED)
        self._finish(job["id"])
        self._release(job["id"])

    def retry(self, job_id: str, caller: Caller) -> list[int]:
        """Run the failed and canceled items again, into the same names."""
        job = self.views.visible(job_id, caller)
        if job["status"] in UNFINISHED_JOB:
            raise ServiceError(409, "The job is still running; retry it once it has finished")
        job_id = job["id"]
        with self._lock:
            stopping = job_id in self._running
        if stopping:  # canceled, but a worker is still winding down (e.g. canceling upstream)
            raise ServiceError(409, STILL_STOPPING)
        if not self._failed_items(job_id):
            return []
        # The last run's replica holds the claim until its workers have stopped (on any replica).
        claimed = self._claim(job_id)
        if claimed is None:
            raise ServiceError(409, STILL_STOPPING)
        again = self._failed_items(job_id)
        if claimed["status"] in UNFINISHED_JOB or not again:  # a racing retry won
            self._release(job_id)
            if claimed["status"] in UNFINISHED_JOB:
                raise ServiceError(409, "The job is still running; retry it once it has finished")
            return []
        self.journal.reset_items(job_id, again)
        self.journal.set_job(job_id, finished_at=None, webhook_delivered=0, webhook_claimed_by=None,
                             cancel_requested=0, token_sealed=self._sealed(caller))
        self._launch(caller, job_id, self.settings.job_timeout, "JOB_TIMEOUT")
        return again

    def _failed_items(self, job_id: str) -> list[int]:
        return [r["idx"] for r in self.journal.items(job_id)
                if r["status"] in (ItemStatus.FAILED, ItemStatus.CANCELED)]

    # -- claims -------------------------------------------------------------------------------
    def _claim(self, job_id: str) -> dict | None:
        """Claim one job if it is free (see journal.FREE_SQL); the job, or None."""
        job = self.journal.claim(job_id, self.replica, self.lease)
        if job is not None:
            with self._lock:
                self._held.add(job_id)
        return job

    def _adopt(self, limit: int = 20) -> list[dict]:
        """Claim free unfinished jobs this replica can run (see Journal.adopt)."""
        jobs = self.journal.adopt(self.replica, self.lease, admin=bool(self.settings.replicate_api_token),
                                  sealed=self.tokens.enabled, limit=limit)
        with self._lock:
            self._held.update(job["id"] for job in jobs)
        return jobs

    def _release(self, job_id: str) -> None:
        """Nothing of the job runs here any more: other replicas may take it."""
        with self._lock:
            self._held.discard(job_id)
        try:
            self.journal.release(job_id, self.replica)
        except DatabaseUnavailable as exc:  # not renewed any more: the lease runs out by itself
            log.warning("job %s: releasing its claim failed: %s", job_id, exc)

    # -- adopting ----------------------------------------------------------------------------
    def _caller_for(self, job: dict, caller: Caller | None = None) -> Caller | None:
        """Whose token runs the job: the server's for an admin job, the owner's when the owner
        is calling, else the sealed one (TOKEN_ENCRYPTION_KEY); None if none is at hand."""
        if job["owner"] == "admin":
            token = self.settings.replicate_api_token
            return Caller(token, True) if token else None
        if caller is not None and caller.owner == job["owner"]:
            return caller
        token = self.tokens.open(job.get("token_sealed"))
        if token is None:
            return None
        owner = Caller(token, False)
        return owner if owner.owner == job["owner"] else None

    def _take_over(self, job: dict, caller: Caller | None) -> None:
        """Run (or, if a cancel was asked for, cancel) a job this replica has just claimed;
        the claim is let go if that cannot start."""
        try:
            if caller is None:  # sealed with another key, say: it waits for its owner's next call
                log.warning("job %s waits for its owner: its sealed token does not open", job["id"])
                self.journal.set_job(job["id"], token_sealed=None)
                self._release(job["id"])
            elif job["cancel_requested"]:
                self._cancel_here(job, caller)
            else:
                if not caller.is_admin and self.tokens.enabled and not job.get("token_sealed"):
                    self.journal.set_job(job["id"], token_sealed=self.tokens.seal(caller.token))
                log.info("resuming job %s", job["id"])
                self._launch(caller, job["id"], self.settings.job_timeout, "JOB_TIMEOUT", resuming=True)
        except BaseException:
            with self._lock:
                self._running.pop(job["id"], None)
            self._release(job["id"])
            raise

    def adopt_expired(self) -> None:
        """Claim the jobs whose replica died (or stopped), and run them: in a thread each,
        since finding lost creates reads the upstream's list, and the heartbeat must go on."""
        jobs = self._adopt()
        for job in jobs:
            threading.Thread(target=self._take_over_logged, args=(job,), daemon=True,
                             name=f"adopt-{job['id']}").start()

    def _take_over_logged(self, job: dict, caller: Caller | None = None) -> None:
        """`_take_over`, its failure logged: one job that cannot resume stops nothing else."""
        try:
            self._take_over(job, self._caller_for(job, caller))
        except Exception:
            log.exception("resuming job %s failed; it is left for another attempt", job["id"])

    def refresh_orphans(self) -> None:
        """The user jobs nobody runs, by owner: resumed when their owner calls (`adopt`)."""
        orphans: dict[str, list[str]] = {}
        for job in self.journal.orphans(self.replica):
            orphans.setdefault(job["owner"], []).append(job["id"])
        with self._lock:
            self._orphans = orphans

    def adopt(self, caller: Caller) -> None:
        """Resume the caller's own unfinished jobs, now that their token is at hand."""
        if caller.is_admin or not self._orphans:
            return
        with self._lock:
            waiting = self._orphans.pop(caller.owner, [])
        for job_id in waiting:
            job = self._claim(job_id)
            if job is None:
                continue  # another replica took it meanwhile
            if job["status"] not in UNFINISHED_JOB:
                self._release(job_id)
                continue
            log.info("resuming job %s for its owner", job_id)
            self._take_over_logged(job, caller)

    # -- heartbeat duties (upkeep.py) ---------------------------------------------------------
    def renew_leases(self) -> None:
        """Renew the claims this process holds, and only those: a claim it lost track of (a
        write lost while the database was away) runs out and its job is adopted again."""
        with self._lock:
            mine, sending = set(self._held), set(self._sending)
        held = self.journal.renew(self.replica, self.lease, mine, sending)
        with self._lock:
            lost = [job_id for job_id, job in self._running.items() if not job.finished and job_id not in held]
        for job_id in lost:  # paused longer than the lease: another replica may run it too
            log.error("job %s: this replica's claim was lost (CLAIM_LEASE_SECONDS too short?)", job_id)

    def pick_up_cancels(self) -> None:
        """Cancels asked for on another replica, of jobs that run here."""
        for job_id in self.journal.cancel_requests(self.replica):
            with self._lock:
                running = self._running.get(job_id)
                items = [item for item in running.items if not item.done.is_set()] if running else []
            if items:
                log.info("job %s: canceled through the journal", job_id)
                self.service.cancel(items)

    def send_pending_webhooks(self) -> None:
        self._send_webhooks()

    def remove_expired_jobs(self) -> None:
        """JOB_RETENTION_DAYS: finished jobs older than that leave the journal (their files
        too with DELETE_FILES_WITH_JOBS)."""
        before = time.time() - self.settings.job_retention_days * 86400
        while folders := self.journal.remove_finished(before):
            log.info("removed %d finished job(s) older than %g days", len(folders), self.settings.job_retention_days)
            if self.settings.delete_files_with_jobs:
                remove_folders(self.settings.output_dir, folders)

    def remove_stale_partials(self) -> None:
        self.service.remove_partials()

    # -- start and stop -----------------------------------------------------------------------
    def resume(self) -> None:
        """At start-up: pick up the unfinished jobs nobody runs (a previous process's, or a
        dead replica's): admin jobs now (and user jobs with a sealed token), other user jobs
        when their owner next calls; send the webhooks nobody sent."""
        if not self.settings.replicate_api_token and any(
                job["owner"] == "admin" for job in self.journal.unfinished_jobs()):
            log.warning("admin jobs wait: REPLICATE_API_TOKEN is not configured")
        for job in self._adopt(limit=100_000):
            self._take_over_logged(job)
        self.refresh_orphans()
        self._send_webhooks()

    def start(self) -> None:
        """Start the heartbeat (leases, cancels from other replicas, adoption, webhooks, retention)."""
        self._upkeep.start()

    def stop(self) -> None:
        """Stop the heartbeat; tell unfinished synchronous items to stop (their clients get a
        503 and their predictions are canceled upstream), wait a little for that, let other
        replicas adopt this one's jobs at once, then close the journal. Jobs are left as they
        are: the next process, or another replica, resumes them."""
        self._upkeep.stop()
        with self._lock:
            sync = [item for job in self._running.values() if job.kind == "sync" for item in job.items]
        self.service.cancel(sync, stopping=STOPPING)
        end = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < end and self._sync_running():
            time.sleep(0.05)
        try:
            self.journal.release_all(self.replica)
        except Exception as exc:  # the database is away: the leases run out by themselves
            log.warning("releasing this replica's claims failed: %s", exc)
        self.journal.close()
        if self._identity is not None:
            self._identity.release()

    def _sync_running(self) -> bool:
        with self._lock:
            return any(job.kind == "sync" for job in self._running.values())
