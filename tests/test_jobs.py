"""Durable jobs, with real processes where a restart is the point."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from replicate_emulator import read_stamp

from helpers import (
    ADMIN,
    GUNICORN,
    SERVER_TOKEN,
    USER_TOKEN,
    children,
    finished_job,
    free_port,
    service_env,
    start,
    stop,
    wait_for,
    wait_healthy,
)

SECRET = "whsec_" + base64.b64encode(b"test-webhook-secret-bytes").decode()
OTHER = {"X-Replicate-API-Key": "r8_othertoken0000000000003"}
USER = {"X-Replicate-API-Key": USER_TOKEN}


def test_submit_watch_and_download(service, emu):
    r = service.post("/jobs", {"model_name": "flux-dev", "prompts": ["a cat", "a dog"],
                               "custom_filenames": ["cat", "dog"], "output_format": "png"}, ADMIN)
    assert r.status_code == 202 and r.headers["Location"] == r.json()["status_url"]
    job = finished_job(service.get, r.json()["job_id"])
    assert job["status"] == "succeeded" and job["counts"]["succeeded"] == 2 and job["total"] == 2
    for item, prompt, name in zip(job["items"], ["a cat", "a dog"], ["cat", "dog"], strict=False):
        assert item["prompt"] == prompt and item["prediction_id"] and item["started_at"] and item["finished_at"]
        [url] = item["urls"]
        assert url.endswith(f"/{name}.png")
        image = service.get(url, headers=ADMIN)
        assert image.status_code == 200 and read_stamp(image.content)["prompt"] == prompt
        provenance = json.loads(Path(item["files"][0]).with_suffix(".json").read_text())
        assert provenance["sha256"] == hashlib.sha256(image.content).hexdigest()
        assert provenance["prompt"] == prompt and provenance["prediction_id"] == item["prediction_id"]
        assert provenance["parameters"] == {"output_format": "png"} and provenance["model"] == "flux-dev"


def test_single_prompt_job_and_listing(service, emu):
    first = service.post("/jobs", {"model_name": "qwen-image", "prompt": "一"}, USER).json()["job_id"]
    second = service.post("/jobs", {"model_name": "qwen-image", "prompt": "二"}, USER).json()["job_id"]
    finished_job(service.get, first, USER), finished_job(service.get, second, USER)
    listed = service.get("/jobs?per_page=1", headers=USER).json()
    assert [j["job_id"] for j in listed["jobs"]] == [second] and listed["next_page"] == 2
    assert [j["job_id"] for j in service.get("/jobs?page=2&per_page=1", headers=USER).json()["jobs"]] == [first]
    service.post("/generate", {"model_name": "flux-dev", "prompt": "sync"}, ADMIN)
    kinds = {j["kind"] for j in service.get("/jobs", headers=ADMIN).json()["jobs"]}
    assert kinds == {"job", "sync"}  # synchronous requests are journaled too; the admin sees all


def test_idempotent_resubmit_creates_nothing_new(service, emu):
    body = {"model_name": "flux-dev", "prompts": ["x", "y"]}
    headers = {**ADMIN, "Idempotency-Key": "order-42"}
    first = service.post("/jobs", body, headers)
    finished_job(service.get, first.json()["job_id"])
    again = service.post("/jobs", body, headers)
    assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
    assert emu.stats()["counters"]["creates"] == 2
    conflict = service.post("/jobs", {**body, "prompts": ["z"]}, headers)
    assert conflict.status_code == 409 and "Idempotency-Key" in conflict.json()["error"]
    other_owner = service.post("/jobs", body, {**USER, "Idempotency-Key": "order-42"})
    assert other_owner.status_code == 202  # keys are per owner


def test_jobs_and_files_are_invisible_to_other_tokens(service, emu):
    job_id = service.post("/jobs", {"model_name": "flux-dev", "prompt": "mine"}, USER).json()["job_id"]
    job = finished_job(service.get, job_id, USER)
    url = job["items"][0]["urls"][0]
    for path in (f"/jobs/{job_id}", url):
        assert service.get(path, headers=OTHER).status_code == 404
        assert service.get(path, headers=USER).status_code == 200
        assert service.get(path, headers=ADMIN).status_code == 200
    assert service.post(f"/jobs/{job_id}/cancel", headers=OTHER).status_code == 404
    assert service.get("/jobs", headers=OTHER).json()["jobs"] == []
    for hostile in ("/files/../.jobs.sqlite3", "/files/.jobs.sqlite3", "/files/a/b/c", "/files/%2e%2e/x"):
        assert service.get(hostile, headers=ADMIN).status_code == 404


def test_cancel_stops_queued_and_running_items(make_service, emu):
    emu.set_faults(latency_s=30)
    service = make_service(REPLICATE_CONCURRENT_LIMIT=2, REPLICATE_PREFER_WAIT_SECONDS=1)
    job_id = service.post("/jobs", {"model_name": "flux-dev", "prompts": [f"p{i}" for i in range(6)]},
                          ADMIN).json()["job_id"]
    wait_for(lambda: len(emu.predictions()) >= 2, seconds=10)
    assert service.post(f"/jobs/{job_id}/cancel", headers=ADMIN).status_code == 200
    job = finished_job(service.get, job_id)
    assert job["status"] == "canceled" and job["counts"]["canceled"] == 6
    wait_for(lambda: len(emu.stats()["canceled_ids"]) >= 2, seconds=10)
    stats = emu.stats()
    assert stats["counters"]["creates"] == 2 and len(stats["canceled_ids"]) == 2


def test_retry_runs_failed_items_again_into_the_same_names(service, emu):
    emu.set_faults(fail_rate=1.0)
    job_id = service.post("/jobs", {"model_name": "flux-dev", "prompts": ["a", "b", "c"],
                                    "custom_filenames": ["one", "two", "three"]}, ADMIN).json()["job_id"]
    assert finished_job(service.get, job_id)["status"] == "failed"
    emu.set_faults(fail_rate=0.0)
    r = service.post(f"/jobs/{job_id}/retry", headers=ADMIN)
    assert r.status_code == 202 and r.json()["retried"] == [0, 1, 2]
    job = finished_job(service.get, job_id)
    assert job["status"] == "succeeded"
    assert [os.path.basename(i["files"][0]) for i in job["items"]] == ["one.webp", "two.webp", "three.webp"]
    assert emu.stats()["counters"]["creates"] == 6
    assert service.post(f"/jobs/{job_id}/retry", headers=ADMIN).json()["retried"] == []


class Receiver:
    """A webhook receiver that fails its first `failures` deliveries."""

    def __init__(self, failures: int) -> None:
        received, self.failures = [], failures
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(500 if len(received) <= outer.failures else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def verify(headers: dict, body: bytes) -> bool:
    key = base64.b64decode(SECRET[len("whsec_"):])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return headers["webhook-signature"] == f"v1,{expected}"


def test_webhook_is_signed_and_retried_until_delivered(make_service, emu):
    receiver = Receiver(failures=2)
    service = make_service(WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOW_PRIVATE="true")
    job_id = service.post("/jobs", {"model_name": "flux-dev", "prompt": "hook", "webhook": receiver.url},
                          ADMIN).json()["job_id"]
    finished_job(service.get, job_id)
    wait_for(lambda: len(receiver.received) >= 3, seconds=15)
    time.sleep(0.5)  # room for a fourth delivery, which must not come
    receiver.server.shutdown()
    assert len(receiver.received) == 3  # two failures, then one delivery, then nothing more
    assert len({h["webhook-id"] for h, _ in receiver.received}) == 1
    assert all(verify(h, b) for h, b in receiver.received)
    delivered = json.loads(receiver.received[-1][1])
    assert delivered["job_id"] == job_id and delivered["status"] == "succeeded"
    assert SERVER_TOKEN not in receiver.received[-1][1].decode()


def test_private_webhook_targets_are_refused_by_default(make_service, emu):
    service = make_service(WEBHOOK_SECRET=SECRET)
    for target in ("http://127.0.0.1:9/x", "http://10.0.0.1/x", "http://169.254.169.254/latest", "ftp://x/y",
                   "http://[::1]/x", "http://localhost/x"):
        r = service.post("/jobs", {"model_name": "flux-dev", "prompt": "x", "webhook": target}, ADMIN)
        assert r.status_code == 400 and r.json()["field"] == "webhook"
    assert emu.stats()["counters"] == {}


@pytest.mark.parametrize("prefer_wait", [60, 1], ids=["answers-lost-in-flight", "ids-journaled"])
def test_sigkill_mid_job_loses_nothing_and_creates_nothing_twice(emulator_server, emu, tmp_path, prefer_wait):
    """Killed while 8 of 20 predictions are in flight, started again: all 20 files, exactly
    20 creates. With `Prefer: wait=60` the creates' answers never came back (found again in
    the upstream's list by their input); with 1 s their ids were journaled (read back by id)."""
    emu.set_faults(latency_s=2.5)
    port = free_port()
    env = service_env(emulator_server, tmp_path, port, REPLICATE_CONCURRENT_LIMIT="8",
                      REPLICATE_PREFER_WAIT_SECONDS=str(prefer_wait), JOBS_DB=str(tmp_path / "jobs.sqlite3"))
    command = [sys.executable, *GUNICORN]
    base = f"http://127.0.0.1:{port}"
    first = start(command, env, tmp_path)
    try:
        wait_healthy(base, first)
        job_id = requests.post(f"{base}/jobs", json={"model_name": "flux-dev",
                                                     "prompts": [f"durable {i}" for i in range(20)]},
                               headers=ADMIN, timeout=10).json()["job_id"]
        wait_for(lambda: len(emu.predictions()) >= 8, seconds=10)
        time.sleep(prefer_wait == 1 and 1.3)  # past the 1 s wait: the ids are journaled
    finally:
        # The worker holds the work: kill it, no goodbyes (a SIGKILLed master leaves it orphaned).
        for pid in children(first.pid) + [first.pid]:
            os.kill(pid, signal.SIGKILL)
        first.wait(10)
    assert 8 <= len(emu.predictions()) < 20
    second = start(command, env, tmp_path)
    try:
        wait_healthy(base, second)
        job = finished_job(lambda path, **kwargs: requests.get(base + path, timeout=10, **kwargs), job_id)
    finally:
        stop(second)
    assert job["status"] == "succeeded", [i["error"] for i in job["items"] if i["error"]]
    assert job["counts"]["succeeded"] == 20
    for item in job["items"]:
        assert read_stamp(item["files"][0])["prompt"] == f"durable {item['index']}"
    assert emu.stats()["counters"]["creates"] == 20
