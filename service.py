"""The generation service of one app: lanes, upstream sessions, downloader, and `run`, which
takes a request's prompts through the pipeline and waits for them up to the request's
deadline."""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from auth import Caller
from concurrency_manager import LaneManager
from downloads import Downloader, new_session
from files import new_request_folder, remove_partials
from generation import GenerationItem, Pipeline
from model_functions import ModelSpec
from settings import Settings
from upstream import SessionCache, TokenTracker

log = logging.getLogger(__name__)
READ_BUDGET_SHARE = 0.9  # leave a tenth of the read budget for clock skew and other calls
# Each create window is stretched by this margin: a create is counted upstream when it
# arrives, which can be later than when it was booked here (a new connection, a busy core).


class GenerationService:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic,
                 tracker: TokenTracker | None = None) -> None:
        self.settings, self.clock = settings, clock
        self.lanes = LaneManager(settings.concurrent_limit, settings.requests_per_minute,
                                 max(1, int(settings.reads_per_minute * READ_BUDGET_SHARE)),
                                 window=settings.rate_window, clock=clock,
                                 margin=max(0.25, settings.rate_window / 120))
        self.sessions = SessionCache(settings.base_url, keepalive=settings.concurrent_limit,
                                     pool_timeout=settings.pool_timeout, capacity=settings.session_cache_size,
                                     idle_seconds=settings.session_idle_seconds, tracker=tracker)
        self.downloader = Downloader(new_session(settings.concurrent_limit),
                                     settings.max_download_bytes, settings.download_attempts,
                                     clock=clock)
        self._active: dict[GenerationItem, Pipeline] = {}  # unfinished items, and what runs them
        self._active_lock = threading.Lock()
        Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
        removed = remove_partials(settings.output_dir)
        if removed:
            log.info("removed %d partial download(s) left by an earlier run", removed)

    def new_folder(self) -> tuple[Path, str]:
        """A fresh output folder for one request or job, and how responses show it."""
        folder = new_request_folder(self.settings.output_dir)
        return folder, os.path.join(self.settings.output_dir, folder.name)

    def start(self, caller: Caller, spec: ModelSpec, items: list[GenerationItem]) -> None:
        """Queue every item in the caller's lane; they run at once up to the limits."""
        lane = self.lanes.lane(caller.account)
        session = self.sessions.acquire(caller.token, uses=len(items))  # one use per item's job
        pipeline = Pipeline(spec, lane, session, self.downloader,
                            self.settings.generation_timeout, self.settings.prefer_wait,
                            self.settings.create_attempts, self.settings.throttle_retries, self.clock)
        with self._active_lock:
            self._active.update(dict.fromkeys(items, pipeline))
        for item in items:
            item.done_callbacks.append(self._forget)
            lane.submit(self.sessions.releasing(session, functools.partial(pipeline.run, item)))

    def _forget(self, item: GenerationItem) -> None:
        with self._active_lock:
            self._active.pop(item, None)

    def cancel(self, items: list[GenerationItem]) -> None:
        """Cancel items wherever they are: queued ones never start, running ones are canceled
        upstream by their workers, and those whose create is still held open are found and
        canceled upstream from here (in the background: it takes a read of the list)."""
        with self._active_lock:
            pipelines = {item: self._active.get(item) for item in items}
        for item in items:
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

    def shutdown(self) -> None:
        """Stop: unfinished items are told to stop (their workers cancel upstream)."""
        with self._active_lock:
            for item in self._active:
                item.cancelled.set()
        self.lanes.shutdown()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (the normal case) or never created
