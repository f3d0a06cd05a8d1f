"""The generation service of one app: lanes (limits per account), upstream sessions and the
output saver. `start` queues a request's items in its account's lane, `wait` waits for them
up to the request's deadline, `cancel` stops them wherever they are."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.accounts import Caller, account_key
from gateway.config import Settings
from gateway.engine.downloads import Downloader, new_session
from gateway.engine.files import new_request_folder, remove_partials
from gateway.engine.items import GenerationItem, ItemListener
from gateway.engine.limits import LaneManager
from gateway.engine.models import ModelSpec
from gateway.engine.observed import ItemObserver
from gateway.engine.outputs import OutputSaver
from gateway.engine.pipeline import Pipeline
from gateway.engine.shared_lanes import SharedLaneManager
from gateway.engine.shared_limits import SharedLimitsUnavailable
from gateway.engine.upstream import SessionCache, TokenTracker
from gateway.errors import ServiceError
from gateway.metrics import Metrics

log = logging.getLogger(__name__)
READ_BUDGET_SHARE = 0.9  # leave a tenth of the read budget for clock skew and other calls
REDIS_RETRY_AFTER_SECONDS = 5


class _Unfinished(ItemListener):
    """The service's own list of unfinished items and the pipeline that runs each."""

    def __init__(self) -> None:
        self.items: dict[GenerationItem, Pipeline] = {}
        self.lock = threading.Lock()

    def done(self, item: GenerationItem) -> None:
        with self.lock:
            self.items.pop(item, None)


class GenerationService:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic,
                 tracker: TokenTracker | None = None, metrics: Metrics | None = None) -> None:
        self.settings, self.clock = settings, clock
        self.metrics = metrics  # None: nothing measured
        self.lanes = _lanes(settings, clock)  # in this process, or shared on Redis (REDIS_URL)
        self.sessions = SessionCache(settings.base_url, keepalive=settings.concurrent_limit,
                                     pool_timeout=settings.pool_timeout, capacity=settings.session_cache_size,
                                     idle_seconds=settings.session_idle_seconds, tracker=tracker)
        self.saver = OutputSaver(Downloader(new_session(settings.concurrent_limit),
                                            settings.max_download_bytes, settings.download_attempts,
                                            clock=clock))
        self._unfinished = _Unfinished()
        Path(settings.output_dir).mkdir(parents=True, exist_ok=True)

    def remove_partials(self) -> None:
        """Delete temporary downloads a crashed process left (at start, and now and then from
        the jobs' upkeep); only stale ones, never a sibling worker's download in progress."""
        removed = remove_partials(self.settings.output_dir)
        if removed:
            log.info("removed %d partial download(s) left by a crashed process", removed)

    def new_folder(self) -> Path:
        """A fresh output folder for one request or job (created on first write)."""
        return new_request_folder(self.settings.output_dir)

    def start(self, caller: Caller, spec: ModelSpec, items: list[GenerationItem]) -> None:
        """Queue every item in the caller's lane; they run at once up to the limits."""
        lane = self.lanes.lane(caller.account)
        session = self.sessions.acquire(caller.token, uses=len(items))  # one use per item's job
        observer = ItemObserver(self.metrics, caller.account, spec.id, self.clock)  # metrics, log context
        pipeline = Pipeline(spec, lane, session, self.saver,
                            self.settings.generation_timeout, self.settings.prefer_wait,
                            self.settings.create_attempts, self.settings.throttle_retries, self.clock, observer)
        with self._unfinished.lock:
            self._unfinished.items.update(dict.fromkeys(items, pipeline))
        for item in items:
            item.listeners.append(self._unfinished)
            lane.submit(self.sessions.releasing(session, observer.job(item, pipeline.run)), item)

    def cancel(self, items: list[GenerationItem], stopping: str | None = None) -> None:
        """Cancel items wherever they are: queued ones never start, running ones are canceled
        upstream by their workers, and those whose create is still held open are found and
        canceled upstream from here (in the background: it takes a read of the list).
        With `stopping` (a reason), they fail with a 503 instead: the service is stopping."""
        with self._unfinished.lock:
            pipelines = {item: self._unfinished.items.get(item) for item in items}
        for item in items:
            if stopping:
                item.abandon(stopping, 503)
            else:
                item.cancel()
        # Read `create_held` only after `cancelled` is set: a worker sets `create_held` before
        # it checks `cancelled` and sends, so no create slips between the two unseen.
        by_pipeline: dict[int, tuple[Pipeline, list[GenerationItem]]] = {}
        for item, pipeline in pipelines.items():
            if item.create_held and pipeline is not None:
                by_pipeline.setdefault(id(pipeline), (pipeline, []))[1].append(item)
        for pipeline, group in by_pipeline.values():
            if self.sessions.hold(pipeline.session):  # held while it reads and cancels
                threading.Thread(target=self.sessions.releasing(pipeline.session, pipeline.cancel_held),
                                 args=(group,), daemon=True, name="cancel-held").start()

    def wait(self, items: list[GenerationItem], deadline: float) -> None:
        """Block until every item is done or `deadline` passes; late items are expired
        (failed with a timeout, their predictions canceled upstream)."""
        for item in items:
            item.done.wait(max(0.0, deadline - self.clock()))
        for item in items:
            if not item.done.is_set():
                item.expire()
        if items:
            _remove_if_empty(items[0].folder)

    def status(self) -> dict[str, Any]:
        return self.lanes.status()

    def configure_limits(self, concurrent_limit: int | None, requests_per_minute: int | None) -> None:
        """Change the limits of every account at run time (see LaneManager.configure); with
        REDIS_URL, for every worker and replica. ServiceError 503 if Redis is unreachable."""
        try:
            self.lanes.configure(concurrent_limit, requests_per_minute)
        except SharedLimitsUnavailable as exc:
            raise _redis_unavailable(exc) from None

    def start_background(self) -> None:
        """Background work of the limits (with REDIS_URL: lease renewals, shared settings)."""
        self.lanes.start()

    def ensure_admitting(self) -> None:
        """ServiceError 503 when new work could not be admitted now (REDIS_URL set and Redis
        unreachable): a synchronous caller is told at once instead of waiting out its timeout."""
        try:
            self.lanes.check_available()
        except SharedLimitsUnavailable as exc:
            raise _redis_unavailable(exc) from None

    def shutdown(self) -> None:
        """Stop: unfinished items are told to stop (their workers cancel upstream), then the
        threads and the upstream clients are let go."""
        with self._unfinished.lock:
            for item in self._unfinished.items:
                item.cancelled.set()
        self.lanes.shutdown()
        self.sessions.close()


def _lanes(settings: Settings, clock: Callable[[], float]) -> LaneManager | SharedLaneManager:
    """The account limits: in this process, or in Redis for every worker and replica."""
    reads = max(1, int(settings.reads_per_minute * READ_BUDGET_SHARE))
    # Each create window is stretched by a margin: a create is counted upstream when it
    # arrives, which can be later than when it was booked here (a new connection, a busy core).
    margin = max(0.25, settings.rate_window / 120)
    if settings.redis_url:
        return SharedLaneManager(settings.redis_url, settings.redis_prefix, settings.lease_seconds,
                                 settings.concurrent_limit, settings.requests_per_minute, reads,
                                 window=settings.rate_window, clock=clock, margin=margin,
                                 home_account=account_key(settings.replicate_api_token)
                                 if settings.replicate_api_token else None)
    return LaneManager(settings.concurrent_limit, settings.requests_per_minute, reads,
                       window=settings.rate_window, clock=clock, margin=margin)


def _redis_unavailable(exc: SharedLimitsUnavailable) -> ServiceError:
    return ServiceError(503, f"{exc}; nothing new is admitted until Redis answers again, retry later",
                        headers={"Retry-After": str(REDIS_RETRY_AFTER_SECONDS)})


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (the normal case) or never created
