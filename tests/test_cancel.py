"""Cancel, deadlines and job state while a create is held open (`Prefer: wait`): the
service does not know the prediction's id until the answer comes, yet a cancel or a
deadline must reach the upstream within seconds, and item states must stay true."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from helpers import ADMIN, finished_job, wait_for

FINAL = ("succeeded", "failed", "canceled")


def job(service, job_id: str) -> dict:
    return service.get(f"/jobs/{job_id}", headers=ADMIN).json()


def submit(service, prompts: list[str], **extra) -> str:
    r = service.post("/jobs", {"model_name": "flux-dev", "prompts": prompts, **extra}, ADMIN)
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def test_held_creates_show_running_and_a_cancel_reaches_them_within_5_s(make_service, emu):
    """Default `Prefer: wait` (60 s) and 30 s predictions: no id is known for a minute."""
    emu.set_faults(latency_s=30)
    service = make_service()
    job_id = submit(service, [f"held {i}" for i in range(6)])
    wait_for(lambda: len(emu.predictions()) == 6)
    watched = job(service, job_id)
    assert watched["counts"]["running"] == 6 and watched["counts"]["queued"] == 0
    assert all(item["prediction_id"] is None for item in watched["items"])  # still held open
    started = time.monotonic()
    assert service.post(f"/jobs/{job_id}/cancel", headers=ADMIN).status_code == 200
    ids = {p["id"] for p in emu.predictions()}
    wait_for(lambda: set(emu.stats()["canceled_ids"]) == ids, seconds=10)
    assert time.monotonic() - started <= 5.0
    final = finished_job(service.get, job_id, seconds=20)
    assert final["status"] == "canceled" and final["counts"]["canceled"] == 6
    time.sleep(1.0)  # the held creates have answered by now: nothing may come back to life
    again = job(service, job_id)
    assert again["status"] == "canceled" and again["counts"] == {
        "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "canceled": 6}
    assert emu.stats()["counters"]["creates"] == 6


def test_retry_right_after_cancel_waits_for_the_last_run_to_stop(make_service, emu):
    """Cancel then retry at once used to run both sets of pipelines (more creates than
    prompts, items stuck `running` in a finished job)."""
    emu.set_faults(latency_s=2)
    service = make_service(REPLICATE_CONCURRENT_LIMIT=10)
    prompts = [f"retry {i}" for i in range(30)]
    job_id = submit(service, prompts)
    wait_for(lambda: len(emu.predictions()) == 10)
    assert service.post(f"/jobs/{job_id}/cancel", headers=ADMIN).status_code == 200
    first = service.post(f"/jobs/{job_id}/retry", headers=ADMIN)
    assert first.status_code in (202, 409)
    if first.status_code == 409:
        assert "stopping" in first.json()["error"] or "running" in first.json()["error"]
        first = wait_for(lambda: (lambda r: r if r.status_code == 202 else None)(
            service.post(f"/jobs/{job_id}/retry", headers=ADMIN)), seconds=15, step=0.2)
    retried = first.json()["retried"]
    assert len(retried) == 30  # all of them were canceled
    done = finished_job(service.get, job_id, seconds=60)
    assert done["status"] == "succeeded", done["counts"]
    assert all(item["status"] == "succeeded" for item in done["items"])
    created = [p["input"]["prompt"] for p in emu.predictions()]
    assert len(created) == 10 + 30  # the canceled run's ten, then each prompt exactly once
    assert sorted(created[10:]) == sorted(prompts)


def test_generation_timeout_bounds_a_held_create(make_service, emu):
    """GENERATION_TIMEOUT=3 with the default 60 s wait: the item fails at 3 s, not 60 s,
    and the prediction is canceled upstream within 2 s of its deadline."""
    service = make_service(GENERATION_TIMEOUT=3)
    started = time.monotonic()
    job_id = submit(service, ["stuck [[hang]]"])
    [prediction] = wait_for(lambda: emu.predictions())
    wait_for(lambda: emu.stats()["canceled_ids"] == [prediction["id"]], seconds=10)
    assert time.monotonic() - started <= 3 + 2
    final = finished_job(service.get, job_id, seconds=20)
    [item] = final["items"]
    assert item["status"] == "failed" and "timed out after 3 s (GENERATION_TIMEOUT)" in item["error"]


def test_a_canceled_synchronous_request_answers_a_clear_4xx(make_service, emu):
    emu.set_faults(latency_s=30)
    service = make_service()
    with ThreadPoolExecutor(2) as pool:
        single = pool.submit(service.post, "/generate", {"model_name": "flux-dev", "prompt": "sync one"}, ADMIN)
        batch = pool.submit(service.post, "/generate-batch",
                            {"model_name": "flux-dev", "prompts": ["b0", "b1"]}, ADMIN)
        wait_for(lambda: len(emu.predictions()) == 3)
        for listed in service.get("/jobs", headers=ADMIN).json()["jobs"]:
            assert listed["kind"] == "sync"
            assert service.post(f"/jobs/{listed['job_id']}/cancel", headers=ADMIN).status_code == 200
        answer, partial = single.result(timeout=15), batch.result(timeout=15)
    assert answer.status_code == 409 and answer.json()["error"] == "Canceled by request"
    body = partial.json()
    assert partial.status_code == 200 and body["failed_count"] == 2 and body["success"] is False
    assert [r["error"] for r in body["failed_results"]] == ["Canceled by request"] * 2
    wait_for(lambda: len(emu.stats()["canceled_ids"]) == 3, seconds=5)
