"""`GET /metrics`: counters, gauges and histograms move by exactly what happened upstream (the
emulator counts it too), labels never carry a token, the key is required only when asked,
and under gunicorn one scrape sums every worker."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    ADMIN,
    ADMIN_KEY,
    GUNICORN,
    SERVER_TOKEN,
    USER_TOKEN,
    children,
    free_port,
    service_env,
    start,
    stop,
    wait_for,
    wait_healthy,
)

ACCOUNT = hashlib.sha256(SERVER_TOKEN.encode()).hexdigest()[:12]
PRICES = {"flux-dev": {"per_run": 0.5, "per_output": 0.25}}


class Scrape:
    """One scrape, parsed: `value(name, **labels)` sums the samples whose labels match."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(get, headers: dict | None = None) -> Scrape:
    r = get("/metrics", headers=headers or {})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain"), r.text
    return Scrape(r.text)


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def test_a_batch_through_a_429_storm_moves_the_metrics_by_exactly_what_happened(make_service, emu):
    # Half the creates are refused (Retry-After 0, so the test waits for nothing).
    emu.set_faults(create_429_rate=0.5, storm_retry_after_s=0, window_s=1)
    service = make_service(REPLICATE_RATE_WINDOW_SECONDS=1, MODEL_PRICES=json.dumps(PRICES))
    before, emu_before = scrape(service.get), emu.stats()["counters"]
    prompts = [f"storm {i}" for i in range(8)]
    r = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": prompts}, ADMIN)
    assert r.status_code == 200 and r.json()["successful_count"] == 8, r.text
    # Items and the job are counted by their listeners just after the answer goes out.
    after = wait_for(lambda: (s := scrape(service.get)).value("gateway_predictions_in_flight") == 0
                     and s.value("gateway_items_total") >= 8 and s.value("gateway_jobs_total") >= 1 and s,
                     message="in-flight back to 0, every item and the job counted")
    counted = collections.Counter(emu.stats()["counters"]) - collections.Counter(emu_before)
    assert counted["throttled"] > 0, counted  # the storm happened
    labels = {"account": ACCOUNT, "model": "flux-dev"}
    assert moved(before, after, "gateway_upstream_creates_total", status="201", **labels) == counted["creates"] == 8
    assert moved(before, after, "gateway_upstream_creates_total", status="429", **labels) == counted["throttled"]
    assert moved(before, after, "gateway_create_retries_total", reason="throttled", **labels) == counted["throttled"]
    assert moved(before, after, "gateway_predictions_total", status="succeeded", **labels) == 8
    assert moved(before, after, "gateway_items_total", status="succeeded", **labels) == 8
    assert moved(before, after, "gateway_jobs_total", kind="sync", status="succeeded") == 1
    assert moved(before, after, "gateway_downloads_total", **labels) == counted["downloads"] == 8
    saved = sum(Path(f).stat().st_size for item in r.json()["successful_results"] for f in item["files"])
    assert moved(before, after, "gateway_download_bytes_total", **labels) == saved
    assert moved(before, after, "gateway_estimated_spend_dollars_total", **labels) == 8 * (0.5 + 0.25)
    attempts = counted["creates"] + counted["throttled"]
    assert moved(before, after, "gateway_upstream_create_seconds_count", model="flux-dev") == attempts
    for histogram in ("gateway_prediction_seconds_count", "gateway_item_seconds_count"):
        assert moved(before, after, histogram, model="flux-dev", status="succeeded") == 8
    assert moved(before, after, "gateway_slot_wait_seconds_count", model="flux-dev") == 8
    assert after.value("gateway_items_queued") == after.value("gateway_slots_in_use") == 0
    assert after.value("gateway_concurrency_limit") == 60
    assert SERVER_TOKEN not in after.text and ADMIN_KEY not in after.text


def test_in_flight_shows_a_running_prediction_and_cancels_are_counted(service, emu):
    before = scrape(service.get)
    job = service.post("/jobs", {"model_name": "flux-dev", "prompt": "never ends [[hang]]"},
                       {"X-Replicate-API-Key": USER_TOKEN}).json()
    account = hashlib.sha256(USER_TOKEN.encode()).hexdigest()[:12]
    wait_for(lambda: scrape(service.get).value("gateway_predictions_in_flight", account=account) == 1,
             message="the prediction counted in flight")
    service.post(f"/jobs/{job['job_id']}/cancel", headers={"X-Replicate-API-Key": USER_TOKEN})
    after = wait_for(lambda: (s := scrape(service.get)).value("gateway_predictions_in_flight") == 0
                     and s.value("gateway_cancels_sent_total") > before.value("gateway_cancels_sent_total") and s,
                     message="in flight back to 0, the cancel counted")
    assert moved(before, after, "gateway_cancels_sent_total", account=account, model="flux-dev") == \
        emu.stats()["counters"]["cancels"] == 1
    assert moved(before, after, "gateway_items_total", account=account, status="canceled") == 1
    assert USER_TOKEN not in after.text


def test_refused_requests_are_counted_and_cost_nothing_upstream(service, emu):
    before = scrape(service.get)
    assert service.post("/generate", {"model_name": "flux-dev", "prompt": ""}, ADMIN).status_code == 400
    after = scrape(service.get)
    assert moved(before, after, "gateway_validation_refusals_total", endpoint="/generate") == 1
    assert moved(before, after, "gateway_http_requests_total", endpoint="/generate", method="POST", status="400") == 1
    assert emu.stats()["counters"] == {}


def test_the_admin_key_is_required_only_when_asked(make_service, emu):
    open_metrics = make_service()
    assert open_metrics.get("/metrics").status_code == 200
    guarded = make_service(METRICS_REQUIRE_KEY="true")
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"X-Replicate-API-Key": USER_TOKEN}).status_code == 401
    assert guarded.get("/metrics", headers=ADMIN).status_code == 200


def health_answered_by(metrics_dir: Path, pid: int) -> float:
    """The /health requests one worker counted, read from its own file only."""
    own = metrics_dir / f"counter_{pid}.db"
    if not own.exists():
        return 0
    return sum(sample.value for family in MultiProcessCollector.merge([str(own)]) for sample in family.samples
               if sample.name == "gateway_http_requests_total" and sample.labels.get("endpoint") == "/health")


def test_several_gunicorn_workers_are_summed_in_one_scrape(emulator_server, emu, redis_url, tmp_path):
    """Two workers (limits shared on Redis); every request is counted once whichever worker
    answered it and whichever answers the scrape, and a killed worker's counts stay."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left by an earlier run")  # wiped at start
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, *GUNICORN, "-w", "2"],
                 service_env(emulator_server, tmp_path, port, REDIS_URL=redis_url, GUNICORN_WORKERS="2",
                             PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)), tmp_path)
    try:
        wait_healthy(url, proc)
        workers = wait_for(lambda: len(found := children(proc.pid)) == 2 and found, message="two workers")
        assert not (metrics_dir / "counter_1.db").exists()
        get = lambda path, headers: requests.get(url + path, headers=headers, timeout=10)  # noqa: E731
        before, sent = scrape(get), 0

        def each_worker_answered() -> bool:
            nonlocal sent
            requests.get(f"{url}/health", headers={"Connection": "close"}, timeout=10)
            sent += 1
            return all(health_answered_by(metrics_dir, pid) > 0 for pid in workers)
        wait_for(each_worker_answered, seconds=60, message="both workers answered /health")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: requests.post(
                f"{url}/generate", json={"model_name": "flux-dev", "prompt": f"w {i}"},
                headers={**ADMIN, "Connection": "close"}, timeout=60), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        summed = wait_for(lambda: (s := scrape(get)).value("gateway_predictions_in_flight") == 0
                          and s.value("gateway_items_total") >= 8 and s,
                          message="in flight back to 0 in every worker, every item counted")
        assert moved(before, summed, "gateway_http_requests_total", endpoint="/health") == sent
        assert summed.value("gateway_upstream_creates_total", status="201") == emu.stats()["counters"]["creates"] == 8
        assert summed.value("gateway_items_total", status="succeeded") == 8
        os.kill(workers[0], signal.SIGKILL)  # gunicorn starts another; the dead one's counts stay
        wait_for(lambda: len(set(children(proc.pid)) - set(workers)) == 1, message="a new worker")
        again = scrape(get)
        assert again.value("gateway_upstream_creates_total", status="201") == 8
        assert moved(before, again, "gateway_http_requests_total", endpoint="/health") == sent
    finally:
        stop(proc)
