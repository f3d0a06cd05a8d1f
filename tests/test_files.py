"""Files and names: where files live, how long names may be, what provenance records keep,
default batch names, and the download URLs synchronous answers carry."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import requests

from gateway.config import Settings
from gateway.engine.files import STALE_PARTIAL_SECONDS, default_stems, describe_data_uri, remove_partials
from gateway.state import gateway_state
from replicate_emulator import read_stamp

from helpers import ADMIN, ROOT, USER_TOKEN, free_port, service_env, start, stop, wait_healthy

USER = {"X-Replicate-API-Key": USER_TOKEN}
OTHER = {"X-Replicate-API-Key": "r8_othertoken0000000000003"}


# -- 1. a relative OUTPUT_DIR ------------------------------------------------------------
def test_relative_output_dir_is_taken_from_the_working_directory():
    settings = Settings.from_mapping({"OUTPUT_DIR": "out"})
    assert settings.output_dir == os.path.join(os.getcwd(), "out")
    assert settings.jobs_db == os.path.join(os.getcwd(), "out", ".jobs.sqlite3")


@pytest.mark.parametrize("command", [["app.py"], ["-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]])
def test_relative_output_dir_serves_the_saved_file(emulator_server, emu, tmp_path, command):
    """Run from a folder that is not the project's: `/files/...` must serve the file written
    under `<cwd>/out`, not 500 (Flask resolves relative paths against the app's folder)."""
    port = free_port()
    command = [sys.executable] + [str(ROOT / c) if c.endswith(".py") else c for c in command]
    proc = start(command, service_env(emulator_server, tmp_path, port, OUTPUT_DIR="out"), tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        r = requests.post(f"{base}/generate", json={"model_name": "flux-dev", "prompt": "relative"},
                          headers=ADMIN, timeout=30)
        assert r.status_code == 200, r.text
        [path] = r.json()["files"]
        folder, name = Path(path).parts[-2:]
        on_disk = tmp_path / "out" / folder / name
        download = requests.get(f"{base}/files/{folder}/{name}", headers=ADMIN, timeout=10)
        assert download.status_code == 200 and download.content == on_disk.read_bytes()
        assert Path(path) == on_disk  # shown as the absolute path it was written to
        assert (tmp_path / "out" / ".jobs.sqlite3").is_file()  # the journal beside the files
    finally:
        stop(proc)


# -- 2. names measured in bytes ----------------------------------------------------------
def test_a_name_too_long_in_bytes_is_refused_before_anything_is_paid_for(service, emu):
    name = "猫" * 84  # 84 characters (under 128) but 252 bytes: 257 with ".webp"
    r = service.post("/generate", {"model_name": "flux-dev", "prompt": "x", "custom_filename": name}, ADMIN)
    assert r.status_code == 400 and r.json()["field"] == "custom_filename"
    assert "257 bytes" in r.json()["error"] and "255" in r.json()["error"]
    batch = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": ["a", "b"],
                                             "custom_filenames": ["fine", name]}, ADMIN)
    assert batch.status_code == 400 and batch.json()["field"] == "custom_filenames[1]"
    job = service.post("/jobs", {"model_name": "flux-dev", "prompt": "x", "custom_filename": name}, ADMIN)
    assert job.status_code == 400 and job.json()["field"] == "custom_filename"
    assert emu.stats()["counters"].get("create_attempts", 0) == 0
    assert not [p for p in Path(gateway_state(service.app).settings.output_dir).rglob("*") if p.is_file()
                and p.name != ".jobs.sqlite3" and not p.name.startswith(".jobs.sqlite3-")]


def test_the_output_number_counts_towards_the_limit(service, emu):
    name = "猫" * 83  # 249 bytes: 254 with ".webp" or ".json", 256 with "_4" as well
    refused = service.post("/generate", {"model_name": "flux-dev", "prompt": "x", "num_outputs": 4,
                                         "custom_filename": name}, ADMIN)
    assert refused.status_code == 400 and "'_4'" in refused.json()["error"]
    assert emu.stats()["counters"].get("create_attempts", 0) == 0
    r = service.post("/generate", {"model_name": "flux-dev", "prompt": "x", "custom_filename": name}, ADMIN)
    assert r.status_code == 200, r.json()  # the image and its provenance record both fit
    [path] = r.json()["files"]
    assert os.path.basename(path) == name + ".webp" and Path(path).with_suffix(".json").is_file()
    assert not list(Path(path).parent.glob(".part-*"))


# -- 3. provenance of data: inputs ---------------------------------------------------------
def test_provenance_records_a_data_uri_by_its_digest(service, emu):
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(200_000)
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    r = service.post("/generate-batch", {"model_name": "flux-kontext-max", "prompts": ["a", "b", "c"],
                                         "input_image": uri}, ADMIN)
    assert r.status_code == 200 and r.json()["successful_count"] == 3, r.json()
    assert emu.predictions()[0]["input"]["input_image"] == uri  # the upstream still gets the image
    for result in r.json()["successful_results"]:
        record = Path(result["files"][0]).with_suffix(".json")
        assert record.stat().st_size < 4096
        assert json.loads(record.read_text())["parameters"]["input_image"] == {
            "data_uri": True, "media_type": "image/png", "bytes": len(image),
            "sha256": hashlib.sha256(image).hexdigest()}


def test_a_data_uri_that_is_not_base64_is_described_by_its_text():
    text = "<svg xmlns='http://www.w3.org/2000/svg'/>"
    assert describe_data_uri("data:image/svg+xml," + text) == {
        "data_uri": True, "media_type": "image/svg+xml", "bytes": len(text),
        "sha256": hashlib.sha256(text.encode()).hexdigest()}
    assert describe_data_uri("https://example.com/a.png") == "https://example.com/a.png"
    assert describe_data_uri(42) == 42


# -- 4. default batch names --------------------------------------------------------------
@pytest.mark.parametrize("count,first,last", [(3, "flux_dev_0", "flux_dev_2"), (11, "flux_dev_00", "flux_dev_10")])
def test_default_batch_names_are_padded_to_the_largest_index(service, emu, count, first, last):
    r = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": [f"p{i}" for i in range(count)]},
                     ADMIN)
    names = [os.path.basename(res["files"][0]) for res in r.json()["successful_results"]]
    assert names[0] == first + ".webp" and names[-1] == last + ".webp" and len(names) == count
    assert default_stems("flux-dev", 100, batch=True)[::99] == ["flux_dev_00", "flux_dev_99"]


def test_readme_states_the_default_batch_names_the_code_makes():
    """Each README example "`x_0`…`x_4` for 5 prompts" matches the code, and the README
    shows default batch names nowhere else."""
    readme = (ROOT / "README.md").read_text()
    example = re.compile(r"`(\w+?)_(\d+)`…`\1_(\d+)` for (\d+)(?: prompts)?")
    found = example.findall(readme)
    assert len({int(n) for *_, n in found}) >= 2, found  # two widths shown
    for base, first, last, count in found:
        stems = default_stems(base.replace("_", "-"), int(count), batch=True)
        assert (stems[0], stems[-1]) == (f"{base}_{first}", f"{base}_{last}")
    assert not re.findall(r"flux_dev_\d", example.sub("", readme))


# -- 5. download URLs and the job id in synchronous answers ---------------------------------
def _downloads_match(service, files, urls, headers):
    assert len(urls) == len(files) > 0
    for path, url in zip(files, urls, strict=True):
        assert url == f"/files/{Path(path).parent.name}/{Path(path).name}"
        r = service.get(url, headers=headers)
        assert r.status_code == 200 and r.content == Path(path).read_bytes()
        assert service.get(url, headers=OTHER).status_code == 404


def test_generate_answers_download_urls_and_its_job(service, emu):
    body = service.post("/generate", {"model_name": "flux-dev", "prompt": "remote", "num_outputs": 2},
                        USER).json()
    _downloads_match(service, body["files"], body["urls"], USER)
    job = service.get(f"/jobs/{body['job_id']}", headers=USER).json()
    assert job["status"] == "succeeded" and job["items"][0]["urls"] == body["urls"]
    assert job["items"][0]["prediction_id"] == body["prediction_id"]
    assert service.get(f"/jobs/{body['job_id']}", headers=OTHER).status_code == 404


def test_generate_batch_answers_download_urls_and_its_job(service, emu):
    body = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": ["one", "two [[fail]]", "three"],
                                            "custom_filenames": ["one", "two", "three"]}, USER).json()
    assert body["successful_count"] == 2
    for result in body["successful_results"]:
        _downloads_match(service, result["files"], result["urls"], USER)
        assert read_stamp(service.get(result["urls"][0], headers=USER).content)["prompt"] == result["prompt"]
    job = service.get(f"/jobs/{body['job_id']}", headers=USER).json()
    assert job["status"] == "partial" and [i["urls"] for i in job["items"] if i["urls"]] == [
        r["urls"] for r in body["successful_results"]]


# -- partial downloads: a crash's are removed, a sibling worker's are not ---------------------
def test_only_stale_partial_downloads_are_removed(tmp_path):
    """Workers (and replicas) share OUTPUT_DIR: one that starts must not delete a download
    another is writing (its item would fail), only what a crashed process left."""
    folder = tmp_path / "20260101-000000-abcd1234"
    folder.mkdir()
    stale, fresh, placed = folder / ".part-left", folder / ".part-writing", folder / "a.webp"
    for path in (stale, fresh, placed):
        path.write_bytes(b"x")
    now = 1_000_000.0
    os.utime(stale, (now - STALE_PARTIAL_SECONDS - 1,) * 2)
    os.utime(fresh, (now - 5,) * 2)
    assert remove_partials(str(tmp_path), now=lambda: now) == 1
    assert not stale.exists() and fresh.exists() and placed.exists()


def test_a_starting_service_leaves_a_download_in_progress_alone(make_service, tmp_path, emu):
    folder = tmp_path / "output" / "20260101-000000-abcd1234"
    folder.mkdir(parents=True)
    crashed, writing = folder / ".part-crashed", folder / ".part-writing"
    crashed.write_bytes(b"x")
    writing.write_bytes(b"x")
    os.utime(crashed, (os.path.getmtime(crashed) - STALE_PARTIAL_SECONDS - 60,) * 2)
    make_service()  # start(app) runs, as in a gunicorn worker that boots beside busy ones
    assert not crashed.exists() and writing.exists()
