"""The admission primitives, on an injected clock: exact and instant."""
from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from concurrency_manager import Lane, LaneManager, Pacer, RateWindow, SlotPool
from gateway.engine.service import GenerationService
from gateway.engine.turnover import CreatesFirst
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


def _lane(patience: float = 30.0) -> tuple[Lane, ThreadPoolExecutor]:
    """A lane of one slot whose leftover work waits up to `patience` for owed creates."""
    executor = ThreadPoolExecutor(8)
    return Lane(SlotPool(1), RateWindow(600), Pacer(3000), executor, CreatesFirst(executor, patience)), executor


def test_an_ending_job_hands_its_thread_to_the_next_and_its_rest_runs_after():
    """The next queued job's create must not wait for a thread to start, nor behind the
    download the finished job still has to do (the rest it returns)."""
    lane, executor = _lane()
    threads, order, queued, rest_ran = [], [], threading.Event(), threading.Event()

    def rest():
        order.append("rest")
        rest_ran.set()

    def first(release):
        threads.append(threading.get_ident())
        queued.wait(5)                       # ends once `second` waits for its slot
        return rest

    def second(release):
        threads.append(threading.get_ident())
        with lane.prediction():              # its create goes out: the rest may run now
            order.append("second")

    lane.submit(first)
    lane.submit(second)
    queued.set()
    assert rest_ran.wait(5)
    assert threads[0] == threads[1] and order == ["second", "rest"]
    executor.shutdown()


def test_leftover_work_waits_for_the_creates_owed_to_freed_slots():
    lane, executor = _lane(patience=30)
    queued, send, second_waits, rest_ran = (threading.Event() for _ in range(4))

    def first(release):
        queued.wait(5)                       # ends once `second` waits for its slot
        return rest_ran.set                  # its rest

    def second(release):
        second_waits.set()
        send.wait(5)                         # the create is not sent yet: it is owed
        with lane.prediction():
            pass

    lane.submit(first)
    lane.submit(second)
    queued.set()
    assert second_waits.wait(5)
    assert not rest_ran.is_set()             # held back while the create is owed (30 s patience)
    send.set()
    assert rest_ran.wait(5)
    executor.shutdown()


def test_a_job_waiting_in_the_rate_window_owes_no_create():
    lane, executor = _lane(patience=30)
    queued, waiting, rest_ran, done = (threading.Event() for _ in range(4))

    def first(release):
        queued.wait(5)
        return rest_ran.set

    def second(release):
        lane.create_waits()                  # its turn in the window is later: nothing owed now
        waiting.set()
        done.wait(5)

    lane.submit(first)
    lane.submit(second)
    queued.set()
    assert rest_ran.wait(5)                  # long before the 30 s patience
    done.set()
    executor.shutdown()


def test_leftover_work_is_never_starved_past_its_patience():
    lane, executor = _lane(patience=0.05)
    queued, rest_ran, done = threading.Event(), threading.Event(), threading.Event()

    def first(release):
        queued.wait(5)
        return rest_ran.set

    def second(release):                     # owes its create and never sends it
        done.wait(10)

    lane.submit(first)
    lane.submit(second)
    queued.set()
    assert rest_ran.wait(5)
    done.set()
    executor.shutdown()


def test_the_last_job_runs_its_rest_on_its_own_thread_and_a_crash_is_logged(caplog):
    lane, executor = _lane()
    ran_on, crashed = [], threading.Event()

    def rest():
        ran_on.append(threading.get_ident())
        crashed.set()
        raise RuntimeError("download broke")

    def job(release):
        ran_on.append(threading.get_ident())
        return rest

    lane.submit(job)
    assert crashed.wait(5)
    wait_for(lambda: "crashed after its slot was freed" in caplog.text)
    assert ran_on[0] == ran_on[1] and lane.slots.in_use == 0
    executor.shutdown()


def test_work_left_after_shutdown_still_runs():
    executor = ThreadPoolExecutor(2)
    first = CreatesFirst(executor)
    first.close()
    ran = []
    first.later(lambda: ran.append(True))
    assert ran == [True]
    executor.shutdown()


def test_every_clock_is_monotonic_by_default():
    """Wall-clock time must not drive any window or deadline."""
    for target in (RateWindow, Pacer, LaneManager, GenerationService):
        assert inspect.signature(target).parameters["clock"].default is time.monotonic
