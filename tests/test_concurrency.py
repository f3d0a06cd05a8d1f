"""Order, per-token isolation and limits, proven from the emulator's side."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from replicate_emulator import read_stamp
from replicate_emulator.control_client import max_in_window, max_overlap

from helpers import ADMIN, SERVER_TOKEN, USER_TOKEN, wait_for


def batch(service, prompts, headers=ADMIN, **params):
    return service.post("/generate-batch", {"model_name": "flux-dev", "prompts": prompts, **params}, headers)


def test_fifty_prompts_with_random_latency_keep_their_order(service, emu):
    emu.set_faults(latency="uniform", latency_min_s=0.05, latency_max_s=1.0)
    prompts = [f"prompt number {i} about thing {i * 7}" for i in range(50)]
    names = [f"item_{49 - i:03d}" for i in range(50)]  # deliberately not in sorted order
    body = batch(service, prompts, custom_filenames=names).json()
    assert body["successful_count"] == 50
    created = [p["input"]["prompt"] for p in sorted(emu.predictions(), key=lambda p: p["created_t"])]
    assert sorted(created) == sorted(prompts)
    for result in body["successful_results"]:
        i = result["prompt_index"]
        assert result["prompt"] == prompts[i]
        [path] = result["files"]
        assert os.path.basename(path) == names[i] + ".webp"
        assert read_stamp(path)["prompt"] == prompts[i]
    assert [r["prompt_index"] for r in body["successful_results"]] == list(range(50))


def test_two_tokens_never_cross(service, emu):
    emu.set_faults(latency="uniform", latency_min_s=0.05, latency_max_s=0.4)
    other = "r8_othertoken0000000000003"
    jobs = [(USER_TOKEN, {"X-Replicate-API-Key": USER_TOKEN}), (other, {"X-Replicate-API-Key": other}),
            (SERVER_TOKEN, ADMIN)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(batch, service, [f"{token} #{n}" for n in range(8)], headers)
                   for token, headers in jobs for _ in range(2)]
        assert all(f.result().json()["successful_count"] == 8 for f in futures)
    predictions = emu.predictions()
    assert len(predictions) == 48
    for p in predictions:
        assert p["input"]["prompt"].startswith(p["token"] + " #")
    assert "REPLICATE_API_TOKEN" not in os.environ


def test_limit_five_is_reached_and_never_passed(make_service, emu):
    emu.set_faults(latency="uniform", latency_min_s=0.1, latency_max_s=0.3)
    service = make_service(REPLICATE_CONCURRENT_LIMIT=5)
    assert batch(service, [f"p{i}" for i in range(40)]).json()["successful_count"] == 40
    assert emu.stats()["max_in_flight_by_token"][SERVER_TOKEN] == 5


def test_limit_is_the_real_one_above_fifty(make_service, emu):
    """No smaller fixed pool (50 threads, or 6 on two cores) may sit under the configured limit."""
    emu.set_faults(latency_s=1.0)
    service = make_service(REPLICATE_CONCURRENT_LIMIT=80)
    assert batch(service, [f"p{i}" for i in range(80)]).json()["successful_count"] == 80
    assert emu.stats()["max_in_flight"] == 80


def test_limits_are_per_token(make_service, emu):
    emu.set_faults(latency_s=0.3)
    service = make_service(REPLICATE_CONCURRENT_LIMIT=3)
    other = {"X-Replicate-API-Key": USER_TOKEN}
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(batch, service, [f"a{i}" for i in range(9)])
        b = pool.submit(batch, service, [f"b{i}" for i in range(9)], other)
        assert a.result().json()["successful_count"] == 9 and b.result().json()["successful_count"] == 9
    stats = emu.stats()
    assert stats["max_in_flight_by_token"] == {SERVER_TOKEN: 3, USER_TOKEN: 3}
    assert stats["max_in_flight"] == 6


def test_rate_window_holds_and_the_batch_finishes(make_service, emu):
    """10 a window, 13 prompts: never 11 in one window, and the limiter does not deadlock at the limit.
    The window is 2 s on both sides so the test takes seconds, not minutes."""
    emu.set_faults(window_s=2, create_limit=10, latency_s=0.05)
    service = make_service(REPLICATE_REQUESTS_PER_MINUTE=10, REPLICATE_RATE_WINDOW_SECONDS=2)
    body = batch(service, [f"p{i}" for i in range(13)]).json()
    assert body["successful_count"] == 13
    stats = emu.stats()
    times = stats["create_times"][SERVER_TOKEN]
    assert len(times) == 13 and max_in_window(times, 2.0) == 10
    assert stats["counters"].get("throttled", 0) == 0


def _intervals(emu):
    return [(p["created_t"], p["completed_t"]) for p in emu.predictions()]


def _configure_mid_batch(make_service, emu, before: int, after: int) -> float:
    """A 24-prompt batch at limit `before`, changed to `after` once `before` are running;
    returns the emulator's time of the change."""
    emu.set_faults(latency_s=0.4)
    service = make_service(REPLICATE_CONCURRENT_LIMIT=before)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(batch, service, [f"p{i}" for i in range(24)])
        wait_for(lambda: len(emu.predictions()) >= before)
        assert service.post("/configure", {"concurrent_limit": after}, ADMIN).status_code == 200
        changed_at = emu.stats()["now"]
        assert running.result().json()["successful_count"] == 24
    assert service.get("/status").json()["concurrency_status"]["slots_in_use"] == 0
    return changed_at


def test_configure_raises_the_limit_mid_batch(make_service, emu):
    _configure_mid_batch(make_service, emu, 2, 6)
    assert emu.stats()["max_in_flight"] == 6


def test_configure_lowers_the_limit_mid_batch(make_service, emu):
    lowered_at = _configure_mid_batch(make_service, emu, 6, 2)
    intervals = _intervals(emu)
    assert max_overlap(intervals) == 6
    for start, _ in intervals:
        if start > lowered_at:  # admitted after the change: at most 2 running, itself included
            assert sum(1 for s, e in intervals if s <= start < e) <= 2


def test_status_reports_real_in_flight_counts(make_service, emu):
    """/status counts what is really running, not a private counter."""
    emu.set_faults(latency_s=1.0)
    service = make_service(REPLICATE_CONCURRENT_LIMIT=4)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(batch, service, [f"p{i}" for i in range(10)])
        seen = wait_for(lambda: (lambda s: s if s["current_concurrent"] == 4 else None)(
            service.get("/status").json()["concurrency_status"]))
        assert seen["queued"] >= 1 and seen["slots_in_use"] == 4
        assert running.result().json()["successful_count"] == 10
    assert service.get("/health").json()["concurrency_status"]["current_concurrent"] == 0


def test_timeout_cancels_the_prediction_and_frees_the_slot(make_service, emu):
    """Past GENERATION_TIMEOUT the prediction is canceled upstream, the slot is
    freed, and the client gets a message that says what happened."""
    service = make_service(GENERATION_TIMEOUT=1.5, REPLICATE_PREFER_WAIT_SECONDS=1)
    r = service.post("/generate", {"model_name": "flux-dev", "prompt": "never ends [[hang]]"}, ADMIN)
    assert r.status_code == 504 and r.json()["error"] == "Generation timed out after 1.5 s (GENERATION_TIMEOUT)"
    [prediction] = emu.predictions()
    wait_for(lambda: emu.stats()["canceled_ids"] == [prediction["id"]])
    wait_for(lambda: service.get("/status").json()["concurrency_status"]["slots_in_use"] == 0)


def test_concurrent_requests_never_share_a_file(service, emu):
    """Same default names and same custom names, at the same time: no file overwrites another."""
    with ThreadPoolExecutor(6) as pool:
        singles = [pool.submit(service.post, "/generate", {"model_name": "flux-dev", "prompt": f"s{i}"}, ADMIN)
                   for i in range(4)]
        batches = [pool.submit(batch, service, ["a", "b"], custom_filenames=["same_1", "same_2"])
                   for _ in range(2)]
        files = [f.result().json()["files"][0] for f in singles]
        files += [r["files"][0] for f in batches for r in f.result().json()["successful_results"]]
    assert len(set(files)) == 8 and all(Path(f).is_file() for f in files)
    assert sorted(read_stamp(f)["prompt"] for f in files[:4]) == ["s0", "s1", "s2", "s3"]


def test_a_failure_does_not_affect_other_items(service, emu):
    prompts = ["ok 0", "bad [[fail]]", "ok 2", "gone [[404]]", "ok 4"]
    body = batch(service, prompts).json()
    assert body["success"] is False and body["successful_count"] == 3 and body["failed_count"] == 2
    failed = {r["prompt_index"]: r for r in body["failed_results"]}
    assert set(failed) == {1, 3}
    assert "injected failure" in failed[1]["error"] and "404" in failed[3]["error"]
    assert all(f["prompt"] == prompts[i] for i, f in failed.items())
    folder = Path(body["successful_results"][0]["files"][0]).parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "flux_dev_0.json", "flux_dev_0.webp", "flux_dev_2.json", "flux_dev_2.webp",
        "flux_dev_4.json", "flux_dev_4.webp"]
