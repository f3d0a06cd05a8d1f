"""The turnover of a wave: freed slots' creates go out before finished jobs' leftovers.

When a wave of predictions ends, each freed slot goes at once to a queued job (on the very
thread that freed it: see `Lane`), but each finished job still has a download, files and
journal writes to do. Run at the same time, that work and the next wave's creates contend
for the GIL and the cores (and, for a local upstream, its event loop), and every
millisecond a create waits is added to the whole batch. `CreatesFirst` orders them:

- a job handed a slot *owes* a create until it sends it, waits for its turn in the rate
  window, or ends;
- work left by a job whose thread went on to a queued job (`later`) starts once no create
  is owed and no prediction has ended for `quiet` seconds (the wave of endings is over),
  and at most `patience` seconds after it was left, so it is never starved;
- work left when nothing is queued runs on its own thread, after `wait` (the creates owed,
  at most `patience` seconds).

Leftover work is handed to the pool by one dispatcher thread: starting a pool thread blocks
until the new thread runs (milliseconds under a busy GIL), which must not delay a create.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)
Clock = Callable[[], float]
# What a job leaves to do once its slot is freed (download, files, journal).
Rest = Callable[[], None]

PATIENCE_SECONDS = 0.5
QUIET_SECONDS = 0.03


class CreatesFirst:
    def __init__(self, executor: ThreadPoolExecutor, patience: float = PATIENCE_SECONDS,
                 quiet: float = QUIET_SECONDS, clock: Clock = time.monotonic) -> None:
        self._executor, self._patience, self._quiet, self._clock = executor, patience, quiet, clock
        self._owed = 0
        self._last_end = float("-inf")
        self._later: list[Rest] = []
        # Two conditions on one lock: a create paid wakes only those waiting for the creates
        # owed (not the idle dispatcher: a thread switch on every create's way out).
        self._lock = threading.Lock()
        self._all_paid = threading.Condition(self._lock)
        self._work_left = threading.Condition(self._lock)
        self._dispatcher: threading.Thread | None = None
        self._closed = False

    def owe(self) -> None:
        """A job was handed a slot: its create is owed."""
        with self._lock:
            self._owed += 1
            if self._dispatcher is None and not self._closed:  # with the first job, not on a turnover
                self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name="generation-rest")
                self._dispatcher.start()

    def paid(self) -> None:
        """The create owed went out (or the job waits in the rate window, or ended)."""
        with self._lock:
            self._owed -= 1
            if self._owed <= 0:
                self._all_paid.notify_all()

    def ended(self) -> None:
        """A prediction ended. A plain store, no lock: this is on the way to the next create."""
        self._last_end = self._clock()

    def wait(self) -> None:
        """Block until no create is owed, or `patience` has passed."""
        with self._lock:
            self._all_paid.wait_for(lambda: self._owed <= 0 or self._closed, self._patience)

    def later(self, rest: Rest) -> None:
        """Hand `rest` to the pool once the creates have gone out; returns at once. After
        `close`, runs it here."""
        with self._lock:
            if not self._closed:
                self._later.append(rest)
                self._work_left.notify()
                return
        run_logged(rest)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._all_paid.notify_all()
            self._work_left.notify_all()

    def _dispatch(self) -> None:
        closed = False
        while not closed:
            with self._lock:
                self._work_left.wait_for(lambda: self._later or self._closed)
                self._settle(self._clock() + self._patience)
                batch, self._later, closed = self._later, [], self._closed
            for rest in batch:
                try:
                    self._executor.submit(run_logged, rest)
                except RuntimeError:  # the pool is shut down: finish it here
                    run_logged(rest)

    def _settle(self, deadline: float) -> None:
        """Wait (holding the lock) until no create is owed and the endings have paused."""
        while not self._closed:
            now = self._clock()
            if now >= deadline:
                return
            if self._owed > 0:
                self._all_paid.wait(deadline - now)
                continue
            pause_left = self._last_end + self._quiet - now
            if pause_left <= 0:
                return
            self._all_paid.wait(min(pause_left, deadline - now))


def run_logged(rest: Rest) -> None:
    """Run leftover work; a crash is logged, never lost silently nor raised into a pool."""
    try:
        rest()
    except Exception:
        log.exception("generation job crashed after its slot was freed")
