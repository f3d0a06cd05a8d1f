"""The five workloads. Each starts fresh processes, measures, and returns its figures."""
from __future__ import annotations

import math
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import replicate
import requests

from bench.baseline import run_baseline, run_lean
from bench.harness import (
    ADMIN_KEY,
    SERVER_TOKEN,
    RedisProc,
    Usage,
    UsageGroup,
    start_emulator,
    start_service,
    worker_pid,
    worker_pids,
)
from replicate_emulator.control_client import EmulatorControl

MODEL = "flux-dev"
REPLICATE_MODEL = "black-forest-labs/flux-dev"
BASELINE_TOKEN = "r8_benchbaseline0000000001"
LEAN_TOKEN = "r8_benchleanclient00000001"
UNLIMITED = {"create_limit": 1_000_000, "other_limit": 1_000_000}


class Sampler:
    """Samples the service worker's threads twice a second while a run goes on."""

    def __init__(self, usage: Usage) -> None:
        self.usage, self._stop = usage, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.usage.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _batch(url: str, count: int, tag: str) -> tuple[float, dict]:
    prompts = [f"{tag} prompt {i}" for i in range(count)]
    started = time.monotonic()
    response = requests.post(f"{url}/generate-batch", json={"model_name": MODEL, "prompts": prompts},
                             headers={"X-Admin-API-Key": ADMIN_KEY}, timeout=1200)
    return time.monotonic() - started, response.json()


def _service_run(workdir: Path, emulator_url: str, count: int, tag: str, **settings) -> dict:
    service, url = start_service(workdir, emulator_url, **settings)
    usage = Usage(worker_pid(service.proc.pid))
    cpu_before = usage.cpu_seconds()
    try:
        with Sampler(usage):
            seconds, body = _batch(url, count, tag)
        cpu = usage.cpu_seconds() - cpu_before
        return {"seconds": round(seconds, 2), "completed": body.get("successful_count", 0),
                "cpu_ms_per_generation": round(1000 * cpu / count, 2),
                "peak_rss_mb": round(usage.peak_rss_mb(), 1), "peak_threads": usage.peak_threads}
    finally:
        service.stop()
        shutil.rmtree(workdir / "output", ignore_errors=True)


def _baseline_run(workdir: Path, emulator_url: str, count: int, tag: str) -> dict:
    started = time.monotonic()
    result = run_baseline(emulator_url, BASELINE_TOKEN, REPLICATE_MODEL,
                          [f"{tag} prompt {i}" for i in range(count)], workdir / "baseline")
    shutil.rmtree(workdir / "baseline", ignore_errors=True)
    return {"seconds": round(time.monotonic() - started, 2), **result}


def _compare(name: str, bound: float, service: dict, baseline: dict | None, count: int) -> dict:
    row = {"workload": name, "n": count, "lower_bound_s": round(bound, 2), "service": service,
           "efficiency": round(bound / service["seconds"], 3)}
    if baseline is not None:
        row["baseline"] = baseline
        if baseline["completed"] == baseline["total"]:  # a time for an unfinished batch means nothing
            row["baseline_efficiency"] = round(bound / baseline["seconds"], 3)
            row["service_over_baseline_time"] = round(service["seconds"] / baseline["seconds"], 3)
    return row


def makespan(workdir: Path, quick: bool) -> dict:
    n, c, latency = (200, 100, 2.0) if quick else (1000, 100, 2.0)
    emulator, url = start_emulator(workdir, latency_s=latency, **UNLIMITED)
    try:
        service = _service_run(workdir, url, n, "w1", REPLICATE_CONCURRENT_LIMIT=c,
                               REPLICATE_REQUESTS_PER_MINUTE=100_000, REPLICATE_READS_PER_MINUTE=1_000_000)
        baseline = _baseline_run(workdir, url, n, "w1")
    finally:
        emulator.stop()
    row = _compare("1 makespan", math.ceil(n / c) * latency, service, baseline, n)
    row["targets"] = {"efficiency >= 0.95": row["efficiency"] >= 0.95}
    return row


def makespan_median(workdir: Path, quick: bool) -> dict:
    """Workload 1b: workload 1's shape at N=600, run three times (fresh emulator and service
    each): the row shows the median run, the label and `runs` all three. On two shared cores
    one run is noisy; the median of three is the figure. No baseline (workload 1 has one);
    instead one run of a lean client (`run_lean`: C threads of create-and-download) shows
    what the machine and the emulator allow any client."""
    n, c, latency, runs = (200, 100, 2.0, 3) if quick else (600, 100, 2.0, 3)
    services = []
    for run in range(runs):
        emulator, url = start_emulator(workdir, latency_s=latency, **UNLIMITED)
        try:
            services.append(_service_run(workdir, url, n, f"w1b-{run}", REPLICATE_CONCURRENT_LIMIT=c,
                                         REPLICATE_REQUESTS_PER_MINUTE=100_000,
                                         REPLICATE_READS_PER_MINUTE=1_000_000))
        finally:
            emulator.stop()
    emulator, url = start_emulator(workdir, latency_s=latency, **UNLIMITED)
    try:
        started = time.monotonic()
        lean = run_lean(url, LEAN_TOKEN, REPLICATE_MODEL, [f"w1b-lean prompt {i}" for i in range(n)],
                        workdir / "lean", c)
        lean["seconds"] = round(time.monotonic() - started, 2)
    finally:
        emulator.stop()
        shutil.rmtree(workdir / "lean", ignore_errors=True)
    bound = math.ceil(n / c) * latency
    median = sorted(services, key=lambda service: service["seconds"])[runs // 2]
    figures = " / ".join(str(service["seconds"]) for service in services)
    row = _compare(f"1b makespan N={n}, median of {runs} ({figures} s)", bound, median, None, n)
    row["runs"] = services
    row["run_efficiencies"] = [round(bound / service["seconds"], 3) for service in services]
    lean["efficiency"] = round(bound / lean["seconds"], 3)
    row["lean_client"] = lean  # for reference: what the machine and the emulator allow any client
    row["targets"] = {"median efficiency >= 0.97": row["efficiency"] >= 0.97}
    return row


def _rate_bound(n: int, rate: int, latency: float, window: float) -> float:
    return window * ((n - 1) // rate) + latency


def rate_bound(workdir: Path, quick: bool) -> dict:
    n, rate, latency, window = (117, 100, 1.0, 10.0) if quick else (700, 600, 1.0, 60.0)
    emulator, url = start_emulator(workdir, latency_s=latency, window_s=window, create_limit=rate,
                                   other_limit=1_000_000)
    try:
        service = _service_run(workdir, url, n, "w2", REPLICATE_CONCURRENT_LIMIT=100,
                               REPLICATE_REQUESTS_PER_MINUTE=rate, REPLICATE_RATE_WINDOW_SECONDS=window)
        baseline = _baseline_run(workdir, url, n, "w2")
    finally:
        emulator.stop()
    row = _compare("2 rate-bound", _rate_bound(n, rate, latency, window), service, baseline, n)
    row["targets"] = {"efficiency >= 0.95": row["efficiency"] >= 0.95}
    return row


def throttled(workdir: Path, quick: bool) -> dict:
    n, allowed, configured, latency, window = (150, 50, 100, 1.0, 10.0) if quick else (400, 300, 600, 1.0, 60.0)
    emulator, url = start_emulator(workdir, latency_s=latency, window_s=window, create_limit=allowed,
                                   other_limit=1_000_000)
    control = EmulatorControl(url)
    try:
        service = _service_run(workdir, url, n, "w3", REPLICATE_CONCURRENT_LIMIT=100,
                               REPLICATE_REQUESTS_PER_MINUTE=configured, REPLICATE_RATE_WINDOW_SECONDS=window)
        service["wasted_attempts"] = control.stats()["by_token"][SERVER_TOKEN].get("throttled", 0)
        baseline = _baseline_run(workdir, url, n, "w3")
        baseline["wasted_attempts"] = control.stats()["by_token"][BASELINE_TOKEN].get("throttled", 0)
    finally:
        emulator.stop()
    row = _compare("3 throttled upstream", _rate_bound(n, allowed, latency, window), service, baseline, n)
    row["targets"] = {"service completes 100%": service["completed"] == n,
                      "service makespan beats baseline": service["seconds"] < baseline["seconds"]
                      or baseline["completed"] < n}
    return row


def scale(workdir: Path, quick: bool) -> dict:
    n, latency = (300, 10.0) if quick else (1000, 30.0)
    emulator, url = start_emulator(workdir, latency_s=latency, **UNLIMITED)
    try:
        service = _service_run(workdir, url, n, "w4", REPLICATE_CONCURRENT_LIMIT=n,
                               REPLICATE_REQUESTS_PER_MINUTE=100_000, REPLICATE_READS_PER_MINUTE=1_000_000)
        stats = EmulatorControl(url).stats()
    finally:
        emulator.stop()
    row = _compare("4 scale", latency, service, None, n)
    row["upstream_max_in_flight"] = stats["max_in_flight"]
    # What holding creates open (Prefer: wait) instead of polling costs in reads at this scale.
    row["upstream_polls"] = stats["counters"].get("polls", 0)
    row["targets"] = {"peak RSS < 300 MB": service["peak_rss_mb"] < 300,
                      "CPU < 5 ms per generation": service["cpu_ms_per_generation"] < 5}
    return row


def _percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": round(1000 * statistics.median(ordered), 2),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)}


def overhead(workdir: Path, quick: bool) -> dict:
    runs = 50 if quick else 300
    emulator, url = start_emulator(workdir, latency_s=0, **UNLIMITED)
    service, service_url = start_service(workdir, url)
    try:
        http, direct_samples, service_samples = requests.Session(), [], []
        client = replicate.Client(api_token=BASELINE_TOKEN, base_url=url)
        folder = workdir / "direct"
        folder.mkdir(exist_ok=True)
        for i in range(runs):  # interleaved, so both see the same machine state
            started = time.monotonic()
            p = client.models.predictions.create(model=REPLICATE_MODEL, input={"prompt": f"d{i}"}, wait=60)
            (folder / f"{i}.webp").write_bytes(http.get(p.output[0], timeout=30).content)
            direct_samples.append(time.monotonic() - started)
            started = time.monotonic()
            http.post(f"{service_url}/generate", json={"model_name": MODEL, "prompt": f"s{i}"},
                      headers={"X-Admin-API-Key": ADMIN_KEY}, timeout=30).raise_for_status()
            service_samples.append(time.monotonic() - started)
    finally:
        service.stop()
        emulator.stop()
    direct, through = _percentiles(direct_samples), _percentiles(service_samples)
    added = {"p50_ms": round(through["p50_ms"] - direct["p50_ms"], 2),
             "p99_ms": round(through["p99_ms"] - direct["p99_ms"], 2)}
    return {"workload": "5 overhead", "n": runs, "direct": direct, "service": through, "added": added,
            "targets": {"p50 added latency < 20 ms": added["p50_ms"] < 20}}


def _shared_run(workdir: Path, emulator_url: str, redis_url: str, n: int, c: int, tag: str) -> dict:
    """Two gunicorn instances of two workers on one Redis; the batch split in four requests,
    two to each instance, sent at once. CPU is summed over the four worker processes."""
    settings = {"REDIS_URL": redis_url, "GUNICORN_WORKERS": 2, "REPLICATE_CONCURRENT_LIMIT": c,
                "REPLICATE_REQUESTS_PER_MINUTE": 100_000, "REPLICATE_READS_PER_MINUTE": 1_000_000}
    instances = []
    try:
        for name in ("a", "b"):
            (workdir / name).mkdir()
            instances.append(start_service(workdir / name, emulator_url, **settings))
        time.sleep(2.0)  # every worker has booted (the health check answers with the first)
        usage = UsageGroup([pid for proc, _ in instances for pid in worker_pids(proc.proc.pid)])
        cpu_before = usage.cpu_seconds()
        parts = [(url, n // 4 + (1 if i < n % 4 else 0)) for i, (_, url) in enumerate(instances * 2)]
        started = time.monotonic()
        with Sampler(usage), ThreadPoolExecutor(len(parts)) as pool:
            bodies = list(pool.map(lambda part: _batch(part[0], part[1], f"{tag}-{part[0][-5:]}")[1],
                                   parts))
        seconds = time.monotonic() - started
        cpu = usage.cpu_seconds() - cpu_before
        return {"seconds": round(seconds, 2), "completed": sum(b.get("successful_count", 0) for b in bodies),
                "cpu_ms_per_generation": round(1000 * cpu / n, 2), "worker_processes": len(usage.members),
                "peak_rss_mb": round(usage.peak_rss_mb(), 1), "peak_threads": usage.peak_threads}
    finally:
        for proc, _ in instances:
            proc.stop()


def shared_limits(workdir: Path, quick: bool) -> dict:
    """Workload 6: workload 1's makespan with the limits shared on Redis by two gunicorn
    instances of two workers each (a redis-server of its own), against the same lower bound;
    the single-process run of the same batch gives the CPU figure to compare with."""
    n, c, latency = (200, 100, 2.0) if quick else (1000, 100, 2.0)
    redis_server = RedisProc(workdir)
    try:
        emulator, url = start_emulator(workdir, latency_s=latency, **UNLIMITED)
        try:
            service = _shared_run(workdir, url, redis_server.url, n, c, "w6")
            in_flight = EmulatorControl(url).stats()["max_in_flight"]
        finally:
            emulator.stop()
        emulator, url = start_emulator(workdir, latency_s=latency, **UNLIMITED)
        try:
            single = _service_run(workdir, url, n, "w6-single", REPLICATE_CONCURRENT_LIMIT=c,
                                  REPLICATE_REQUESTS_PER_MINUTE=100_000, REPLICATE_READS_PER_MINUTE=1_000_000)
        finally:
            emulator.stop()
    finally:
        redis_server.stop()
    bound = math.ceil(n / c) * latency
    row = _compare("6 shared limits: 2 instances x 2 workers, one Redis", bound, service, None, n)
    row["upstream_max_in_flight"] = in_flight
    row["single_process"] = {**single, "efficiency": round(bound / single["seconds"], 3)}
    row["targets"] = {"efficiency >= 0.95": row["efficiency"] >= 0.95,
                      f"upstream in flight exactly {c}": in_flight == c,
                      "100% complete": service["completed"] == n}
    return row


WORKLOADS = {"1": makespan, "1b": makespan_median, "2": rate_bound, "3": throttled, "4": scale,
             "5": overhead, "6": shared_limits}
