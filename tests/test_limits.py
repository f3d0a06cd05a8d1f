"""The admission primitives, on an injected clock: exact and instant."""
from __future__ import annotations

import inspect
import threading
import time

import pytest

from concurrency_manager import Lane, LaneManager, Pacer, RateWindow, SlotPool
from gateway.engine.service import GenerationService
from replicate_emulator.control_client import max_in_window

from helpers import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_books_the_earliest_allowed_start():
    clock = FakeClock()
    window = RateWindow(3, 60, clock)
    assert [window.reserve() for _ in range(3)] == [0, 0, 0]
    assert window.reserve() == 60
    clock.now += 30
    assert window.reserve() == 30          # booked at +60 as well: two wait for the same window
    assert window.in_window() == 5


def test_window_never_holds_more_than_the_limit():
    clock = FakeClock()
    window = RateWindow(10, 60, clock, margin=0.01)  # the service uses window/120
    starts = []
    for step in range(200):
        clock.now += (step % 7) * 0.9
        starts.append(clock.now + window.reserve())
    assert max_in_window(starts, 60) == 10
    assert starts == sorted(starts)


def test_window_refuses_past_a_deadline_without_booking():
    clock = FakeClock()
    window = RateWindow(1, 60, clock)
    assert window.reserve() == 0
    assert window.reserve(latest=clock.now + 10) is None
    assert window.reserve() == 60          # the refused call booked nothing


def test_the_601st_request_does_not_deadlock():
    """At the limit a caller gets a delay back; nothing blocks or recurses (no self-deadlock)."""
    window = RateWindow(600, 60)
    for _ in range(600):
        assert window.reserve() == 0
    result = []
    worker = threading.Thread(target=lambda: result.append(window.reserve()))
    worker.start()
    worker.join(2)
    assert not worker.is_alive() and 59 < result[0] <= 60


def test_nobody_waits_behind_a_sleeper():
    """While one caller sleeps out its delay, others can still book (no sleeping under the lock)."""
    window = RateWindow(1, 60)
    window.reserve()
    release = threading.Event()

    def sleeper():
        delay = window.reserve()
        assert delay > 0
        release.wait(delay)  # sleeping here, as the pipeline does, holds no lock

    first = threading.Thread(target=sleeper)
    first.start()
    time.sleep(0.05)
    other = []
    second = threading.Thread(target=lambda: other.append(window.reserve()))
    second.start()
    second.join(1)
    release.set()
    first.join(1)
    assert other and other[0] > 60


def test_a_scattered_throttle_only_pauses():
    clock = FakeClock()
    window = RateWindow(100, 60, clock)
    for _ in range(11):
        window.reserve()
    window.throttled(5)                     # 1 refused of 11: the rate is not the problem
    assert window.effective_limit == 100 and window.reserve() == 5
    clock.now += 6
    window.throttled(None)                  # no Retry-After: one second
    assert window.reserve() == 1


def test_a_mostly_refused_window_adopts_the_accepted_rate_then_recovers():
    """Low-credit mode: the upstream accepts 6 a minute of the many sent."""
    clock = FakeClock()
    window = RateWindow(600, 60, clock)
    for _ in range(40):
        window.reserve()
    for _ in range(34):
        window.throttled(5)                 # 34 of 40 refused
    assert window.effective_limit == 6
    clock.now += 61
    assert [window.reserve() for _ in range(3)] == [0, 10, 20]  # spread: no bursts
    clock.now += 61
    for _ in range(30):
        window.succeeded()
    assert 6 < window.effective_limit < 600   # recovers gradually, about a tenth per create
    for _ in range(50):
        window.succeeded()
    assert window.effective_limit == 600
    window.set_limit(40)
    assert window.limit == window.effective_limit == 40


def test_pacer_spaces_calls_evenly():
    clock = FakeClock()
    pacer = Pacer(120, 60, clock)           # one every half second
    delays = [pacer.reserve() for _ in range(5)]
    assert delays == [0, 0.5, 1.0, 1.5, 2.0]
    starts = [clock.now + d for d in delays] + [clock.now + pacer.reserve() for _ in range(500)]
    assert max_in_window(starts, 60) <= 121


def test_slot_pool_resize_neither_loses_nor_invents_permits():
    """Holders keep their permits; admission follows the new limit (no permit lost or invented)."""
    pool = SlotPool(5)
    assert all(pool.try_acquire() for _ in range(5))
    pool.set_limit(2)
    assert not pool.try_acquire()
    for _ in range(4):
        pool.release()
    assert pool.in_use == 1 and pool.try_acquire() and not pool.try_acquire()
    pool.set_limit(4)
    assert pool.try_acquire() and pool.try_acquire() and not pool.try_acquire()
    for _ in range(4):
        pool.release()
    assert pool.in_use == 0
    with pytest.raises(RuntimeError):
        pool.release()


def _blocking_jobs(lane: Lane, count: int):
    started = [threading.Event() for _ in range(count)]
    finish = [threading.Event() for _ in range(count)]

    def job(index, release):
        started[index].set()
        finish[index].wait(5)
        if index == 0:
            raise RuntimeError("a crashing job must still free its slot")

    for index in range(count):
        lane.submit(lambda release, i=index: job(i, release))
    return started, finish


def test_lane_runs_at_most_the_limit_and_frees_slots():
    manager = LaneManager(2, 600, 3000)
    lane = manager.lane("account")
    started, finish = _blocking_jobs(lane, 5)
    assert started[0].wait(2) and started[1].wait(2)
    assert not started[2].wait(0.2) and lane.queued == 3 and lane.slots.in_use == 2
    finish[0].set()                          # crashes: its slot is freed anyway
    assert started[2].wait(2) and not started[3].wait(0.1)
    manager.configure(concurrent_limit=4)    # a raised limit admits queued work at once
    assert started[3].wait(2) and started[4].wait(2)
    for event in finish:
        event.set()
    wait_for(lambda: not lane.slots.in_use, seconds=5, step=0.01)
    assert lane.slots.in_use == 0
    manager.shutdown()


def test_early_release_frees_the_slot_before_the_job_ends():
    manager = LaneManager(1, 600, 3000)
    lane = manager.lane("account")
    second_started, hold = threading.Event(), threading.Event()

    def first(release):
        release()
        release()                            # idempotent
        hold.wait(5)

    lane.submit(first)
    lane.submit(lambda release: second_started.set())
    assert second_started.wait(2)
    hold.set()
    manager.shutdown()


def test_every_clock_is_monotonic_by_default():
    """Wall-clock time must not drive any window or deadline."""
    for target in (RateWindow, Pacer, LaneManager, GenerationService):
        assert inspect.signature(target).parameters["clock"].default is time.monotonic
