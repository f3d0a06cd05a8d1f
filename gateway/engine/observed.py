"""What the engine tells the metrics and the logs about an item, in one place.

`ItemObserver` is bound to one account and model (one `GenerationService.start`). It is an
`ItemListener` (items by final status, item time), wraps each item's job so that the job
runs in the item's own log context on the lane's thread (see gateway/logs.py) and measures
its wait for a slot, and has the few calls the pipeline and the output saver make where only
they know what happened: a create's answer, a retry, a cancel sent, a prediction's end, a
download.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from gateway import logs
from gateway.engine.items import GenerationItem, ItemListener
from gateway.engine.limits import Job
from gateway.engine.turnover import Rest
from gateway.engine.upstream import PredictionState, UpstreamError
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


class ItemObserver(ItemListener):
    def __init__(self, metrics: Metrics | None, account_key: str, model: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._m, self._clock = metrics, clock
        self.account = metrics.account(account_key) if metrics else ""
        self.model = metrics.model(model) if metrics else ""
        self._queued: dict[GenerationItem, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def unobserved(cls) -> ItemObserver:
        return cls(None, "", "")

    # -- the item's job ---------------------------------------------------------------------
    def job(self, item: GenerationItem, run: Callable[[GenerationItem, Callable[[], None]], Rest | None]) -> Job:
        """`run(item, release)` as a lane job: in the item's log context, with its slot wait
        measured; so is the rest it returns. Call when the item is queued."""
        item.listeners.append(self)
        queued = self._clock()
        with self._lock:
            self._queued[item] = queued

        def in_context(release: Callable[[], None]) -> Rest | None:
            logs.bind_item(item)
            if self._m:
                self._m.slot_wait_seconds.labels(self.model).observe(self._clock() - queued)
            return run(item, release)

        def job(release: Callable[[], None]) -> Rest | None:
            # The item's context (captured when it was made: the request's id, the job's) is
            # entered on the pool thread; each item has its own, and its job and its rest
            # run one after the other, so none is entered twice at once.
            rest = item.context.run(in_context, release)
            return None if rest is None else lambda: item.context.run(rest)

        return job

    # -- listener events ----------------------------------------------------------------------
    def done(self, item: GenerationItem) -> None:
        with self._lock:
            queued = self._queued.pop(item, None)
        seconds = None if queued is None else self._clock() - queued
        log.info("item %d %s%s%s", item.index, item.state,
                 "" if seconds is None else f" after {seconds:.2f} s", f": {item.error}" if item.error else "")
        if self._m:
            self._m.items.labels(self.account, self.model, item.state).inc()
            if seconds is not None:
                self._m.item_seconds.labels(self.model, item.state).observe(seconds)

    # -- pipeline calls -----------------------------------------------------------------------
    @contextlib.contextmanager
    def create_call(self) -> Iterator[None]:
        """Around one create: its latency, and its answer's status ('201' when it created)."""
        started, status = self._clock(), "201"
        try:
            yield
        except UpstreamError as exc:
            status = str(exc.status)
            raise
        except httpx.TransportError:
            status = "unreachable"
            raise
        finally:
            if self._m:
                self._m.creates.labels(self.account, self.model, status).inc()
                self._m.create_seconds.labels(self.model).observe(self._clock() - started)

    def create_retried(self, throttled: bool) -> None:
        if self._m:
            self._m.create_retries.labels(self.account, self.model, "throttled" if throttled else "fault").inc()

    def cancel_sent(self) -> None:
        if self._m:
            self._m.cancels.labels(self.account, self.model).inc()

    def prediction_final(self, item: GenerationItem, state: PredictionState) -> None:
        """The upstream says the prediction is final: its status, duration and estimated cost."""
        if not self._m:
            return
        created = item.timings.get("created")  # unknown for a prediction an earlier process made
        seconds = None if created is None else max(0.0, time.time() - created)
        self._m.predictions.labels(self.account, self.model, state.status).inc()
        if seconds is not None:
            self._m.prediction_seconds.labels(self.model, state.status).observe(seconds)
        outputs = len(state.output) if isinstance(state.output, list) else int(state.output is not None)
        self._m.estimate_spend(self.account, self.model, state.status, seconds, outputs)

    # -- output saver calls -------------------------------------------------------------------
    def download(self, fetch: Callable[..., tuple[Path, str]], *args: Any) -> tuple[Path, str]:
        """`fetch(*args)` (one output file), counted: the file and its bytes, or a failure."""
        started = self._clock()
        try:
            path, ext = fetch(*args)
        except Exception:
            if self._m:
                self._m.download_failures.labels(self.account, self.model).inc()
            raise
        if self._m:
            self._m.downloads.labels(self.account, self.model).inc()
            self._m.download_bytes.labels(self.account, self.model).inc(path.stat().st_size)
            self._m.download_seconds.labels(self.model).observe(self._clock() - started)
        return path, ext
