"""The shared mode (REDIS_URL): one account's limits held exactly across gunicorn workers and
instances, proven with real processes: gunicorn instances of three workers each, a real
redis-server and the emulator, which sees every create and counts what is in flight.

Windows are shortened on both sides (REPLICATE_RATE_WINDOW_SECONDS, emulator `window_s`)
and the lease too (LEASE_SECONDS=2), so a crash's slots come back in seconds.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests

from gateway.config import ConfigError, Settings
from gateway.engine.items import GenerationItem
from gateway.engine.shared_lanes import SharedLaneManager
from gateway.engine.shared_limits import AdmissionTimeout, RedisAccountLimits, connect
from replicate_emulator.control_client import max_in_window

from helpers import (
    ADMIN,
    GUNICORN,
    SERVER_TOKEN,
    children,
    free_port,
    service_env,
    start,
    stop,
    wait_for,
    wait_healthy,
)
from redis_fixture import RedisServer

LEASE = 2.0
PASSWORD = "redis-pw-never-shown-5521"
SHARED = {"LEASE_SECONDS": str(LEASE), "REPLICATE_RATE_WINDOW_SECONDS": "2", "LOG_LEVEL": "warning"}


class Instance:
    """One gunicorn instance (a master and its workers) of the gateway."""

    def __init__(self, name: str, proc, url: str) -> None:
        self.name, self.proc, self.url = name, proc, url
        self.output = ""

    def post(self, path: str, body: Any, headers: dict | None = None, timeout: float = 120) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=headers or ADMIN, timeout=timeout)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def batch(self, prompts: list[str]) -> dict:
        response = self.post("/generate-batch", {"model_name": "flux-dev", "prompts": prompts})
        assert response.status_code == 200, response.text
        return response.json()

    def shared(self) -> dict:
        return self.get("/status").json()["concurrency_status"]["shared"]

    def kill(self) -> None:
        """A crash: every process of the instance dies at once, releasing nothing."""
        for pid in children(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.output = self.proc.communicate(timeout=20)[0]


@pytest.fixture
def instances(emulator_server, tmp_path) -> Iterator[Callable[..., list[Instance]]]:
    """`instances(redis_url, count=2, **env)`: gunicorn instances of three workers each (the
    first sized by `-w 3`, the others by GUNICORN_WORKERS=3), started together."""
    started: list[Instance] = []

    def make(redis_url: str, count: int = 2, **env: str) -> list[Instance]:
        batch = []
        for index in range(count):
            name, port = "ab"[index], free_port()
            (tmp_path / name).mkdir()
            workers = ["-w", "3"] if index == 0 else []
            settings = service_env(emulator_server, tmp_path / name, port, REDIS_URL=redis_url,
                                   GUNICORN_WORKERS="3", **SHARED, **env)
            proc = start([sys.executable, *GUNICORN, *workers], settings, tmp_path)
            batch.append(Instance(name, proc, f"http://127.0.0.1:{port}"))
        started.extend(batch)
        for instance in batch:
            wait_healthy(instance.url, instance.proc)
        return batch

    yield make
    for instance in started:
        if instance.proc.poll() is None:
            instance.output = stop(instance.proc)


def prompts(tag: str, count: int) -> list[str]:
    return [f"{tag} {i}" for i in range(count)]


def run_together(*calls: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


# -- concurrency --------------------------------------------------------------------------
def test_two_instances_of_three_workers_hold_the_concurrency_limit_exactly(instances, redis_url, emu):
    emu.set_faults(latency="uniform", latency_min_s=0.2, latency_max_s=0.6)
    a, b = instances(redis_url, REPLICATE_CONCURRENT_LIMIT="10")
    wait_for(lambda: len(children(a.proc.pid)) == 3 and len(children(b.proc.pid)) == 3, seconds=20)
    peaks: list[int] = []

    def watch() -> None:  # what /status says while the batches run: never more than the limit
        while len(emu.predictions()) < 100:
            peaks.append(a.shared()["accounts"]["slots_in_use"])
            time.sleep(0.1)

    results = run_together(*[lambda i=i, side=side: side.batch(prompts(f"{side.name}{i}", 25))
                             for side in (a, b) for i in range(2)], watch)
    assert [r["successful_count"] for r in results[:4]] == [25, 25, 25, 25]
    assert emu.stats()["max_in_flight_by_token"][SERVER_TOKEN] == 10
    assert peaks and max(peaks) <= 10
    # Totals across replicas and this replica's own: every worker reports in, nothing stays held.
    shared = wait_for(lambda: (s := a.shared())["all_replicas"]["processes"] == 6 and s, seconds=10)
    assert shared["redis"] == "reachable" and shared["all_replicas"]["replicas"] == 2
    assert shared["this_replica"]["processes"] == 3
    wait_for(lambda: a.shared()["accounts"]["slots_in_use"] == 0, seconds=10)


def test_more_than_one_worker_needs_redis(emulator_server, tmp_path):
    port = free_port()
    proc = start([sys.executable, *GUNICORN], service_env(emulator_server, tmp_path, port, GUNICORN_WORKERS="2"),
                 tmp_path)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "Refusing to start with 2 workers" in out and "REDIS_URL" in out


def test_redis_settings_are_checked_and_the_url_never_echoed():
    with pytest.raises(ConfigError, match="REDIS_URL") as info:
        Settings.from_mapping({"REDIS_URL": f"http://user:{PASSWORD}@localhost"})
    assert PASSWORD not in str(info.value)
    for variable, value in (("REDIS_PREFIX", "a{b}"), ("LEASE_SECONDS", "0"), ("GUNICORN_WORKERS", "0")):
        with pytest.raises(ConfigError, match=variable):
            Settings.from_mapping({variable: value})
    settings = Settings.from_mapping({"REDIS_URL": f"rediss://:{PASSWORD}@redis.internal:6380/1"})
    assert settings.redis_url.startswith("rediss://") and PASSWORD not in repr(settings)


# -- the create window ----------------------------------------------------------------------
def test_no_window_at_the_upstream_holds_more_than_the_shared_rate(instances, redis_url, emu):
    emu.set_faults(latency_s=0.1, window_s=2, create_limit=20)
    a, b = instances(redis_url, REPLICATE_REQUESTS_PER_MINUTE="20", REPLICATE_CONCURRENT_LIMIT="100")
    results = run_together(*[lambda i=i, side=side: side.batch(prompts(f"{side.name}{i}", 15))
                             for side in (a, b) for i in range(2)])
    assert [r["successful_count"] for r in results] == [15, 15, 15, 15]
    stats = emu.stats()
    attempts = stats["attempt_times"][SERVER_TOKEN]
    assert len(attempts) == 60  # no create was refused and tried again
    assert max_in_window(attempts, 2.0) <= 20
    assert stats["by_token"][SERVER_TOKEN].get("throttled", 0) == 0


# -- a crash --------------------------------------------------------------------------------
def test_a_killed_instance_gives_its_slots_back_within_the_lease(instances, redis_url, emu):
    # Predictions end upstream before their leases lapse, so the emulator's in-flight count
    # stays exact across the crash too.
    emu.set_faults(latency_s=1.0)
    a, b = instances(redis_url, REPLICATE_CONCURRENT_LIMIT="6")
    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(a.post, "/generate-batch", {"model_name": "flux-dev", "prompts": prompts("a", 30)},
                             timeout=60)
        wait_for(lambda: emu.stats()["in_flight"] == 6, seconds=10)
        survivor = pool.submit(b.batch, prompts("b", 6))
        wait_for(lambda: b.shared()["accounts"]["waiting_processes"] == 2, seconds=10)  # a's and b's turn
        a.kill()
        killed_at = time.monotonic()
        wait_for(lambda: any(p["input"]["prompt"].startswith("b ") for p in emu.predictions()),
                 seconds=LEASE + 1.5, message="the other instance's queued work never started")
        with pytest.raises(requests.ConnectionError):
            doomed.result()
        assert survivor.result()["successful_count"] == 6
    assert time.monotonic() - killed_at < 60
    assert emu.stats()["max_in_flight_by_token"][SERVER_TOKEN] <= 6
    # No slot stays lost: all six run at once again.
    wait_for(lambda: b.shared()["accounts"]["slots_in_use"] == 0, seconds=10)
    emu.reset(faults=False)
    assert b.batch(prompts("again", 6))["successful_count"] == 6
    assert emu.stats()["max_in_flight_by_token"][SERVER_TOKEN] == 6


# -- Redis away -----------------------------------------------------------------------------
@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A Redis of this test's own (with a password), which it stops and starts again."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder, password=PASSWORD)
    server.start()
    yield server
    server.stop()


def test_redis_stopped_mid_batch_fails_closed_and_the_batch_completes(instances, own_redis, emu):
    emu.set_faults(latency_s=1.0)
    a, b = instances(own_redis.url, REPLICATE_CONCURRENT_LIMIT="5")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(a.batch, prompts("a", 20))
        wait_for(lambda: emu.stats()["counters"].get("creates", 0) >= 5, seconds=10)
        own_redis.stop()
        time.sleep(0.5)  # creates admitted just before the stop have gone out
        created_when_down = emu.stats()["counters"]["creates"]
        began = time.monotonic()
        refused = b.post("/generate", {"model_name": "flux-dev", "prompt": "new work"})
        assert time.monotonic() - began < 5.0
        assert refused.status_code == 503 and "Redis" in refused.json()["error"]
        assert "Retry-After" in refused.headers
        for side in (a, b):  # alive (200), and saying why nothing new starts
            health = side.get("/health")
            assert health.json()["redis"] == "unreachable" and "Redis" in health.json()["error"]
            assert side.get("/ready").status_code == 503
        for text in (refused.text, health.text):
            assert PASSWORD not in text
        time.sleep(LEASE + 0.5)  # past the leases: still nothing admitted
        assert emu.stats()["counters"]["creates"] == created_when_down
        own_redis.start()  # the same port, empty
        body = running.result(timeout=60)
    assert body["successful_count"] == 20, body["failed_results"]
    assert emu.stats()["max_in_flight_by_token"][SERVER_TOKEN] == 5
    assert a.get("/health").json()["status"] == "healthy"
    for instance in (a, b):
        assert PASSWORD not in stop(instance.proc)


# -- the upstream's throttle ----------------------------------------------------------------
def test_a_429_seen_by_one_instance_pauses_creates_on_the_other(instances, redis_url, emu):
    emu.set_faults(latency_s=0.05, storm_retry_after_s=3)
    a, b = instances(redis_url, REPLICATE_THROTTLE_RETRIES="0")
    throttled = a.post("/generate", {"model_name": "flux-dev", "prompt": "[[429]] storm"})
    assert throttled.status_code != 200
    assert b.post("/generate", {"model_name": "flux-dev", "prompt": "after the storm"}).status_code == 200
    refused_at, created_at = emu.stats()["attempt_times"][SERVER_TOKEN]
    assert created_at - refused_at >= 3.0 - 0.05  # the whole Retry-After, on the other instance


# -- /configure -------------------------------------------------------------------------------
def test_configure_on_one_instance_changes_what_the_other_admits(instances, redis_url, emu):
    emu.set_faults(latency_s=0.3)
    a, b = instances(redis_url, REPLICATE_CONCURRENT_LIMIT="10")
    assert a.post("/configure", {"concurrent_limit": 2}).status_code == 200
    time.sleep(2.0)  # in force on every worker of every instance within 2 s
    assert b.batch(prompts("b", 8))["successful_count"] == 8
    assert emu.stats()["max_in_flight_by_token"][SERVER_TOKEN] == 2
    assert all(b.get("/status").json()["concurrency_status"]["concurrent_limit"] == 2 for _ in range(6))
    emu.reset(faults=False)
    assert b.post("/configure", {"concurrent_limit": 4}).status_code == 200
    time.sleep(2.0)
    assert a.batch(prompts("a", 8))["successful_count"] == 8
    assert emu.stats()["max_in_flight_by_token"][SERVER_TOKEN] == 4



# -- the pieces underneath, on the real Redis -------------------------------------------------
ACCOUNT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # what the gateway passes: a digest of the token


@pytest.fixture
def limits_pair(redis_url) -> Iterator[Callable[..., RedisAccountLimits]]:
    clients = []

    def make(**options: Any) -> RedisAccountLimits:
        clients.append(connect(redis_url))
        return RedisAccountLimits(clients[-1], ACCOUNT, "gw-shared", **options)

    yield make
    for client in clients:
        client.close()


def test_a_lease_for_an_existing_prediction_books_no_create(limits_pair):
    limits = limits_pair(concurrent_limit=1, requests_per_minute=1)
    assert limits.acquire("resumed", None, 0, book_create=False) == 0
    assert limits.status()["slots_in_use"] == 1 and limits.in_window() == 0
    limits.release("resumed")
    assert limits.acquire("new", None, 0) == pytest.approx(0, abs=0.01)  # the window is untouched
    assert limits.in_window() == 1


def test_a_lapsed_lease_of_running_work_is_reclaimed(limits_pair):
    limits = limits_pair(concurrent_limit=1, lease_seconds=1)
    limits.acquire("running", None, 0)
    wait_for(lambda: limits.status()["slots_in_use"] == 0, seconds=5)  # Redis away longer than a lease
    assert limits.reclaim_many(["running"]) == 1
    assert limits.renew("running") and limits.status()["slots_in_use"] == 1
    with pytest.raises(AdmissionTimeout):
        limits.acquire("newcomer", None, 0)


def test_new_defaults_admit_a_waiter_at_once_and_a_waiter_can_give_up(limits_pair):
    holder = limits_pair(concurrent_limit=1, wake_poll=8.0, heartbeat_seconds=20.0)
    waiter = limits_pair(concurrent_limit=1, wake_poll=8.0, heartbeat_seconds=20.0)
    holder.acquire("first", None, 0)
    with ThreadPoolExecutor(1) as pool:
        admitted = pool.submit(waiter.acquire, "second", None, 30)
        wait_for(lambda: holder.status()["queued"] == 1, seconds=10)
        for side in (holder, waiter):  # /configure raised the limit: every process's defaults
            side.set_defaults(2, 600)
        holder.defaults_changed(rate_changed=False)
        assert admitted.result(timeout=4.0) == pytest.approx(0, abs=0.05)  # not at its 8 s poll
    stop_at = time.monotonic() + 0.3
    with pytest.raises(AdmissionTimeout):
        limits_pair(concurrent_limit=2).acquire("third", None, 30, keep_waiting=lambda: time.monotonic() < stop_at)
    assert holder.status()["queued"] == 0  # its ticket left with it


def test_the_lane_manager_reclaims_leases_of_running_work_after_redis_comes_back_empty(redis_url):
    manager = SharedLaneManager(redis_url, "gw-lanes", 1.0, concurrent_limit=1, requests_per_minute=600,
                                reads_per_minute=600)
    manager.start()
    started, finish = threading.Event(), threading.Event()
    try:
        lane = manager.lane(ACCOUNT)
        lane.submit(lambda release: (started.set(), finish.wait(20)))
        assert started.wait(10)
        limits = lane.limits
        client = redis.Redis.from_url(redis_url)
        client.flushall()  # a restart without persistence: the running job's lease is gone
        client.close()
        wait_for(lambda: limits.status()["slots_in_use"] == 1, seconds=5)  # held again
        finish.set()
        wait_for(lambda: limits.status()["slots_in_use"] == 0 and lane.slots_in_use == 0, seconds=5)
    finally:
        finish.set()
        manager.shutdown()


def test_queued_work_past_its_deadline_or_canceled_takes_no_slot(redis_url, tmp_path):
    manager = SharedLaneManager(redis_url, "gw-lanes", 5.0, concurrent_limit=1, requests_per_minute=600,
                                reads_per_minute=600)
    manager.start()
    hold, ran = threading.Event(), {}
    try:
        lane = manager.lane(ACCOUNT)

        def item(name: str, seconds: float) -> GenerationItem:
            deadline = manager.clock() + seconds
            return GenerationItem(0, name, name, {}, tmp_path, str(tmp_path), deadline, "TEST", seconds)

        def job(name: str, deadline: float) -> Callable[[Callable[[], None]], None]:
            return lambda release: ran.setdefault(name, (lane.creates.reserve(latest=deadline), lane.slots_in_use))

        first, late, canceled = item("first", 30), item("late", 0.5), item("canceled", 30)
        lane.submit(lambda release: (ran.setdefault("first", lane.creates.reserve(first.deadline)), hold.wait(20)),
                    first)
        lane.submit(job("late", late.deadline), late)
        lane.submit(job("canceled", canceled.deadline), canceled)
        wait_for(lambda: "first" in ran, seconds=10)
        canceled.cancel()
        wait_for(lambda: "late" in ran and "canceled" in ran, seconds=10)
        assert ran["first"] == pytest.approx(0, abs=0.05)  # the start booked with its lease
        assert ran["late"] == (None, 1)       # told its turn came too late; held no slot
        assert ran["canceled"][1] == 1        # ran at once (and stops there) without a slot
        assert lane.limits.status()["slots_in_use"] == 1 and lane.limits.in_window() == 1
        hold.set()
        wait_for(lambda: lane.limits.status()["slots_in_use"] == 0, seconds=5)
    finally:
        hold.set()
        manager.shutdown()


def test_after_redis_comes_back_empty_running_work_is_counted_before_anything_new(own_redis):
    """Two processes: one runs a prediction across a Redis restart (its lease is gone with
    the data), the other has work queued. Admission waits until the running one holds its
    slot again, so the limit of one is never passed."""
    managers = [SharedLaneManager(own_redis.url, "gw-restart", 1.5, concurrent_limit=1, requests_per_minute=600,
                                  reads_per_minute=600) for _ in range(2)]
    running, finish, queued_started = threading.Event(), threading.Event(), threading.Event()
    overlap: list[bool] = []
    try:
        for manager in managers:
            manager.start()
        managers[0].lane(ACCOUNT).submit(lambda release: (running.set(), finish.wait(30)))
        assert running.wait(10)
        managers[1].lane(ACCOUNT).submit(lambda release: (overlap.append(not finish.is_set()), queued_started.set()))
        own_redis.stop()
        wait_for(lambda: not managers[0].reachable and not managers[1].reachable, seconds=10)
        own_redis.start()  # empty: the running prediction's lease is gone
        wait_for(lambda: managers[0].reachable and managers[1].reachable, seconds=10)
        time.sleep(2.0)  # longer than the pause after an outage: the queued work must still wait
        assert not queued_started.is_set()
        finish.set()
        assert queued_started.wait(10) and overlap == [False]
    finally:
        finish.set()
        for manager in managers:
            manager.shutdown()
