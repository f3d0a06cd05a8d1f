"""The generation service of one app: lanes (limits per account), upstream sessions and the
output saver. `start` queues a request's items in its account's lane, `wait` waits for them
up to the request's deadline, `cancel` stops them wherever they are."""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.accounts import Caller
from gateway.config import Settings
from gateway.engine.downloads import Downloader, new_session
from gateway.engine.files import new_request_folder, remove_partials
from gateway.engine.items import GenerationItem, ItemListener
from gateway.engine.limits import LaneManager
from gateway.engine.models import ModelSpec
from gateway.engine.outputs import OutputSaver
from gateway.engine.pipeline import Pipeline
from gateway.engine.upstream import SessionCache, TokenTracker

log = logging.getLogger(__name__)
READ_BUDGET_SHARE = 0.9  # leave a tenth of the read budget for clock skew and other calls


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
                 tracker: TokenTracker | None = None) -> None:
        self.settings, self.clock = settings, clock
        # Each create window is stretched by a margin: a create is counted upstream when it
        # arrives, which can be later than when it was booked here (a new connection, a busy core).
        self.lanes = LaneManager(settings.concurrent_limit, settings.requests_per_minute,
                                 max(1, int(settings.reads_per_minute * READ_BUDGET_SHARE)),
                                 window=settings.rate_window, clock=clock,
                                 margin=max(0.25, settings.rate_window / 120))
        self.sessions = SessionCache(settings.base_url, keepalive=settings.concurrent_limit,
                                     pool_timeout=settings.pool_timeout, capacity=settings.session_cache_size,
                                     idle_seconds=settings.session_idle_seconds, tracker=tracker)
        self.saver = OutputSaver(Downloader(new_session(settings.concurrent_limit),
                                            settings.max_download_bytes, settings.download_attempts,
                                            clock=clock))
        self._unfinished = _Unfinished()
        Path(settings.output_dir).mkdir(parents=True, exist_ok=True)

    def remove_partials(self) -> None:
        """Delete temporary downloads a crashed process left (at start, before any work)."""
        removed = remove_partials(self.settings.output_dir)
        if removed:
            log.info("removed %d partial download(s) left by an earlier run", removed)

    def new_folder(self) -> Path:
        """A fresh output folder for one request or job (created on first write)."""
        return new_request_folder(self.settings.output_dir)

    def start(self, caller: Caller, spec: ModelSpec, items: list[GenerationItem]) -> None:
        """Queue every item in the caller's lane; they run at once up to the limits."""
        lane = self.lanes.lane(caller.account)
        session = self.sessions.acquire(caller.token, uses=len(items))  # one use per item's job
        pipeline = Pipeline(spec, lane, session, self.saver,
                            self.settings.generation_timeout, self.settings.prefer_wait,
                            self.settings.create_attempts, self.settings.throttle_retries, self.clock)
        with self._unfinished.lock:
            self._unfinished.items.update(dict.fromkeys(items, pipeline))
        for item in items:
            item.listeners.append(self._unfinished)
            lane.submit(self.sessions.releasing(session, functools.partial(pipeline.run, item)))

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

    def status(self) -> dict[str, int]:
        return self.lanes.status()

    def configure_limits(self, concurrent_limit: int | None, requests_per_minute: int | None) -> None:
        """Change the limits of every account at run time (see LaneManager.configure)."""
        self.lanes.configure(concurrent_limit, requests_per_minute)

    def shutdown(self) -> None:
        """Stop: unfinished items are told to stop (their workers cancel upstream), then the
        threads and the upstream clients are let go."""
        with self._unfinished.lock:
            for item in self._unfinished.items:
                item.cancelled.set()
        self.lanes.shutdown()
        self.sessions.close()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (the normal case) or never created
