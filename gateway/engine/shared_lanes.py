"""Account lanes whose limits live in Redis (REDIS_URL), shared by every worker and replica.

`SharedLaneManager` / `SharedLane` meet the interface of `LaneManager` / `Lane`
(`gateway.engine.limits.AccountLane`), so the service and the pipeline run the same code in
both modes. The limits themselves are `RedisAccountLimits` (atomic Lua on Redis's clock);
this module runs queued work through them:

1. `submit` appends the item to this process's FIFO for the account;
2. the account's admitter thread (one per account and process, started on demand, gone once
   the queue has stayed empty a while) takes the head and calls `acquire_many`: in ticket
   order across every process it waits (woken by Redis, never busy-polling) for its turn,
   then as many head items as there are free slots get a lease and their create's start in
   the window, in one Lua step (a burst of freed slots costs one wake-up per process, not
   one per item; processes take turns, items keep their order within a process);
3. the job runs on a pool thread; the process's one `LeaseKeeper` renews its lease, and
   `release()` (once the prediction is final, or when the job ends) gives the slot back;
4. the pipeline's first `creates.reserve` returns the start booked at admission (handed
   over through a thread-local, so the pipeline need not know the mode); a retry books with
   `reserve`, polls and cancels are paced by `pace_read`, and a 429 pauses the account on
   every replica through `throttled`.

Failing closed: while Redis is unreachable nothing is admitted (leases already held run on);
synchronous requests are refused at once (`check_available`, 503 naming Redis); a retry's
booking waits for Redis (up to its deadline); polls fall back to this process's own pacer.
When Redis answers again, admission resumes after a pause of one lease-renewal round, in
which every running prediction whose lease lapsed (Redis came back empty, or was away
longer than LEASE_SECONDS) holds it again (`reclaim_many`), so the count stays the truth.

`/configure` writes the limits to one Redis hash (`<prefix>:limits`) that every process
reads each second: in force everywhere within about 2 s. Each process publishes its own
counts to `<prefix>:processes` each second, so `/status` can sum this replica's workers and
every replica.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import redis

from gateway.engine.limits import KEPT_IDLE_LANES, MAX_THREADS, Clock, Job, Pacer
from gateway.engine.shared_limits import (
    HEARTBEAT_SECONDS,
    AdmissionTimeout,
    LeaseKeeper,
    RedisAccountLimits,
    SharedLimitsUnavailable,
    connect,
    ping,
)
from gateway.engine.turnover import run_logged

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from gateway.engine.items import GenerationItem

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.5          # how often Redis is tried again while it is away
SYNC_SECONDS = 1.0           # limits set by /configure are read this often (in force within 2 s)
PRESENCE_TTL_SECONDS = 5.0   # a process not heard from for this long no longer counts in /status
IDLE_ADMITTER_SECONDS = 30.0  # an admitter whose queue stayed empty this long ends
ADMIT_BATCH = 64             # queued items of one process admitted together in its turn
PRESENCE_KEY_TTL_MS = 86400 * 1000

# The presence of each process: "<Redis time> <json counts>", stale entries dropped on read.
_PRESENCE_WRITE = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000) .. ' ' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
_PRESENCE_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local entries = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #entries, 2 do
  local at = tonumber(string.match(entries[i + 1], '^(%S+)'))
  if at and at >= now - tonumber(ARGV[1]) then
    live[#live + 1] = string.sub(entries[i + 1], string.len(string.match(entries[i + 1], '^(%S+)')) + 2)
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return live
"""

_current = threading.local()  # the admission of the job running on this thread


@dataclasses.dataclass
class _Admitted:
    lane: SharedLane
    item: GenerationItem | None
    start: float | None  # the create start booked at admission (clock time); None: refused
    used: bool = False


class SharedCreates:
    """`lane.creates` of a shared lane: the account's create window, on Redis."""

    def __init__(self, lane: SharedLane) -> None:
        self._lane = lane
        self._booked: collections.deque[float] = collections.deque()  # this process's, for /status
        self._lock = threading.Lock()

    def reserve(self, latest: float | None = None) -> float | None:
        """The delay until this create may start, or None (nothing booked) if that would
        be after `latest`. The first create of an admitted job was booked with its lease."""
        manager = self._lane.manager
        admitted = getattr(_current, "admitted", None)
        if admitted is not None and admitted.lane is self._lane and not admitted.used:
            admitted.used = True
            return None if admitted.start is None else max(0.0, admitted.start - manager.clock())
        item = admitted.item if admitted is not None else None
        while True:  # a retry: book it in Redis, waiting for Redis (fail closed) up to `latest`
            if item is not None and item.cancelled.is_set():
                return 0.0  # the pipeline's next pause sees the cancel and stops
            if not manager.wait_reachable(latest, item):
                if item is not None and item.cancelled.is_set():
                    continue
                return None  # the deadline came (or the service stops) while Redis was away
            try:
                delay = self._lane.limits.reserve(None if latest is None else latest - manager.clock())
            except SharedLimitsUnavailable as exc:
                manager.failed(exc)
                continue
            if delay is not None:
                self.note(manager.clock() + delay)
            return delay

    def note(self, start: float) -> None:
        with self._lock:
            self._booked.append(start)

    def throttled(self, retry_after: float | None) -> None:
        """A 429: every replica's creates of this account pause for `retry_after`."""
        self._lane.manager.attempt(lambda: self._lane.limits.throttled(retry_after))

    def succeeded(self) -> None:
        """A create went through: recover the adapted rate (a Redis call only while it is
        adapted, as the last admission said)."""
        if self._lane.limits.adapting:
            self._lane.manager.attempt(self._lane.limits.succeeded)

    def in_window(self) -> int:
        """Creates this process booked in the current window (the account's total is in Redis)."""
        manager = self._lane.manager
        with self._lock:
            horizon = manager.clock() - manager.window - manager.margin
            while self._booked and self._booked[0] <= horizon:
                self._booked.popleft()
            return len(self._booked)


class SharedReads:
    """`lane.reads` of a shared lane: polls and cancels paced for the account across every
    process; while Redis is away, by this process's own pacer (they are bounded by the
    predictions in flight, which nobody adds to meanwhile)."""

    def __init__(self, lane: SharedLane, fallback: Pacer) -> None:
        self._lane, self._fallback = lane, fallback

    def reserve(self) -> float:
        manager = self._lane.manager
        if manager.reachable:
            try:
                return self._lane.limits.pace_read()
            except SharedLimitsUnavailable as exc:
                manager.failed(exc)
        return self._fallback.reserve()


class SharedLane:
    """One account's queued work in this process, admitted through the account's limits on Redis."""

    def __init__(self, manager: SharedLaneManager, limits: RedisAccountLimits, fallback_reads: Pacer) -> None:
        self.manager, self.limits = manager, limits
        self.creates = SharedCreates(self)
        self.reads = SharedReads(self, fallback_reads)
        self._queue: collections.deque[tuple[Job, GenerationItem | None]] = collections.deque()
        self._cond = threading.Condition()
        self._admitter: threading.Thread | None = None
        self._holders: set[str] = set()       # the leases this process holds on the account
        self._holders_lock = threading.Lock()
        self._in_flight = 0

    # -- what /status shows ---------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def slots_in_use(self) -> int:
        return len(self._holders)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._holders

    @property
    def forgettable(self) -> bool:
        return self.idle and self._in_flight == 0 and self._admitter is None

    @contextlib.contextmanager
    def prediction(self) -> Iterator[None]:
        """Count one prediction in flight upstream (this process's own count)."""
        with self._cond:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1

    def create_waits(self) -> None:
        """Nothing to do: a create's start was booked at admission, in Redis."""

    # -- admission --------------------------------------------------------------------------
    def submit(self, job: Job, item: GenerationItem | None = None) -> None:
        """Queue `job`; it runs once the account (across every process) has a slot for it."""
        with self._cond:
            self._queue.append((job, item))
            if self._admitter is None:
                self._admitter = threading.Thread(target=self._admit_loop, daemon=True, name="admitter")
                self._admitter.start()
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _next(self) -> list[tuple[Job, GenerationItem | None]] | None:
        """The head of the queue (up to ADMIT_BATCH items), waiting for one; None when this
        admitter should end. Only this thread takes items off the queue, so the head stays
        the head until it does."""
        with self._cond:
            while not self._queue and not self.manager.stopping:
                if not self._cond.wait(IDLE_ADMITTER_SECONDS) and not self._queue:
                    break
            if self._queue and not self.manager.stopping:
                return list(itertools.islice(self._queue, ADMIT_BATCH))
            self._admitter = None
            return None

    def _admit_loop(self) -> None:
        while (head := self._next()) is not None:
            try:
                self._admit(head)
            except Exception:  # the admitter must outlive one bad round
                log.exception("admitting queued work failed")
                self.manager.stop_event.wait(RETRY_SECONDS)

    def _admit(self, head: list[tuple[Job, GenerationItem | None]]) -> None:
        """Admit the head of the queue, as many items as there are free slots in this
        process's turn (or learn why not yet)."""
        job, first = head[0]
        if first is not None and first.cancelled.is_set():
            self._launch(job, first, None, None)  # its job returns at once: nothing to admit
            return
        if not self.manager.wait_until_admitting():
            return
        head = list(itertools.takewhile(lambda entry: entry[1] is None or not entry[1].cancelled.is_set(), head))
        now = self.manager.clock()
        requests = [(self.manager.new_holder(), None if item is None else item.deadline - now,
                     item is None or item.prediction_id is None) for _, item in head]
        try:
            results = self.limits.acquire_many(requests, math.inf, keep_waiting=lambda: self._keep_waiting(first))
        except AdmissionTimeout:
            return  # canceled meanwhile (launched next round) or stopping
        except SharedLimitsUnavailable as exc:
            self.manager.failed(exc)  # nothing is admitted until Redis is back
            return
        now = self.manager.clock()
        for (job, item), (holder, _, books), result in zip(head, requests, results, strict=False):
            if isinstance(result, float):
                if books:
                    self.creates.note(now + result)
                self._launch(job, item, holder, now + result)
            else:  # DeadlineTooSoon: the pipeline answers with its timeout
                self._launch(job, item, None, None)

    def _keep_waiting(self, item: GenerationItem | None) -> bool:
        return not self.manager.stopping and not (item is not None and item.cancelled.is_set())

    def _launch(self, job: Job, item: GenerationItem | None, holder: str | None, start: float | None) -> None:
        with self._cond:
            self._queue.popleft()
        if holder is not None:
            with self._holders_lock:
                self._holders.add(holder)
            self.manager.keeper.add(self.limits, holder)
        self.manager.submit(self._run, job, item, holder, start)

    def _run(self, job: Job, item: GenerationItem | None, holder: str | None, start: float | None) -> None:
        lock, released = threading.Lock(), [False]

        def release() -> None:
            with lock:
                if released[0]:
                    return
                released[0] = True
            if holder is not None:
                self._release(holder)

        _current.admitted = _Admitted(self, item, start)
        rest = None
        try:
            rest = job(release)
        except Exception:  # a job must never take its lease with it
            log.exception("generation job crashed")
        finally:
            _current.admitted = None
            release()
        if rest is not None:  # what the job left to do without a slot (download, files)
            run_logged(rest)

    def _release(self, holder: str) -> None:
        with self._holders_lock:  # the keeper's reclaim looks at the same set
            self._holders.discard(holder)
        self.manager.keeper.discard(self.limits, holder)
        try:
            self.limits.release(holder)
        except SharedLimitsUnavailable as exc:
            self.manager.failed(exc)
            log.warning("could not release a lease; it lapses by itself within LEASE_SECONDS")

    def lease_lost(self, holder: str) -> None:
        """The keeper found a running prediction's lease lapsed: hold it again."""
        with self._holders_lock:
            if holder not in self._holders:
                return  # released meanwhile
            try:
                self.limits.reclaim_many([holder])
            except SharedLimitsUnavailable as exc:
                self.manager.failed(exc)
            self.manager.keeper.add(self.limits, holder)  # renewed (or reclaimed) next round
        log.warning("a running prediction's lease had lapsed (Redis away or restarted): held again")


class SharedLaneManager:
    """`LaneManager`'s interface, with every limit of an account held in Redis."""

    def __init__(self, url: str, prefix: str, lease_seconds: float, concurrent_limit: int,
                 requests_per_minute: int, reads_per_minute: int, window: float = 60.0,
                 clock: Clock = time.monotonic, margin: float = 0.5, home_account: str | None = None) -> None:
        self.client = connect(url)
        self.prefix, self.lease_seconds = prefix, lease_seconds
        self.window, self.margin, self.clock = window, margin, clock
        self._defaults = (concurrent_limit, requests_per_minute)
        self._limit, self._rpm = concurrent_limit, requests_per_minute
        self._reads = reads_per_minute
        self._config_key, self._presence_key = f"{prefix}:limits", f"{prefix}:processes"
        self._config_version: str | None = None
        self._config_read_at = -math.inf
        self._lanes: dict[str, SharedLane] = {}
        self._home = home_account  # the server token's account: in every worker's /status
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="generation")
        self.keeper = LeaseKeeper(lease_seconds, on_lost=self._lease_lost)
        self.stop_event = threading.Event()
        self._reachable = threading.Event()
        self._reachable.set()  # until a call says otherwise
        self._error: str | None = None
        self._settle_until = -math.inf
        self._nonce = uuid.uuid4().hex[:12]
        self._holder_ids = itertools.count()
        self._sync: threading.Thread | None = None
        self._presence_write = self.client.register_script(_PRESENCE_WRITE)
        self._presence_read = self.client.register_script(_PRESENCE_READ)

    # -- lanes ----------------------------------------------------------------------------
    def lane(self, key: str) -> SharedLane:
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                if len(self._lanes) >= KEPT_IDLE_LANES:
                    for old in [k for k, v in self._lanes.items() if v.forgettable]:
                        del self._lanes[old]
                # A dead process's queue ticket lapses no later than its leases, so the
                # others' queued work goes on within LEASE_SECONDS of a crash.
                limits = RedisAccountLimits(self.client, key, self.prefix, self.lease_seconds, self.window,
                                            self.margin, concurrent_limit=self._limit,
                                            requests_per_minute=self._rpm, reads_per_minute=self._reads,
                                            heartbeat_seconds=min(HEARTBEAT_SECONDS, self.lease_seconds))
                lane = SharedLane(self, limits, Pacer(self._reads, self.window, self.clock))
                self._lanes[key] = lane
            return lane

    def _all_lanes(self) -> list[SharedLane]:
        with self._lock:
            return list(self._lanes.values())

    def submit(self, run: Callable[..., None], *args: Any) -> None:
        self._executor.submit(run, *args)

    def new_holder(self) -> str:
        """A lease holder id, unique across processes and replicas (never a secret)."""
        return f"{socket.gethostname()}:{os.getpid()}:{self._nonce}:{next(self._holder_ids)}"

    def _lease_lost(self, limits: RedisAccountLimits, holder: str) -> None:
        for lane in self._all_lanes():
            if lane.limits is limits:
                lane.lease_lost(holder)

    # -- Redis's health: fail closed, resume by itself ------------------------------------
    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    @property
    def reachable(self) -> bool:
        return self._reachable.is_set()

    def failed(self, exc: Exception) -> None:
        """A Redis call failed: admit nothing until it answers again (the sync thread tries)."""
        if self._reachable.is_set():
            log.warning("%s: admitting nothing new until it answers", exc)
        self._error = str(exc)
        self._reachable.clear()

    def _answered(self) -> None:
        """Redis answered. After an outage, admission waits one renewal round, in which every
        process reclaims the leases of its running predictions that lapsed meanwhile."""
        if self._reachable.is_set():
            return
        self._settle_until = self.clock() + self.keeper.interval + RETRY_SECONDS
        self._error = None
        self._reachable.set()
        log.warning("Redis answers again: admission resumes in %.1f s", self.keeper.interval + RETRY_SECONDS)
        self.keeper.renew_now()

    def attempt(self, call: Callable[[], object]) -> None:
        """A call whose failure only needs noting (the pipeline goes on without it)."""
        if not self.reachable:
            return
        try:
            call()
        except SharedLimitsUnavailable as exc:
            self.failed(exc)

    def _probe_after(self, seconds: float) -> None:
        """Wait, then try Redis again (a successful read marks it reachable)."""
        self.stop_event.wait(seconds)
        if not self.stopping:
            self.refresh(0)

    def wait_reachable(self, latest: float | None, item: GenerationItem | None = None) -> bool:
        """Wait until Redis answers (True), or until `latest` (clock), a stop or the item's
        cancel (False)."""
        while not self.stopping and not (item is not None and item.cancelled.is_set()):
            if self._reachable.is_set():
                return True
            if latest is not None and self.clock() >= latest:
                return False
            self._probe_after(RETRY_SECONDS if latest is None else
                              max(0.01, min(RETRY_SECONDS, latest - self.clock())))
        return False

    def wait_until_admitting(self) -> bool:
        """Wait until Redis answers and any pause after an outage is over (False: stopping)."""
        while not self.stopping:
            if not self._reachable.is_set():
                self._probe_after(RETRY_SECONDS)
                continue
            remaining = self._settle_until - self.clock()
            if remaining <= 0:
                return True
            self.stop_event.wait(remaining)
        return False

    def check_available(self) -> None:
        """Raise SharedLimitsUnavailable unless Redis answers now (within its socket timeout)."""
        try:
            ping(self.client)
        except SharedLimitsUnavailable as exc:
            self.failed(exc)
            raise
        self._answered()

    # -- limits set at run time -------------------------------------------------------------
    def configure(self, concurrent_limit: int | None = None, requests_per_minute: int | None = None) -> None:
        """Store new limits in Redis, for every process: this one at once, the others at
        their next read (within SYNC_SECONDS). Raises SharedLimitsUnavailable."""
        changes = {name: value for name, value in (("concurrent_limit", concurrent_limit),
                                                   ("requests_per_minute", requests_per_minute))
                   if value is not None}
        try:
            pipe = self.client.pipeline(transaction=True)
            if changes:
                pipe.hset(self._config_key, mapping=changes)
            pipe.hincrby(self._config_key, "version", 1)
            pipe.hgetall(self._config_key)
            stored = pipe.execute()[-1]
        except redis.exceptions.RedisError as exc:
            error = SharedLimitsUnavailable(f"Redis is unavailable for the shared account limits "
                                            f"(configure: {type(exc).__name__})")
            self.failed(error)
            raise error from exc
        self._apply(stored)

    def refresh(self, max_age: float = SYNC_SECONDS) -> None:
        """Read the limits /configure stored, if the last read is older than `max_age`."""
        if self.clock() - self._config_read_at < max_age:
            return
        try:
            stored = self.client.hgetall(self._config_key)
        except redis.exceptions.RedisError as exc:
            self.failed(SharedLimitsUnavailable(f"Redis is unavailable for the shared account limits "
                                                f"(limits: {type(exc).__name__})"))
            log.debug("reading the shared limits failed: %s", type(exc).__name__)
            return
        self._answered()
        if stored.get("version") != self._config_version:
            self._apply(stored)
        self._config_read_at = self.clock()

    def _apply(self, stored: dict[str, str]) -> None:
        limit = int(stored.get("concurrent_limit", self._defaults[0]))
        rpm = int(stored.get("requests_per_minute", self._defaults[1]))
        rate_changed = rpm != self._rpm
        with self._lock:
            self._limit, self._rpm = limit, rpm
            self._config_version = stored.get("version")
            self._config_read_at = self.clock()
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.limits.set_defaults(limit, rpm)
            self.attempt(lambda lane=lane: lane.limits.defaults_changed(rate_changed))
            lane.wake()

    # -- background work and status ---------------------------------------------------------
    def start(self) -> None:
        """Start the lease keeper and the sync thread (limits and presence, each second)."""
        if self._sync is not None:
            return
        self.keeper.start()
        self._sync = threading.Thread(target=self._sync_loop, daemon=True, name="shared-limits-sync")
        self._sync.start()

    def _sync_loop(self) -> None:
        while not self.stop_event.wait(SYNC_SECONDS if self.reachable else RETRY_SECONDS):
            try:
                self.refresh(0)
                if self.reachable:
                    self._publish()
            except Exception:  # the sync must outlive one bad round
                log.exception("shared limits sync round failed")

    def _process_id(self) -> str:
        return f"{self._replica_id()}:{os.getpid()}"

    @staticmethod
    def _replica_id() -> str:
        """A gunicorn instance: its host and master process (the workers' parent)."""
        return f"{socket.gethostname()}:{os.getppid()}"

    def _local(self) -> dict[str, int]:
        lanes = self._all_lanes()
        return {"current_concurrent": sum(lane.in_flight for lane in lanes),
                "slots_in_use": sum(lane.slots_in_use for lane in lanes),
                "queued": sum(lane.queued for lane in lanes),
                "creates_in_window": sum(lane.creates.in_window() for lane in lanes),
                "active_accounts": sum(1 for lane in lanes if not lane.idle)}

    def _publish(self) -> None:
        counts = {"replica": self._replica_id(), **self._local()}
        try:
            self._presence_write(keys=[self._presence_key],
                                 args=[self._process_id(), json.dumps(counts), PRESENCE_KEY_TTL_MS])
        except redis.exceptions.RedisError as exc:
            self.failed(SharedLimitsUnavailable(f"Redis is unavailable for the shared account limits "
                                                f"(presence: {type(exc).__name__})"))

    def _processes(self) -> list[dict[str, Any]]:
        return [json.loads(entry) for entry in
                self._presence_read(keys=[self._presence_key], args=[PRESENCE_TTL_SECONDS])]

    def readings(self) -> dict[str, dict[str, int]]:
        """Per account key, this process's counts for the metrics gauges (summed over the
        workers by the scrape; no Redis call)."""
        with self._lock:
            lanes = dict(self._lanes)
        return {key: {"in_flight": lane.in_flight, "queued": lane.queued, "slots_in_use": lane.slots_in_use,
                      "creates_in_window": lane.creates.in_window()} for key, lane in lanes.items()}

    def _reported_lanes(self) -> list[SharedLane]:
        """The server token's account, and every other account this process serves now."""
        home = self.lane(self._home) if self._home else None
        return ([home] if home else []) + [lane for lane in self._all_lanes() if lane is not home and
                                           (not lane.idle or lane.creates.in_window())]

    def status(self) -> dict[str, Any]:
        """This process's counts under the usual keys, the limits in force, and under
        `shared`: Redis's state, this replica's and every replica's totals."""
        local = self._local()
        shared: dict[str, Any] = {"backend": "redis", "lease_seconds": self.lease_seconds}
        try:
            self.refresh()
            processes = self._processes()
            accounts = [lane.limits.status() for lane in self._reported_lanes()]
        except (SharedLimitsUnavailable, redis.exceptions.RedisError) as exc:
            if isinstance(exc, redis.exceptions.RedisError):
                exc = SharedLimitsUnavailable(f"Redis is unavailable for the shared account limits "
                                              f"(status: {type(exc).__name__})")
            self.failed(exc)
            shared.update(redis="unreachable", error=self._error)
        else:
            self._answered()
            replica = self._replica_id()
            mine = [p for p in processes if p.get("replica") == replica]
            shared.update(redis="reachable", this_replica=_totals(mine),
                          all_replicas={"replicas": len({p.get("replica") for p in processes}), **_totals(processes)},
                          # Exact, from Redis: every replica's leases, waiters and creates on the
                          # server token's account and the accounts this process serves now.
                          accounts={"slots_in_use": sum(a["slots_in_use"] for a in accounts),
                                    "waiting_processes": sum(a["queued"] for a in accounts),
                                    "creates_in_window": sum(a["creates_in_window"] for a in accounts),
                                    "paused_for": max((a["paused_for"] for a in accounts), default=0.0)})
        return {"concurrent_limit": self._limit, "requests_per_minute": self._rpm, **local, "shared": shared}

    def shutdown(self) -> None:
        self.stop_event.set()
        for lane in self._all_lanes():
            lane.wake()
        self.keeper.stop()
        if self._sync is not None:
            self._sync.join(5)
        with contextlib.suppress(redis.exceptions.RedisError):
            self.client.hdel(self._presence_key, self._process_id())
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _totals(processes: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("current_concurrent", "slots_in_use", "queued", "creates_in_window")
    return {"processes": len(processes), **{k: sum(int(p.get(k, 0)) for p in processes) for k in keys}}
