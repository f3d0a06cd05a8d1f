"""The emulator behaves like Replicate for the official client and for raw HTTP."""
from __future__ import annotations

import io
import random
import subprocess
import sys
import time

import pytest
import replicate
import requests
from PIL import Image

from replicate_emulator import Faults, read_stamp
from replicate_emulator.control_client import EmulatorControl, max_in_window
from replicate_emulator.images import dimensions

from helpers import free_port, wait_for

MODELS = {
    "black-forest-labs/flux-dev": {"prompt": "a red car", "aspect_ratio": "16:9", "output_format": "jpg"},
    "black-forest-labs/flux-kontext-max": {"prompt": "make it blue", "input_image": "https://example.com/a.png",
                                           "aspect_ratio": "4:3"},
    "qwen/qwen-image": {"prompt": "一只猫", "aspect_ratio": "9:16", "output_format": "png"},
}


def client(emulator_server, token="r8_emulatortest0001") -> replicate.Client:
    return replicate.Client(api_token=token, base_url=emulator_server.url)


def fetch(url: str) -> bytes:
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return response.content


@pytest.mark.parametrize("model", MODELS)
def test_official_client_runs_each_model(emulator_server, emu, model):
    c = client(emulator_server)
    inputs = MODELS[model]
    output = c.run(model, input=inputs)
    urls = [output] if isinstance(output, str) else list(output)
    assert len(urls) == 1
    assert isinstance(output, str) == (model.endswith("kontext-max"))
    stamp = read_stamp(fetch(str(urls[0])))
    assert stamp["prompt"] == inputs["prompt"] and stamp["model"] == model

    created = c.models.predictions.create(model=model, input=inputs, wait=5)
    assert created.status == "succeeded" and created.version == "hidden"
    fetched = c.predictions.get(created.id)
    assert fetched.output == created.output and fetched.metrics["predict_time"] >= 0

    emu.set_faults(latency_s=30)
    running = c.models.predictions.create(model=model, input=inputs)
    assert running.status in ("starting", "processing")
    c.predictions.cancel(running.id)
    assert c.predictions.get(running.id).status == "canceled"
    assert emu.stats()["canceled_ids"] == [running.id]


def test_injected_failure_raises_model_error(emulator_server, emu):
    c = client(emulator_server)
    with pytest.raises(replicate.exceptions.ModelError, match="injected failure"):
        c.run("black-forest-labs/flux-dev", input={"prompt": "x [[fail]]"})
    emu.set_faults(fail_rate=1.0)
    with pytest.raises(replicate.exceptions.ModelError):
        c.run("qwen/qwen-image", input={"prompt": "plain"})
    emu.set_faults(fail_rate=0.0)
    assert c.run("qwen/qwen-image", input={"prompt": "plain"})


def test_bad_input_is_422_with_invalid_fields(emulator_server, emu):
    c = client(emulator_server)
    with pytest.raises(replicate.exceptions.ReplicateError) as info:
        c.run("black-forest-labs/flux-dev", input={"prompt": "x", "output_format": "gif"})
    assert info.value.status == 422
    raw = requests.post(f"{emulator_server.url}/v1/models/qwen/qwen-image/predictions",
                        headers={"Authorization": "Bearer t"},
                        json={"input": {"prompt": "x", "num_inference_steps": 100, "typo": 1}})
    body = raw.json()
    assert raw.status_code == 422 and raw.headers["Content-Type"].startswith("application/problem+json")
    assert {f["type"] for f in body["invalid_fields"]} == {"number_lte", "additional_property_not_allowed"}
    missing = requests.post(f"{emulator_server.url}/v1/models/qwen/qwen-image/predictions",
                            headers={"Authorization": "Bearer t"}, json={"input": {}}).json()
    assert missing["invalid_fields"][0]["type"] == "required"


def test_tokens_rejected_or_out_of_credit(emulator_server, emu):
    emu.set_token("bad-token", "invalid")
    with pytest.raises(replicate.exceptions.ReplicateError) as info:
        client(emulator_server, "bad-token").run("qwen/qwen-image", input={"prompt": "x"})
    assert info.value.status == 401
    emu.set_token("poor-token", "no_credit")
    with pytest.raises(replicate.exceptions.ReplicateError) as info:
        client(emulator_server, "poor-token").run("qwen/qwen-image", input={"prompt": "x"})
    assert info.value.status == 402
    anonymous = requests.get(f"{emulator_server.url}/v1/predictions")
    assert anonymous.status_code == 401 and anonymous.json()["title"] == "Unauthenticated"


def test_create_limit_answers_429_with_retry_after(emulator_server, emu):
    emu.set_faults(create_limit=3, window_s=30)
    c = client(emulator_server)
    for _ in range(3):
        c.models.predictions.create(model="qwen/qwen-image", input={"prompt": "x"})
    with pytest.raises(replicate.exceptions.ReplicateError) as info:
        c.models.predictions.create(model="qwen/qwen-image", input={"prompt": "x"})
    assert info.value.status == 429
    raw = requests.post(f"{emulator_server.url}/v1/models/qwen/qwen-image/predictions",
                        headers={"Authorization": "Bearer r8_emulatortest0001"}, json={"input": {"prompt": "x"}})
    assert raw.status_code == 429 and 1 <= int(raw.headers["Retry-After"]) <= 30
    assert raw.json()["retry_after"] == int(raw.headers["Retry-After"])
    other = client(emulator_server, "another-account")  # the limit is per token
    other.models.predictions.create(model="qwen/qwen-image", input={"prompt": "x"})
    stats = emu.stats()
    assert stats["by_token"]["r8_emulatortest0001"]["throttled"] == 2
    assert stats["by_token"]["r8_emulatortest0001"]["creates"] == 3


def test_low_credit_mode_sends_retry_after_in_body_only(emulator_server, emu):
    emu.set_token("low", "low_credit")
    url = f"{emulator_server.url}/v1/models/qwen/qwen-image/predictions"
    first = requests.post(url, headers={"Authorization": "Bearer low"}, json={"input": {"prompt": "x"}})
    second = requests.post(url, headers={"Authorization": "Bearer low"}, json={"input": {"prompt": "x"}})
    assert first.status_code == 201 and second.status_code == 429
    assert "Retry-After" not in second.headers and second.json()["retry_after"] >= 1


def test_other_calls_have_their_own_limit(emulator_server, emu):
    emu.set_faults(other_limit=2, window_s=30)
    headers = {"Authorization": "Bearer r"}
    codes = [requests.get(f"{emulator_server.url}/v1/models/qwen/qwen-image", headers=headers).status_code
             for _ in range(3)]
    assert codes == [200, 200, 429]


@pytest.mark.parametrize("fmt,ratio", [("webp", "1:1"), ("jpg", "16:9"), ("png", "9:21"), ("webp", "3:2")])
def test_outputs_are_images_of_the_asked_format_and_ratio(emulator_server, emu, fmt, ratio):
    c = client(emulator_server)
    urls = c.run("black-forest-labs/flux-dev", input={"prompt": f"p {fmt}", "aspect_ratio": ratio,
                                                      "output_format": fmt, "num_outputs": 2})
    assert len(urls) == 2
    for index, url in enumerate(urls):
        image = Image.open(io.BytesIO(fetch(str(url))))
        assert image.format == {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}[fmt]
        w, h = (int(x) for x in ratio.split(":"))
        assert image.size == dimensions(ratio) and abs(image.size[0] / image.size[1] - w / h) < 0.02
        assert read_stamp(fetch(str(url)))["index"] == index


def test_outputs_differ_by_prompt_and_repeat_by_seed(emulator_server, emu):
    c = client(emulator_server)
    def image(prompt, seed):
        return fetch(str(c.run("black-forest-labs/flux-dev", input={"prompt": prompt, "seed": seed})[0]))
    assert image("a cat", 7) == image("a cat", 7)
    assert image("a cat", 7) != image("a dog", 7)
    assert read_stamp(image("a dog", 7))["prompt"] == "a dog"


def test_prefer_wait_returns_the_prediction_as_it_stands(emulator_server, emu):
    emu.set_faults(latency_s=5)
    url = f"{emulator_server.url}/v1/models/qwen/qwen-image/predictions"
    answer = requests.post(url, headers={"Authorization": "Bearer w", "Prefer": "wait=1"},
                           json={"input": {"prompt": "slow"}})
    body = answer.json()
    assert answer.status_code == 201 and answer.headers["Preference-Applied"] == "wait=1"
    assert body["status"] in ("starting", "processing") and body["output"] is None
    emu.set_faults(latency_s=0.05)
    done = requests.post(url, headers={"Authorization": "Bearer w", "Prefer": "wait"},
                         json={"input": {"prompt": "fast"}})
    assert done.headers["Preference-Applied"] == "wait" and done.json()["status"] == "succeeded"


def test_lifecycle_fields(emulator_server, emu):
    emu.set_faults(latency_s=0.6, start_delay_s=0.3)
    c = client(emulator_server)
    p = c.models.predictions.create(model="black-forest-labs/flux-dev", input={"prompt": "x"})
    seen = {p.status}

    def final():
        latest = c.predictions.get(p.id)
        seen.add(latest.status)
        return latest if latest.status in ("succeeded", "failed", "canceled") else None
    p = wait_for(final, seconds=20, step=0.05)
    assert seen == {"starting", "processing", "succeeded"}
    raw = requests.get(p.urls["get"], headers={"Authorization": "Bearer r8_emulatortest0001"}).json()
    for field in ("id", "model", "version", "input", "output", "data_removed", "error", "status",
                  "created_at", "urls", "started_at", "completed_at", "logs", "metrics"):
        assert field in raw
    assert raw["data_removed"] is False and "Using seed" in raw["logs"]
    assert set(raw["urls"]) >= {"get", "cancel", "web"} and all(raw["urls"].values())


def test_outputs_expire(emulator_server, emu):
    emu.set_faults(output_ttl_s=0.3)
    c = client(emulator_server)
    p = c.models.predictions.create(model="black-forest-labs/flux-dev", input={"prompt": "x"}, wait=5)
    assert requests.get(p.output[0]).status_code == 200
    time.sleep(0.5)
    assert requests.get(p.output[0]).status_code == 404
    later = requests.get(p.urls["get"], headers={"Authorization": "Bearer r8_emulatortest0001"}).json()
    assert later["output"] is None and later["data_removed"] is True


def test_cancel_after_aborts_or_cancels(emulator_server, emu):
    emu.set_faults(cancel_after_min_s=0.1, start_delay_s=5, latency_s=10)
    url = f"{emulator_server.url}/v1/models/qwen/qwen-image/predictions"
    headers = {"Authorization": "Bearer ca", "Cancel-After": "0.2s"}
    waiting = requests.post(url, headers=headers, json={"input": {"prompt": "x"}}).json()
    emu.set_faults(start_delay_s=0)
    running = requests.post(url, headers=headers, json={"input": {"prompt": "x"}}).json()
    time.sleep(0.5)

    def get(p):
        return requests.get(p["urls"]["get"], headers={"Authorization": "Bearer ca"}).json()["status"]
    assert get(waiting) == "aborted" and get(running) == "canceled"
    emu.set_faults(cancel_after_min_s=5)
    refused = requests.post(url, headers=headers, json={"input": {"prompt": "x"}})
    assert refused.status_code == 400


def test_create_by_version_and_model_metadata(emulator_server, emu):
    c = client(emulator_server)
    model = c.models.get("black-forest-labs/flux-kontext-max")
    schema = model.latest_version.openapi_schema["components"]["schemas"]["Input"]
    assert schema["properties"]["output_format"]["enum"] == ["png", "jpg"]
    for version in ("qwen/qwen-image", f"qwen/qwen-image:{c.models.get('qwen/qwen-image').latest_version.id}",
                    c.models.get("qwen/qwen-image").latest_version.id):
        p = c.predictions.create(version=version, input={"prompt": "v"})
        assert p.model == "qwen/qwen-image"
    bad = requests.post(f"{emulator_server.url}/v1/predictions", headers={"Authorization": "Bearer v"},
                        json={"version": "nobody/nothing", "input": {"prompt": "x"}})
    assert bad.status_code == 404


def test_file_upload_and_listing(emulator_server, emu, tmp_path):
    c = client(emulator_server)
    path = tmp_path / "in.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)
    uploaded = c.files.create(path)
    assert uploaded.size == 40
    got = requests.get(uploaded.urls["get"], headers={"Authorization": "Bearer r8_emulatortest0001"})
    assert got.content == path.read_bytes()
    for n in range(105):
        c.models.predictions.create(model="qwen/qwen-image", input={"prompt": f"n{n}"})
    page = c.predictions.list()
    assert len(page.results) == 100 and page.results[0].input["prompt"] == "n104" and page.next
    rest = c.predictions.list(page.next)
    assert len(rest.results) == 5 and rest.next is None


def test_outputs_are_made_while_the_prediction_runs(emulator_server, emu):
    """As on Replicate, a succeeded prediction's files exist already: a download only reads
    them. The output is shown only once the prediction has succeeded."""
    emu.set_faults(latency_s=0.6)
    c = client(emulator_server)
    p = c.models.predictions.create(model="black-forest-labs/flux-dev", input={"prompt": "made"})
    running = wait_for(lambda: (latest := c.predictions.get(p.id)).status == "processing" and latest)
    assert running.output is None
    done = wait_for(lambda: (latest := c.predictions.get(p.id)).status == "succeeded" and latest, seconds=20)
    assert emu.stats()["counters"]["rendered_while_running"] == 1
    assert read_stamp(fetch(done.output[0]))["prompt"] == "made"
    assert "rendered_on_download" not in emu.stats()["counters"]
    # An output seen before the end (a model streaming its files) is made on first download.
    early = c.models.predictions.create(model="black-forest-labs/flux-dev",
                                        input={"prompt": "early [[early_output]]"}, wait=10)
    assert read_stamp(fetch(early.output[0]))["prompt"] == "early [[early_output]]"
    assert emu.stats()["counters"]["rendered_on_download"] == 1


def test_statistics(emulator_server, emu):
    emu.set_faults(latency_s=0.3)
    a, b = client(emulator_server, "tok-a"), client(emulator_server, "tok-b")
    made = [a.models.predictions.create(model="qwen/qwen-image", input={"prompt": "x"}) for _ in range(3)]
    made.append(b.models.predictions.create(model="qwen/qwen-image", input={"prompt": "x"}))
    a.predictions.get(made[0].id)
    a.predictions.cancel(made[1].id)
    stats = emu.stats()
    assert stats["by_token"]["tok-a"]["creates"] == 3 and stats["by_token"]["tok-b"]["creates"] == 1
    assert stats["max_in_flight"] == 4 and stats["max_in_flight_by_token"] == {"tok-a": 3, "tok-b": 1}
    assert len(stats["create_times"]["tok-a"]) == 3 and stats["by_token"]["tok-a"]["polls"] == 1
    assert stats["canceled_ids"] == [made[1].id]
    assert max_in_window(stats["create_times"]["tok-a"], 60) == 3


def test_faults_reject_bad_values(emulator_server, emu):
    response = requests.patch(f"{emulator_server.url}/_emulator/faults", json={"fail_rate": 2})
    assert response.status_code == 400
    response = requests.patch(f"{emulator_server.url}/_emulator/faults", json={"nonsense": 1})
    assert response.status_code == 400 and "unknown fault setting" in response.json()["detail"]


def test_latency_distributions():
    rng = random.Random(1)
    fixed = Faults(latency="fixed", latency_s=2)
    assert {fixed.sample_latency(rng) for _ in range(5)} == {2}
    uniform = Faults(latency="uniform", latency_min_s=1, latency_max_s=3)
    samples = [uniform.sample_latency(rng) for _ in range(500)]
    assert 1 <= min(samples) < 1.1 and 2.9 < max(samples) <= 3
    tail = Faults(latency="longtail", latency_s=1, latency_sigma=1, latency_max_s=60)
    samples = sorted(tail.sample_latency(rng) for _ in range(2000))
    assert 0.8 < samples[1000] < 1.25 and samples[1980] > 5 * samples[1000]


def raw_create(emulator_server, prompt="x", token="f", wait=5):
    return requests.post(f"{emulator_server.url}/v1/models/qwen/qwen-image/predictions",
                         headers={"Authorization": f"Bearer {token}", "Prefer": f"wait={wait}"},
                         json={"input": {"prompt": prompt}}, timeout=10)


@pytest.mark.parametrize("setting,marker", [("create_5xx_rate", "[[5xx]]"), ("create_429_rate", "[[429]]")])
def test_create_error_faults_switch_on_and_off(emulator_server, emu, setting, marker):
    emu.set_faults(**{setting: 1.0})
    on = raw_create(emulator_server)
    emu.set_faults(**{setting: 0.0})
    off = raw_create(emulator_server)
    by_marker = raw_create(emulator_server, f"x {marker}")
    expected = (500, 502, 503) if setting == "create_5xx_rate" else (429,)
    assert on.status_code in expected and by_marker.status_code in expected and off.status_code == 201
    if setting == "create_429_rate":
        assert on.headers["Retry-After"] == "1" and on.json()["retry_after"] == 1


def test_dropped_connection_after_create(emulator_server, emu):
    emu.set_faults(drop_rate=1.0)
    with pytest.raises(requests.ConnectionError):
        raw_create(emulator_server)
    emu.set_faults(drop_rate=0.0)
    assert raw_create(emulator_server).status_code == 201
    stats = emu.stats()
    assert stats["counters"]["dropped"] == 1 and stats["counters"]["creates"] == 2  # the dropped one exists


def test_hanging_predictions(emulator_server, emu):
    emu.set_faults(hang_rate=1.0)
    hung = raw_create(emulator_server, wait=1).json()
    emu.set_faults(hang_rate=0.0)
    assert raw_create(emulator_server).json()["status"] == "succeeded"
    assert raw_create(emulator_server, "x [[hang]]", wait=1).json()["status"] == "processing"
    assert hung["status"] == "processing"


def test_output_404_truncation_and_slow_downloads(emulator_server, emu):
    emu.set_faults(output_404_rate=1.0)
    missing = raw_create(emulator_server).json()["output"][0]
    emu.set_faults(output_404_rate=0.0, truncate_rate=1.0)
    whole = raw_create(emulator_server).json()["output"][0]
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _ = requests.get(whole).content  # truncation is decided per download
    emu.set_faults(truncate_rate=0.0)
    assert read_stamp(fetch(whole))
    marked = raw_create(emulator_server, "x [[truncate]]").json()["output"][0]
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _ = requests.get(marked).content  # a marked file is cut short every time
    assert requests.get(missing).status_code == 404
    size = len(fetch(whole))
    emu.set_faults(download_bytes_per_s=size * 2)
    started = time.monotonic()
    assert fetch(whole)
    # A lower bound the throttle itself guarantees (not a speed claim): half a second.
    assert time.monotonic() - started >= 0.4


def test_markers_set_latency(emulator_server, emu):
    p = raw_create(emulator_server, "x [[latency=0.3]]").json()
    assert p["metrics"]["predict_time"] >= 0.3


def faults_once_up(control: EmulatorControl) -> dict:
    """The emulator process's faults, once it answers (it has about ten seconds)."""
    def faults() -> dict | None:
        try:
            return control.faults()
        except requests.ConnectionError:
            return None
    return wait_for(faults, seconds=10, step=0.1, message="the emulator never answered")


def test_command_line_start(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "replicate_emulator", "--port", str(port),
                             "--set", "latency_s=0.01", "--set", "fail_rate=0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        faults = faults_once_up(EmulatorControl(f"http://127.0.0.1:{port}"))
        assert faults["latency_s"] == 0.01 and faults["fail_rate"] == 0.5
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "replicate_emulator", "--set", "fail_rate=7"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "fail_rate" in bad.stderr


def test_a_thousand_open_waits(tmp_path):
    """1000 `Prefer: wait` creates held open at once against an emulator process."""
    import asyncio

    import aiohttp
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "replicate_emulator", "--port", str(port),
                             "--set", "latency_s=3", "--set", "create_limit=5000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    control = EmulatorControl(base)
    try:
        faults_once_up(control)

        async def main():
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                async def one(i):
                    async with session.post(f"{base}/v1/models/qwen/qwen-image/predictions",
                                            headers={"Authorization": "Bearer many", "Prefer": "wait=30"},
                                            json={"input": {"prompt": f"p{i}"}}) as r:
                        return r.status, (await r.json())["status"]
                return await asyncio.gather(*(one(i) for i in range(1000)))

        answers = asyncio.run(main())
        assert answers == [(201, "succeeded")] * 1000
        assert control.stats()["max_in_flight"] == 1000
    finally:
        proc.terminate()
        proc.wait(10)
