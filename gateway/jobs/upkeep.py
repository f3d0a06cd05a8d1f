"""The background thread of a replica's jobs: one heartbeat that

- renews the leases of the jobs (and webhook deliveries) this replica holds;
- picks up cancels asked for on another replica, for the jobs it holds;
- adopts jobs whose leases expired (a dead replica's work) and notes the user jobs that wait
  for their owner;
- sends webhooks nobody is sending (a crash between a job's end and its delivery);
- removes finished jobs past JOB_RETENTION_DAYS;
- removes partial downloads a crashed process left (stale ones only: see files.py).

Started by `gateway.app.start`, stopped by `JobManager.stop`. One tick is at most a second
and at most a quarter of the lease, so a lease is renewed several times before it can run
out, and a cancel from another replica is picked up within about a second.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)
SLOW_EVERY = 5.0        # seconds between the sweeps for orphans and pending webhooks
PARTIALS_EVERY = 600.0  # seconds between the sweeps of OUTPUT_DIR for stale partial downloads
MAX_TICK = 1.0


class Duties(Protocol):
    def renew_leases(self) -> None: ...
    def pick_up_cancels(self) -> None: ...
    def adopt_expired(self) -> None: ...
    def refresh_orphans(self) -> None: ...
    def send_pending_webhooks(self) -> None: ...
    def remove_expired_jobs(self) -> None: ...
    def remove_stale_partials(self) -> None: ...


class Upkeep:
    def __init__(self, duties: Duties, lease: float, retention_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._duties, self._clock = duties, clock
        self.tick = min(MAX_TICK, lease / 4)
        # Retention needs no precision: a tenth of the period, at most hourly.
        self._retention_every = min(3600.0, retention_seconds / 10) if retention_seconds > 0 else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="jobs-upkeep")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        next_slow = next_retention = self._clock()
        next_partials = next_slow + PARTIALS_EVERY  # start-up removed them just now
        while not self._stop.wait(self.tick):
            now = self._clock()
            self._do(self._duties.renew_leases, self._duties.pick_up_cancels, self._duties.adopt_expired)
            if now >= next_slow:
                next_slow = now + SLOW_EVERY
                self._do(self._duties.refresh_orphans, self._duties.send_pending_webhooks)
            if self._retention_every is not None and now >= next_retention:
                next_retention = now + self._retention_every
                self._do(self._duties.remove_expired_jobs)
            if now >= next_partials:
                next_partials = now + PARTIALS_EVERY
                self._do(self._duties.remove_stale_partials)

    def _do(self, *duties: Callable[[], None]) -> None:
        for duty in duties:
            if self._stop.is_set():
                return
            try:
                duty()
            except Exception as exc:  # the database is away, say: try again next tick
                log.warning("jobs upkeep: %s failed: %s", duty.__name__, exc)


def remove_folders(output_dir: str, folders: list[str]) -> int:
    """Delete the output folders of removed jobs (DELETE_FILES_WITH_JOBS); how many."""
    removed = 0
    root = Path(output_dir)
    for name in folders:
        if not name or "/" in name or "\\" in name or name.startswith("."):  # a folder name, nothing else
            continue
        path = root / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
