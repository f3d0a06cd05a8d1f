"""Admission control for upstream work, one lane per Replicate account (token).

- `SlotPool`: how many predictions may be in flight; resizable without losing or inventing
  permits (in-flight holders keep theirs, admission uses the current limit).
- `RateWindow`: a sliding-window log of creates. A caller reserves a start time under the
  lock and sleeps *after* releasing it, so nobody waits behind a sleeper and the limit can
  never deadlock.
- `Pacer`: evenly spaced starts for the non-create calls (polls, cancels), so their total
  rate stays under the upstream's read budget however many predictions are in flight.
- `Lane` / `LaneManager`: a FIFO of queued jobs per token; a job gets a thread from the pool
  only once it holds a slot, so queued work costs no thread and the thread pool never limits
  concurrency below the configured slots. A job that ends hands its slot *and its thread* to
  the next queued job, whose create goes out at once; what the job left to do without a slot
  (download, files, journal) runs after that (`gateway.engine.turnover.CreatesFirst`).
- `AccountLane` / `CreateBudget` / `ReadBudget`: the small interface the pipeline and the
  service use, met by `Lane` here and by `gateway.engine.shared_lanes.SharedLane` (the same
  limits held in Redis for every worker and replica, REDIS_URL).

Every clock is injected (`clock=time.monotonic` by default) so tests are exact and instant.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from gateway.engine.turnover import CreatesFirst, Rest, run_logged

if TYPE_CHECKING:
    from gateway.engine.items import GenerationItem

log = logging.getLogger(__name__)
Clock = Callable[[], float]
# A queued piece of work, run holding a slot: called with a `release()` that frees the slot
# early; it may return the rest of its work, which needs no slot (see `Lane.submit`).
Job = Callable[[Callable[[], None]], Rest | None]

# Threads are created only as slots are taken and reused afterwards; this ceiling exists
# only so a runaway configuration cannot exhaust the process.
MAX_THREADS = 8192
# Lanes are kept for accounts seen lately; past this many, idle ones are dropped.
KEPT_IDLE_LANES = 256


class SlotPool:
    """A counting semaphore whose limit can change while permits are held."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_use = 0
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_acquire(self) -> bool:
        with self._lock:
            if self._in_use >= self._limit:
                return False
            self._in_use += 1
            return True

    def release(self) -> None:
        with self._lock:
            if self._in_use <= 0:
                raise RuntimeError("SlotPool released more often than acquired")
            self._in_use -= 1

    def set_limit(self, limit: int) -> None:
        """Lowering lets holders finish and admits nobody until in_use < limit."""
        with self._lock:
            self._limit = limit


class RateWindow:
    """At most `limit` starts in any `window` seconds (a sliding log of start times).

    `margin` is added to each window to absorb the difference between when a request
    leaves here and when the upstream counts it.
    """

    def __init__(self, limit: int, window: float = 60.0, clock: Clock = time.monotonic,
                 margin: float = 0.0) -> None:
        self._limit = limit
        self._window = window
        self._margin = margin
        self._clock = clock
        self._starts: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._effective = limit          # lowered while the upstream throttles
        self._refused: collections.deque[float] = collections.deque()  # when it said 429
        self._paused_until = float("-inf")

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def effective_limit(self) -> int:
        return self._effective

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self._limit = self._effective = limit

    def throttled(self, retry_after: float | None) -> None:
        """The upstream said 429: start nothing before `retry_after` (default 1 s) and, when
        it refused most of this window's attempts, take what it did not refuse as the rate it
        really allows (Replicate's low-credit mode: 6 a minute). A scattered 429 in a mostly
        accepted window only pauses: a lower rate would not help there."""
        with self._lock:
            now = self._clock()
            self._paused_until = max(self._paused_until, now + (retry_after if retry_after is not None else 1.0))
            span = self._window + self._margin
            self._refused.append(now)
            while self._refused and self._refused[0] <= now - span:
                self._refused.popleft()
            attempts = sum(1 for t in self._starts if now - span < t <= now)
            if len(self._refused) * 2 > attempts:
                self._effective = max(1, min(self._effective, attempts - len(self._refused)))

    def succeeded(self) -> None:
        """A create went through: recover the effective limit by about a tenth."""
        with self._lock:
            if self._effective < self._limit:
                self._effective = min(self._limit, self._effective + max(1, self._effective // 10))

    def reserve(self, latest: float | None = None) -> float | None:
        """Book the earliest allowed start and return the delay until it (0 = now).

        With `latest`, book nothing and return None when that start would come after it.
        Never sleeps, so the lock is held only for the arithmetic.
        """
        with self._lock:
            now = self._clock()
            span = self._window + self._margin
            while self._starts and self._starts[0] <= now - span:
                self._starts.popleft()
            start = max(now, self._paused_until, self._starts[-1] if self._starts else now)
            if len(self._starts) >= self._effective:
                start = max(start, self._starts[-self._effective] + span)
            if self._effective < self._limit and self._starts:
                # Adapted to a throttling upstream: spread the starts evenly, since such an
                # upstream allows no bursts (Replicate's low-credit mode: a burst of 1).
                start = max(start, self._starts[-1] + span / self._effective)
            if latest is not None and start > latest:
                return None
            self._starts.append(start)
            return start - now

    def in_window(self) -> int:
        """Starts booked in the current window (including ones booked for later)."""
        with self._lock:
            now = self._clock()
            return sum(1 for t in self._starts if t > now - self._window - self._margin)


class Pacer:
    """Evenly spaced starts: at most `per_window` in any `window` seconds, with no bursts."""

    def __init__(self, per_window: int, window: float = 60.0, clock: Clock = time.monotonic) -> None:
        self._interval = window / max(1, per_window)
        self._clock = clock
        self._next = float("-inf")
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Book the next free start; return the delay until it."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self._interval
            return start - now


class CreateBudget(Protocol):
    """An account's creates: `RateWindow` here, the Redis window in shared mode."""

    def reserve(self, latest: float | None = None) -> float | None: ...
    def throttled(self, retry_after: float | None) -> None: ...
    def succeeded(self) -> None: ...
    def in_window(self) -> int: ...


class ReadBudget(Protocol):
    """An account's other calls (polls, cancels, lists): `Pacer` here, shared in Redis mode."""

    def reserve(self) -> float: ...


class AccountLane(Protocol):
    """What the service and the pipeline use of an account's lane, in either mode."""

    creates: CreateBudget
    reads: ReadBudget

    def prediction(self) -> contextlib.AbstractContextManager[None]: ...
    def create_waits(self) -> None: ...
    def submit(self, job: Job, item: GenerationItem | None = None) -> None: ...


class Lane:
    """Queued jobs and limits of one upstream account."""

    def __init__(self, slots: SlotPool, creates: RateWindow, reads: Pacer,
                 executor: ThreadPoolExecutor, first: CreatesFirst | None = None) -> None:
        self.slots, self.creates, self.reads = slots, creates, reads
        self._executor = executor
        self._first = first or CreatesFirst(executor)
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._in_flight = 0  # predictions created upstream and not yet final
        self._owing = threading.local()  # this thread's job was handed a slot and sent no create yet

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def prediction(self) -> Iterator[None]:
        """Count one prediction in flight upstream for the body of the `with` (entered just
        before a create is sent, or a known prediction is picked up)."""
        with self._lock:
            self._in_flight += 1
        self._pay()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
            self._first.ended()

    def create_waits(self) -> None:
        """This thread's job waits for its turn in the rate window: it owes no create now."""
        self._pay()

    def _pay(self) -> None:
        if getattr(self._owing, "value", False):
            self._owing.value = False
            self._first.paid()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and self.slots.in_use == 0

    @property
    def forgettable(self) -> bool:
        """Nothing queued or running and no create in the window: dropping the lane loses
        nothing (a new one starts with a full budget, which is what the upstream has too)."""
        return self.idle and self._in_flight == 0 and self.creates.in_window() == 0

    def submit(self, job: Job, item: GenerationItem | None = None) -> None:
        """Queue `job`; it runs on a pool thread once a slot is free. The job receives a
        `release()` that frees its slot early (idempotent); the slot is freed at the end
        of the job in any case. A job may return the rest of its work, which needs no slot:
        it runs after the slot (and, if a job is queued, this thread) went to the next job,
        once the creates owed have gone out. `item` (what the job runs) is for the shared lane, which
        admits by the item's deadline; here every job simply waits its turn."""
        with self._lock:
            self._queue.append(job)
        self.pump()

    def pump(self) -> None:
        while True:
            with self._lock:
                if not self._queue or not self.slots.try_acquire():
                    return
                job = self._queue.popleft()
            self._first.owe()
            self._executor.submit(self._run, job)

    def _run(self, job: Job | None) -> None:
        while job is not None:
            job = self._run_one(job)

    def _run_one(self, job: Job) -> Job | None:
        """Run `job`; return the queued job its slot went to, to be run on this thread."""
        self._owing.value = True
        released = threading.Event()
        lock = threading.Lock()

        def release() -> None:
            with lock:
                if released.is_set():
                    return
                released.set()
            self.slots.release()
            self.pump()

        rest = None
        try:
            rest = job(release)
        except Exception:  # a job must never take its slot with it
            log.exception("generation job crashed")
        except BaseException:
            self._pay()
            release()
            raise
        self._pay()  # a job that ended without sending a create owes none
        with lock:
            early = released.is_set()
            released.set()
        following = None if early else self._hand_over()
        if rest is not None:
            if following is not None:
                self._first.later(rest)
            else:
                self._first.wait()
                run_logged(rest)
        return following

    def _hand_over(self) -> Job | None:
        """Free the finished job's slot; if a queued job may take it, return that job (it
        then holds the slot) so this thread runs it: no thread to start or wake before its
        create goes out."""
        with self._lock:
            self.slots.release()
            following = self._queue.popleft() if self._queue and self.slots.try_acquire() else None
        if following is not None:
            self._first.owe()
        return following


class LaneManager:
    """One lane per account key, sharing one elastic thread pool and one set of limits."""

    def __init__(self, concurrent_limit: int, requests_per_minute: int, reads_per_minute: int,
                 window: float = 60.0, clock: Clock = time.monotonic, margin: float = 0.5) -> None:
        self._limit = concurrent_limit
        self._rpm = requests_per_minute
        self._reads = reads_per_minute
        self._window, self._clock, self._margin = window, clock, margin
        self._lanes: dict[str, Lane] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="generation")
        # One for all lanes: the GIL and the cores are shared by every account's work.
        self._first = CreatesFirst(self._executor)

    def lane(self, key: str) -> Lane:
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                if len(self._lanes) >= KEPT_IDLE_LANES:
                    self._forget_idle_lanes()
                lane = Lane(SlotPool(self._limit),
                            RateWindow(self._rpm, self._window, self._clock, self._margin),
                            Pacer(self._reads, self._window, self._clock), self._executor, self._first)
                self._lanes[key] = lane
            return lane

    def _forget_idle_lanes(self) -> None:
        """Under the lock: drop lanes with nothing to remember, so made-up tokens cannot pile
        lanes up; what stays is bounded by the accounts active within one window."""
        for key in [key for key, lane in self._lanes.items() if lane.forgettable]:
            del self._lanes[key]

    def configure(self, concurrent_limit: int | None = None, requests_per_minute: int | None = None) -> None:
        with self._lock:
            if concurrent_limit is not None:
                self._limit = concurrent_limit
            if requests_per_minute is not None:
                self._rpm = requests_per_minute
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.slots.set_limit(self._limit)
            lane.creates.set_limit(self._rpm)
            lane.pump()  # a raised limit admits queued work at once

    def status(self) -> dict[str, int]:
        with self._lock:
            lanes = list(self._lanes.values())
        return {
            "concurrent_limit": self._limit,
            "requests_per_minute": self._rpm,
            "current_concurrent": sum(lane.in_flight for lane in lanes),
            "slots_in_use": sum(lane.slots.in_use for lane in lanes),
            "queued": sum(lane.queued for lane in lanes),
            "creates_in_window": sum(lane.creates.in_window() for lane in lanes),
            "active_accounts": sum(1 for lane in lanes if not lane.idle),
        }

    def readings(self) -> dict[str, dict[str, int]]:
        """Per account key, what the metrics gauges show (gateway/metrics.py)."""
        with self._lock:
            lanes = dict(self._lanes)
        return {key: {"in_flight": lane.in_flight, "queued": lane.queued, "slots_in_use": lane.slots.in_use,
                      "creates_in_window": lane.creates.in_window()} for key, lane in lanes.items()}

    def start(self) -> None:
        """Nothing runs in the background here (the shared manager's counterpart)."""

    def check_available(self) -> None:
        """In-process limits are always there (the shared manager raises if Redis is not)."""

    def shutdown(self) -> None:
        self._first.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
