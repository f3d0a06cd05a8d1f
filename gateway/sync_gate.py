"""A bound on synchronous generation requests, so the control plane always has a thread."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from gateway.errors import ServiceError

RETRY_AFTER_SECONDS = 5


class SyncRequestGate:
    """At most `limit` synchronous generation requests at once (MAX_SYNC_REQUESTS).

    Each one holds a request thread for up to its timeout; without this bound a flood of
    them took every gunicorn thread, and /health, /status and /configure waited behind them.
    Past the bound a request is refused at once (503 with Retry-After) rather than queued.
    """

    def __init__(self, limit: int, admission_check: Callable[[], None] | None = None) -> None:
        self.limit = limit
        # Raises ServiceError when no new work could start now (shared limits' Redis away):
        # a synchronous caller is answered at once instead of waiting out its timeout.
        self._admission_check = admission_check
        self._held = 0
        self._lock = threading.Lock()

    @property
    def in_progress(self) -> int:
        return self._held

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold one place for the body of the `with`; ServiceError 503 if none is free (or
        the admission check refuses)."""
        if self._admission_check is not None:
            self._admission_check()
        with self._lock:
            if self._held >= self.limit:
                raise ServiceError(503, f"Too many synchronous requests in progress ({self.limit}, "
                                   "MAX_SYNC_REQUESTS); submit a job with POST /jobs or retry later",
                                   headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
