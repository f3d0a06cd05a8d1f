"""The account limits shared on Redis (gateway/engine/shared_limits.py), on a real redis-server.

Every `RedisAccountLimits` here gets its own client (its own connections), as separate
gunicorn workers or replicas would.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import redis
from redis.crc import key_slot

from gateway.engine.limits import RateWindow
from gateway.engine.shared_limits import (
    DEFAULT_TIMEOUT,
    AdmissionTimeout,
    DeadlineTooSoon,
    LeaseKeeper,
    RedisAccountLimits,
    SharedLimitsUnavailable,
    connect,
)

from helpers import ROOT, wait_for
from redis_fixture import RedisServer

ACCOUNT = "5d41402abc4b2a76b9719d911017c592"  # what the gateway passes: a digest of the token
PREFIX = "gw-test"
PASSWORD = "s3cret-redis-pw-7781"
# Long enough that a waiter admitted in less time was woken, not re-checking on its own.
SLOW_POLL = {"wake_poll": 8.0, "heartbeat_seconds": 20.0}


@pytest.fixture
def account(request) -> str:
    """An account of this test's own, so a thread a failed test left behind cannot take
    another test's slots."""
    return hashlib.md5(request.node.nodeid.encode()).hexdigest()


@pytest.fixture
def make_limits(redis_url: str, account: str):
    clients: list[redis.Redis] = []

    def make(account: str = account, url: str | None = None, **options) -> RedisAccountLimits:
        client = connect(url or redis_url)
        clients.append(client)
        return RedisAccountLimits(client, account, PREFIX, **options)

    yield make
    for client in clients:
        client.close()


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


class Background(threading.Thread):
    """Runs `call` on a daemon thread and keeps its result or exception, so a thread a
    failed test leaves behind never raises into a later test."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.call, self.result, self.error = call, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as exc:  # noqa: BLE001 - kept for the test to assert on
            self.error = exc

    def outcome(self, timeout: float) -> object:
        self.join(timeout)
        assert not self.is_alive(), "a background call did not finish in time"
        if self.error is not None:
            raise self.error
        return self.result


def run_threads(target: Callable[[int], None], count: int, timeout: float = 30.0) -> None:
    threads = [Background(lambda i=i: target(i)) for i in range(count)]
    for thread in threads:
        thread.outcome(timeout)


# -- concurrency ----------------------------------------------------------------------------
def test_admits_exactly_the_limit_across_concurrent_workers(make_limits):
    workers = [make_limits(concurrent_limit=5) for _ in range(24)]
    barrier = threading.Barrier(len(workers))
    admitted: list[bool] = [False] * len(workers)

    def work(i: int) -> None:
        barrier.wait()
        try:
            workers[i].acquire(f"holder-{i}", None, 0)
            admitted[i] = True
        except AdmissionTimeout:
            pass

    run_threads(work, len(workers))
    assert sum(admitted) == 5
    assert workers[0].status()["slots_in_use"] == 5
    assert workers[0].status()["queued"] == 0


def test_never_more_holders_than_the_limit_while_slots_cycle(make_limits):
    workers = [make_limits(concurrent_limit=3) for _ in range(12)]
    lock = threading.Lock()
    holding = peak = done = 0

    def work(i: int) -> None:
        nonlocal holding, peak, done
        for round_ in range(3):
            holder = f"holder-{i}-{round_}"
            workers[i].acquire(holder, None, 30)
            with lock:
                holding += 1
                peak = max(peak, holding)
            time.sleep(0.02)
            with lock:
                holding -= 1
                done += 1
            workers[i].release(holder)

    run_threads(work, len(workers), timeout=60)
    assert done == 36
    assert peak == 3


def test_a_crashed_workers_leases_expire_and_their_slots_return(make_limits, redis_url, account):
    code = ("import sys, time; import gateway.engine.shared_limits as s\n"
            "limits = s.RedisAccountLimits(s.connect(sys.argv[1]), sys.argv[2], sys.argv[3],"
            " lease_seconds=1, concurrent_limit=2)\n"
            "limits.acquire('crashed-1', None, 5)\nlimits.acquire('crashed-2', None, 5)\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, redis_url, account, PREFIX], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
    finally:
        child.kill()  # the worker dies without releasing anything
        child.wait(10)
        child.stdout.close()
    survivor = make_limits(lease_seconds=1, concurrent_limit=2)
    with pytest.raises(AdmissionTimeout):
        survivor.acquire("new-0", None, 0)
    survivor.acquire("new-1", None, timeout=10)  # admitted once the dead leases lapse
    survivor.acquire("new-2", None, timeout=10)
    assert survivor.status()["slots_in_use"] == 2
    with pytest.raises(AdmissionTimeout):
        survivor.acquire("new-3", None, 0)
    assert survivor.renew("crashed-1") is False


def test_lease_keeper_keeps_leases_past_their_term_until_stopped(make_limits, redis_url, account):
    # A client without decode_responses: the module must read bytes replies too.
    raw = redis.Redis.from_url(redis_url, socket_timeout=2)
    kept = RedisAccountLimits(raw, account, PREFIX, lease_seconds=1, concurrent_limit=1)
    other = make_limits(lease_seconds=1, concurrent_limit=1)
    kept.acquire("kept", None, 0)
    lost: list[str] = []
    keeper = LeaseKeeper(lease_seconds=1, on_lost=lambda limits, holder: lost.append(holder))
    keeper.add(kept, "kept")
    keeper.add(kept, "never-acquired")
    keeper.start()
    try:
        time.sleep(2.5)  # more than twice the lease
        with pytest.raises(AdmissionTimeout):
            other.acquire("other", None, 0)
        assert lost == ["never-acquired"]
    finally:
        keeper.stop()
    assert not any(t.name == "lease-keeper" for t in threading.enumerate())
    other.acquire("other", None, timeout=10)  # no longer renewed: the lease lapses
    raw.close()


def test_release_wakes_a_waiter_at_once(make_limits):
    holder_side = make_limits(concurrent_limit=1, **SLOW_POLL)
    waiter_side = make_limits(concurrent_limit=1, **SLOW_POLL)
    holder_side.acquire("first", None, 0)
    admitted_at: list[float] = []
    waiter = Background(lambda: (waiter_side.acquire("second", None, 30), admitted_at.append(time.monotonic())))
    wait_for(lambda: holder_side.status()["queued"] == 1, seconds=10)
    released_at = time.monotonic()
    holder_side.release("first")
    waiter.outcome(30)
    # Without a wake-up the waiter would look again only after its 8 s poll.
    assert admitted_at and admitted_at[0] - released_at < 4.0
    assert holder_side.status() | {"paused_for": 0} == {
        "slots_in_use": 1, "queued": 0, "creates_in_window": 2, "concurrent_limit": 1,
        "requests_per_minute": 600, "effective_limit": 600, "paused_for": 0}


@pytest.mark.parametrize("freed_by", ["release", "lapse"])
def test_admission_is_first_come_first_served_across_instances(make_limits, freed_by):
    """Freed by a release, each slot goes through wake-ups alone (slow polls); freed by a
    lapsed lease, nobody is woken and every waiter polls: only the order in Redis keeps it
    fair then."""
    # Lapsing after 2 s, past the waiters' 1.2 s heartbeat: they keep their place only
    # by refreshing it.
    options = SLOW_POLL if freed_by == "release" else {"wake_poll": 0.3, "heartbeat_seconds": 1.2}
    a = make_limits(concurrent_limit=1, lease_seconds=2, **options)
    b = make_limits(concurrent_limit=1, lease_seconds=2, **options)
    a.acquire("blocker", None, 0)
    order: list[str] = []
    threads = []
    for i, name in enumerate(["w1", "w2", "w3", "w4", "w5"]):
        limits = (a, b)[i % 2]

        def wait_then_release(limits: RedisAccountLimits = limits, name: str = name) -> None:
            limits.acquire(name, None, 60)
            order.append(name)
            time.sleep(0.05)
            limits.release(name)

        threads.append(Background(wait_then_release))
        wait_for(lambda i=i: a.status()["queued"] == i + 1, seconds=10)
    if freed_by == "release":
        a.release("blocker")
    for thread in threads:
        thread.outcome(60)
    assert order == ["w1", "w2", "w3", "w4", "w5"]


def test_a_new_arrival_does_not_pass_a_waiter(make_limits):
    a = make_limits(concurrent_limit=1, lease_seconds=1, **SLOW_POLL)
    b = make_limits(concurrent_limit=1, lease_seconds=1, **SLOW_POLL)
    a.acquire("crashed", None, 0)  # never released: lapses after 1 s, with no wake-up
    waiter = Background(lambda: b.acquire("waiter", None, 30))
    wait_for(lambda: a.status()["queued"] == 1, seconds=10)
    time.sleep(1.3)  # the slot is free now, but the waiter sleeps in its (8 s) poll
    with pytest.raises(AdmissionTimeout):
        a.acquire("late-comer", None, 0)
    waiter.outcome(30)  # the late-comer's leaving woke it
    assert b.renew("waiter") is True
    assert a.status()["slots_in_use"] == 1


def test_refused_for_concurrency_books_no_create(make_limits):
    limits = make_limits(concurrent_limit=1)
    limits.acquire("holder", None, 0)
    for i in range(5):
        with pytest.raises(AdmissionTimeout):
            limits.acquire(f"refused-{i}", None, 0)
    with pytest.raises(AdmissionTimeout):
        limits.acquire("waited", None, 0.3)
    assert limits.in_window() == 1
    assert limits.status()["queued"] == 0


def test_admission_timeout_is_kept_and_leaves_no_ticket(make_limits):
    limits = make_limits(concurrent_limit=1)
    limits.acquire("holder", None, 0)
    began = time.monotonic()
    with pytest.raises(AdmissionTimeout):
        limits.acquire("waiter", None, 0.6)
    assert 0.6 <= time.monotonic() - began < 0.6 + 1.0
    assert limits.status()["queued"] == 0
    with pytest.raises(ValueError):
        limits.acquire("holder", None, 0)  # one lease per holder


# -- the creates window ---------------------------------------------------------------------
def test_window_bookings_never_exceed_the_limit(make_limits, redis_url):
    rpm, span = 4, 2.0 + 0.1
    workers = [make_limits(window=2, margin=0.1, requests_per_minute=rpm, concurrent_limit=100)
               for _ in range(12)]
    clock = redis.Redis.from_url(redis_url)
    barrier = threading.Barrier(len(workers))
    booked: list[tuple[float, float]] = []

    def work(i: int) -> None:
        barrier.wait()
        before = redis_now(clock)
        delay = workers[i].acquire(f"holder-{i}", None, 10)
        after = redis_now(clock)
        booked.append((before + delay, after + delay))
        workers[i].release(f"holder-{i}")

    run_threads(work, len(workers))
    starts = sorted(score for _, score in clock.zrange(workers[0].keys[1], 0, -1, withscores=True))
    clock.close()
    assert len(starts) == 12
    for i in range(len(starts) - rpm):  # any rpm+1 starts span at least one window
        assert starts[i + rpm] - starts[i] >= span - 1e-6
    for low, high in booked:  # each returned delay points at a booked start (Redis's clock)
        assert any(low - 1e-3 <= start <= high + 1e-3 for start in starts)
    assert starts[-1] - starts[0] <= 2 * span + 0.5  # and no later than the window requires


def test_deadline_too_soon_books_nothing(make_limits):
    limits = make_limits(window=2, requests_per_minute=1, concurrent_limit=5)
    assert limits.acquire("first", None, 0) == pytest.approx(0, abs=0.01)
    with pytest.raises(DeadlineTooSoon) as refused:
        limits.acquire("second", 0.5, 5)
    assert 2.0 < refused.value.earliest_delay <= 2.5
    assert limits.status()["slots_in_use"] == 1
    assert limits.status()["creates_in_window"] == 1
    assert limits.status()["queued"] == 0
    assert limits.reserve(latest_delay=0.5) is None
    assert limits.acquire("third", 5, 0) == pytest.approx(2.5, abs=0.1)


def test_window_rules_match_rate_window(make_limits):
    """Same operations, same answers as the in-process RateWindow (there at one instant),
    alternating between two instances to show the state is shared."""
    now = [1000.0]
    model = RateWindow(4, window=2, clock=lambda: now[0], margin=0.1)
    shared = [make_limits(window=2, margin=0.1, requests_per_minute=4, concurrent_limit=100)
              for _ in range(2)]
    steps = [("reserve", None), ("reserve", None), ("reserve", None), ("reserve", None),
             ("reserve", None), ("reserve", 1.0), ("throttled", None), ("reserve", None),
             ("throttled", 0.5), ("throttled", None), ("reserve", None), ("succeeded", None),
             ("reserve", None), ("reserve", 3.0), ("succeeded", None), ("succeeded", None),
             ("reserve", None), ("throttled", 9.0), ("reserve", None)]
    for i, (step, argument) in enumerate(steps):
        limits = shared[i % 2]
        if step == "reserve":
            expected, got = model.reserve(None if argument is None else now[0] + argument), limits.reserve(argument)
            assert (got is None) == (expected is None), (i, step)
            if expected is not None:
                assert got == pytest.approx(expected, abs=0.1), (i, step)
        elif step == "throttled":
            model.throttled(argument)
            limits.throttled(argument)
        else:
            model.succeeded()
            limits.succeeded()
        assert limits.status()["effective_limit"] == model.effective_limit, (i, step)
    assert shared[0].in_window() == model.in_window()


def test_throttled_pauses_every_instance_of_the_account(make_limits):
    a = make_limits()
    b = make_limits()
    elsewhere = make_limits(account="0cc175b9c0f1b6a831c399e269772661")
    a.throttled(1.5)
    assert 1.2 < b.acquire("h", None, 0) <= 1.5
    assert 1.0 < b.status()["paused_for"] <= 1.5
    assert elsewhere.acquire("h", None, 0) == pytest.approx(0, abs=0.01)  # other accounts run
    elsewhere.throttled(None)
    assert 0.7 < a.status()["paused_for"] and 0.5 < elsewhere.status()["paused_for"] <= 1.0


def test_configure_on_one_instance_changes_what_another_admits(make_limits):
    a = make_limits(concurrent_limit=5)
    b = make_limits(concurrent_limit=5, **SLOW_POLL)
    a.configure(concurrent_limit=1)
    b.acquire("h1", None, 0)
    with pytest.raises(AdmissionTimeout):
        b.acquire("h2", None, 0)
    waiters = []
    for i in range(2):
        waiters.append(Background(lambda i=i: b.acquire(f"w{i}", None, 30)))
        wait_for(lambda i=i: a.status()["queued"] == i + 1, seconds=10)
    a.configure(concurrent_limit=3)  # both waiters go at once, not at their 8 s poll
    for waiter in waiters:
        waiter.outcome(4.0)
    assert b.status()["slots_in_use"] == 3
    a.configure(requests_per_minute=3)
    assert b.reserve() > 50  # 3 creates booked in the last minute: the next waits a window
    assert b.status()["requests_per_minute"] == 3
    with pytest.raises(ValueError):
        a.configure(concurrent_limit=0)


def test_reads_are_paced_across_instances(make_limits):
    a = make_limits(reads_per_minute=600)  # one read every 0.1 s
    b = make_limits(reads_per_minute=600)
    delays = [a.pace_read(), b.pace_read(), a.pace_read(), b.pace_read()]
    for i, delay in enumerate(delays):
        assert delay == pytest.approx(0.1 * i, abs=0.05)


# -- keys and failure -----------------------------------------------------------------------
def test_keys_share_one_hash_slot_and_expire_when_unused(make_limits, redis_url, account):
    limits = make_limits(concurrent_limit=1)
    limits.acquire("h", None, 0)
    with pytest.raises(AdmissionTimeout):
        limits.acquire("w", None, 0.1)
    limits.throttled(None)
    limits.pace_read()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = client.keys("*")
    client_ttls = [client.pttl(key) for key in keys]
    client.close()
    assert keys and all(key.startswith(f"{PREFIX}:{{acct:{account}}}:") for key in keys)
    assert len({key_slot(key.encode()) for key in keys}) == 1
    assert all(ttl > 0 for ttl in client_ttls)
    for bad in ("r8_abcdefabcdefabcdef", "a{b}", ""):
        with pytest.raises(ValueError):
            make_limits(account=bad)


def test_redis_down_fails_closed_fast_and_admission_resumes(tmp_path):
    server = RedisServer(tmp_path, password=PASSWORD)
    server.start()
    client = connect(server.url)
    try:
        limits = RedisAccountLimits(client, ACCOUNT, PREFIX, concurrent_limit=2)
        limits.acquire("before", None, 0)
        os.kill(server.process.pid, signal.SIGSTOP)  # hung: only the socket timeout helps
        try:
            _assert_unavailable(limits.status, DEFAULT_TIMEOUT + 1.0)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert limits.status()["slots_in_use"] == 1
        server.stop()  # gone: connection refused
        for call in (lambda: limits.acquire("down", None, 30), lambda: limits.release("before"),
                     lambda: limits.renew("before"), lambda: limits.throttled(None),
                     limits.succeeded, lambda: limits.configure(concurrent_limit=3), limits.status):
            _assert_unavailable(call, 3.0)
        server.start()  # same port, empty
        assert limits.acquire("after", None, 0) == pytest.approx(0, abs=0.01)
        assert limits.status()["slots_in_use"] == 1
    finally:
        client.close()
        server.stop()


def _assert_unavailable(call: Callable[[], object], within: float) -> None:
    began = time.monotonic()
    with pytest.raises(SharedLimitsUnavailable) as failure:
        call()
    assert time.monotonic() - began < within
    message = str(failure.value)
    assert "Redis" in message
    assert PASSWORD not in message and PASSWORD not in str(failure.value.__cause__)


def test_importing_starts_no_thread():
    code = "import threading, gateway.engine.shared_limits; print(threading.active_count())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.stdout.strip() == "1", out.stderr
