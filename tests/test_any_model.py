"""Any Replicate model, end to end over HTTP against the emulator: an official model by name,
a community model by version, a deployment, video, object and text outputs; validation
against each model's own published schema before anything is created; the schema cache
(once per model under concurrency, again after MODEL_SCHEMA_TTL, nothing after a restart);
ALLOWED_MODELS, MODELS_FILE aliases and discovery."""
from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from gateway.app import create_app
from gateway.config import ConfigError
from replicate_emulator import read_stamp
from replicate_emulator.catalog import MODELS, SDXL_OLD_VERSION, SDXL_VERSION

from helpers import (
    ADMIN,
    GUNICORN,
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

USER = {"X-Replicate-API-Key": USER_TOKEN}
SCHNELL = "black-forest-labs/flux-schnell"
SDXL = f"stability-ai/sdxl:{SDXL_VERSION}"
DEPLOYMENT = "deployments/acme/image-gen"
PHOTO = "https://example.com/photo.png"


def creates(emu) -> int:
    return emu.stats()["counters"].get("create_attempts", 0)


class CountingProxy:
    """A pass-through in front of the emulator that counts every call by method and path,
    so a test can see which reads the service made upstream (the emulator counts creates)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.calls: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._http = requests.Session()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def gets(self, path: str) -> int:
        with self._lock:
            return self.calls[("GET", path)]

    def total(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def schema_reads(self) -> int:
        """GETs of models, versions and deployments: what the service reads to validate."""
        with self._lock:
            return sum(n for (method, path), n in self.calls.items()
                       if method == "GET" and path.startswith(("/v1/models/", "/v1/deployments/")))

    def _app(self, environ, start_response):
        incoming = Request(environ)
        with self._lock:
            self.calls[(incoming.method, incoming.path)] += 1
        query = environ.get("QUERY_STRING")
        answer = self._http.request(
            incoming.method, self.target + incoming.path + (f"?{query}" if query else ""),
            headers={k: v for k, v in incoming.headers.items() if k.lower() not in ("host", "content-length")},
            data=incoming.get_data(), timeout=120)
        kept = [(k, v) for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection")]
        return Response(answer.content, answer.status_code, kept)(environ, start_response)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)


@pytest.fixture
def proxy(emulator_server, emu):
    counting = CountingProxy(emulator_server.url)
    yield counting
    counting.stop()


def generate(service, body: dict, headers: dict | None = None) -> requests.Response:
    return service.post("/generate", body, headers or ADMIN)


def names(files: list[str]) -> list[str]:
    return [Path(f).name for f in files]


# -- each kind of reference generates and saves ---------------------------------------------

def test_an_official_model_by_name_generates_and_saves(service, emu):
    r = generate(service, {"model_name": SCHNELL, "prompt": "a fox", "num_outputs": 2, "output_format": "png",
                           "custom_filename": "fox"})
    body = r.json()
    assert r.status_code == 200, body
    assert body["model_name"] == SCHNELL and names(body["files"]) == ["fox_1.png", "fox_2.png"]
    [made] = emu.predictions()
    assert made["model"] == SCHNELL and made["deployment"] is None and made["input"]["num_outputs"] == 2
    assert read_stamp(body["files"][1])["prompt"] == "a fox"
    record = json.loads(Path(body["files"][0]).with_suffix(".json").read_text())
    assert record["model"] == SCHNELL and record["prediction_id"] == body["prediction_id"]


def test_a_community_model_by_version_generates_and_saves(service, emu):
    r = service.post("/generate-batch", {"model_name": SDXL, "prompts": ["a red car", "a blue boat"],
                                         "custom_filenames": ["car", "boat"], "width": 512, "height": 768,
                                         "scheduler": "KarrasDPM"}, ADMIN)
    body = r.json()
    assert r.status_code == 200 and body["successful_count"] == 2, body
    assert [names(x["files"]) for x in body["successful_results"]] == [["car.png"], ["boat.png"]]
    made = sorted(emu.predictions(), key=lambda p: p["input"]["prompt"])
    assert [p["version"] for p in made] == [SDXL_VERSION] * 2  # run by version: POST /v1/predictions
    assert made[0]["input"] == {"prompt": "a blue boat", "width": 512, "height": 768, "scheduler": "KarrasDPM"}
    assert read_stamp(body["successful_results"][0]["files"][0])["aspect_ratio"] == "512:768"


def test_a_deployment_generates_and_saves(service, emu):
    r = generate(service, {"model_name": DEPLOYMENT, "prompt": "a lighthouse", "num_outputs": 2})
    body = r.json()
    assert r.status_code == 200, body
    assert names(body["files"]) == ["image_gen_1.png", "image_gen_2.png"]  # default name: the deployment's
    [made] = emu.predictions()
    assert made["deployment"] == "acme/image-gen" and made["version"] == SDXL_VERSION


def test_a_video_model_saves_an_mp4(service, emu):
    r = generate(service, {"model_name": "acme/video-gen", "prompt": "waves", "duration": 3, "fps": 30,
                           "custom_filename": "clip"})
    body = r.json()
    assert r.status_code == 200, body
    assert names(body["files"]) == ["clip.mp4"]
    head = Path(body["files"][0]).read_bytes()[:12]
    assert head[4:8] == b"ftyp"
    assert read_stamp(body["files"][0])["duration"] == 3


def test_an_object_output_saves_each_file_under_its_key(service, emu):
    """A model without a `prompt` input takes the prompt in its first required input (here
    `image`), and an object output's files are named `<name>_<key>`."""
    r = generate(service, {"model_name": "acme/background-remover", "prompt": PHOTO, "threshold": 0.5,
                           "custom_filename": "cut"})
    body = r.json()
    assert r.status_code == 200, body
    assert names(body["files"]) == ["cut_cut_image.png", "cut_mask.png"]
    assert emu.predictions()[0]["input"] == {"image": PHOTO, "threshold": 0.5}
    assert [read_stamp(f)["key"] for f in body["files"]] == ["cut_image", "mask"]


def test_audio_and_text_outputs(service, emu):
    speech = generate(service, {"model_name": "acme/tts", "prompt": "hello there", "voice": "nova"}).json()
    assert names(speech["files"]) == ["tts.wav"] and emu.predictions()[0]["input"]["text"] == "hello there"
    text = generate(service, {"model_name": "acme/text-gen", "prompt": "a haiku", "max_tokens": 20,
                              "custom_filename": "poem"})
    answer = text.json()
    assert text.status_code == 200 and answer["files"] == [] and answer["count"] == 0, answer
    assert isinstance(answer["output"], str) and answer["output"]
    folder = Path(service.app.extensions["gateway"].settings.output_dir)
    [record] = list(folder.glob("*/poem.json"))
    assert json.loads(record.read_text())["output"] == answer["output"]


def test_a_job_runs_any_model(service, emu):
    r = service.post("/jobs", {"model_name": SDXL, "prompts": ["one", "two"], "num_outputs": 2}, ADMIN)
    assert r.status_code == 202, r.json()
    job = finished_job(service.get, r.json()["job_id"])
    assert job["status"] == "succeeded" and job["model_name"] == SDXL
    assert [names(i["files"]) for i in job["items"]] == [["sdxl_0_1.png", "sdxl_0_2.png"],
                                                         ["sdxl_1_1.png", "sdxl_1_2.png"]]


def test_a_restarted_service_resumes_a_job_whose_prompt_fills_another_input(emulator_server, emu, tmp_path):
    """Killed with one prediction made and two never created; the next process creates
    those two as the first was: the prompt in the model's `text` input (from the kept schema)."""
    emu.set_faults(latency_s=2.0)
    port = free_port()
    env = service_env(emulator_server, tmp_path, port, REPLICATE_CONCURRENT_LIMIT="1",
                      REPLICATE_PREFER_WAIT_SECONDS="1", JOBS_DB=str(tmp_path / "jobs.sqlite3"))
    command, base = [sys.executable, *GUNICORN], f"http://127.0.0.1:{port}"
    first = start(command, env, tmp_path)
    try:
        wait_healthy(base, first)
        job_id = requests.post(f"{base}/jobs", json={"model_name": "acme/tts", "prompts": ["one", "two", "three"]},
                               headers=ADMIN, timeout=10).json()["job_id"]
        wait_for(lambda: len(emu.predictions()) >= 1, seconds=10)
        time.sleep(1.3)  # past the 1 s wait: the first prediction's id is journaled
    finally:
        for pid in children(first.pid) + [first.pid]:
            os.kill(pid, signal.SIGKILL)
        first.wait(10)
    assert len(emu.predictions()) == 1
    second = start(command, env, tmp_path)
    try:
        wait_healthy(base, second)
        job = finished_job(lambda path, **kwargs: requests.get(base + path, timeout=10, **kwargs), job_id)
    finally:
        stop(second)
    assert job["status"] == "succeeded", [i["error"] for i in job["items"] if i["error"]]
    assert sorted(p["input"]["text"] for p in emu.predictions()) == ["one", "three", "two"]
    assert all("prompt" not in p["input"] for p in emu.predictions())
    assert [names(i["files"]) for i in job["items"]] == [["tts_0.wav"], ["tts_1.wav"], ["tts_2.wav"]]


# -- validation against each model's own schema -------------------------------------------------

BAD_INPUTS = {
    SCHNELL: [("num_inference_steps", 5, "from 1 to 4"), ("aspect_ratio", "7:3", "'16:9'"),
              ("num_outputs", "2", "a whole number"), ("go_fast", 1, "true or false")],
    SDXL: [("num_inference_steps", 501, "from 1 to 500"), ("scheduler", "Bogus", "'K_EULER'"),
           ("width", "wide", "a whole number"), ("guidance_scale", 0.5, "from 1 to 50")],
    DEPLOYMENT: [("height", 4096, "from 256 to 2048"), ("refine", "sharp", "'no_refiner'"),
                 ("seed", 1.5, "a whole number"), ("negative_prompt", ["x"], "a string")],
}


@pytest.mark.parametrize("model,field,value,allowed",
                         [(m, *case) for m, cases in BAD_INPUTS.items() for case in cases],
                         ids=lambda v: str(v)[:24])
def test_a_bad_value_is_a_400_naming_the_field_and_what_is_allowed(service, emu, model, field, value, allowed):
    r = generate(service, {"model_name": model, "prompt": "x", field: value})
    body = r.json()
    assert r.status_code == 400 and body["field"] == field, body
    assert body["error"].startswith(f"Invalid value for '{field}': ") and allowed in body["allowed"], body
    assert allowed in body["error"]
    assert creates(emu) == 0


@pytest.mark.parametrize("model", [SCHNELL, SDXL, DEPLOYMENT])
def test_an_unknown_field_is_refused_with_the_accepted_ones(service, emu, model):
    r = generate(service, {"model_name": model, "prompt": "x", "steps": 4})
    body = r.json()
    assert r.status_code == 400 and "'steps'" in body["error"], body
    assert "num_inference_steps" in body["allowed_fields"] and "steps" not in body["allowed_fields"]
    assert creates(emu) == 0


def test_a_pinned_version_is_validated_against_that_version(service, emu):
    """The older SDXL version stops at 1024 px and has no KarrasDPM; the newer takes both."""
    old = f"stability-ai/sdxl:{SDXL_OLD_VERSION}"
    wide = generate(service, {"model_name": old, "prompt": "x", "width": 2048})
    assert wide.status_code == 400 and "from 256 to 1024" in wide.json()["error"]
    karras = generate(service, {"model_name": old, "prompt": "x", "scheduler": "KarrasDPM"})
    assert karras.status_code == 400 and karras.json()["field"] == "scheduler"
    refine = generate(service, {"model_name": old, "prompt": "x", "refine": "no_refiner"})
    assert refine.status_code == 400 and "'refine'" in refine.json()["error"]
    assert creates(emu) == 0
    assert generate(service, {"model_name": SDXL, "prompt": "x", "width": 2048, "height": 256}).status_code == 200


def test_a_prompt_that_fills_a_uri_input_must_be_a_url(service, emu):
    r = generate(service, {"model_name": "acme/background-remover", "prompt": "/etc/passwd"})
    assert r.status_code == 400 and r.json()["field"] == "prompt" and "URL" in r.json()["error"]
    assert creates(emu) == 0


def test_curated_rules_apply_on_top_of_the_fetched_schema(service, emu):
    """kontext's published schema takes safety_tolerance 0..6; the curated rule (at most 2,
    with the input image this service requires) still decides once the schema is at hand,
    and by version."""
    assert service.get("/models/black-forest-labs/flux-kontext-max").status_code == 401  # costs a read
    described = service.get("/models/black-forest-labs/flux-kontext-max", headers=ADMIN).json()
    assert described["parameters"]["safety_tolerance"]["allowed"] == "a whole number from 0 to 2"
    assert described["parameters"]["aspect_ratio"]["default"] == "match_input_image"
    seed = generate(service, {"model_name": "flux-kontext-max", "prompt": "p", "input_image": PHOTO, "seed": None})
    assert seed.status_code == 400 and seed.json()["field"] == "seed"  # the schema's rule: not nullable
    kontext_version = MODELS["black-forest-labs/flux-kontext-max"].latest.id
    for name in ("flux-kontext-max", f"black-forest-labs/flux-kontext-max:{kontext_version}"):
        r = generate(service, {"model_name": name, "prompt": "p", "input_image": PHOTO, "safety_tolerance": 4})
        assert r.status_code == 400 and "from 0 to 2" in r.json()["allowed"], (name, r.json())
        missing = generate(service, {"model_name": name, "prompt": "p"})
        assert missing.status_code == 400 and missing.json()["field"] == "input_image", (name, missing.json())
    assert creates(emu) == 0


# -- the schema cache -------------------------------------------------------------------------

def test_the_schema_is_fetched_once_for_fifty_concurrent_first_requests(make_service, emu, proxy):
    service = make_service(REPLICATE_BASE_URL=proxy.url, MODEL_SCHEMA_TTL=3)
    model_path = f"/v1/models/{SCHNELL}"
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda i: generate(service, {"model_name": SCHNELL, "prompt": f"p{i}"}), range(50)))
    assert [a.status_code for a in answers] == [200] * 50
    assert proxy.gets(model_path) == 1 and proxy.gets(f"{model_path}/versions") == 1
    assert emu.stats()["counters"]["creates"] == 50

    time.sleep(3.1)  # past MODEL_SCHEMA_TTL
    assert generate(service, {"model_name": SCHNELL, "prompt": "again"}).status_code == 200
    assert proxy.gets(model_path) == 2


def test_a_restart_within_the_ttl_reads_no_schema(make_service, emu, proxy):
    first = make_service(REPLICATE_BASE_URL=proxy.url)
    for model in (SCHNELL, SDXL, DEPLOYMENT):
        assert generate(first, {"model_name": model, "prompt": "before"}).status_code == 200
    # schnell: the model and its versions (official: none); sdxl: its version; the deployment:
    # itself (its release runs sdxl's version, already at hand)
    assert proxy.schema_reads() == 4
    again = make_service(REPLICATE_BASE_URL=proxy.url)  # the same journal database: a restart
    for model in (SCHNELL, SDXL, DEPLOYMENT, SDXL_VERSION):
        assert generate(again, {"model_name": model, "prompt": "after"}).status_code == 200
    assert proxy.schema_reads() == 4 and emu.stats()["counters"]["creates"] == 7


# -- what may run, and what is not known --------------------------------------------------------

def test_allowed_models_refuses_with_a_403_before_any_upstream_call(make_service, emu, proxy):
    service = make_service(REPLICATE_BASE_URL=proxy.url, ALLOWED_MODELS="black-forest-labs/*,deployments/acme/*")
    for headers in (ADMIN, USER):
        for model in ("acme/video-gen", SDXL, "qwen-image", "stability-ai/sdxl", "acme/not-a-model"):
            r = generate(service, {"model_name": model, "prompt": "x"}, headers)
            body = r.json()
            assert r.status_code == 403 and body["field"] == "model_name", (model, body)
            assert "black-forest-labs/*, deployments/acme/*" in body["error"]
            assert body["allowed_models"] == ["black-forest-labs/*", "deployments/acme/*"]
    assert proxy.total() == 0
    assert generate(service, {"model_name": DEPLOYMENT, "prompt": "x"}).status_code == 200
    assert generate(service, {"model_name": "flux-dev", "prompt": "x"}).status_code == 200


def test_an_unknown_reference_is_a_400_naming_it(service, emu):
    for model, needle in (("acme/no-such-model", "acme/no-such-model"),
                          ("deployments/acme/no-such-deployment", "acme/no-such-deployment"),
                          (f"stability-ai/sdxl:{'0' * 64}", "0" * 64),
                          ("a/b/c", "not a model reference"), ("acme/video-gen:123", "not a model reference")):
        r = generate(service, {"model_name": model, "prompt": "x"})
        assert r.status_code == 400 and needle in r.json()["error"] and r.json()["field"] == "model_name", r.json()
    r = generate(service, {"model_name": "invalid-model", "prompt": "x"})
    assert r.status_code == 400 and r.json()["supported_models"] == ["flux-dev", "flux-kontext-max", "qwen-image"]
    assert creates(emu) == 0


def test_a_community_model_without_a_version_is_a_400_showing_the_latest(service, emu):
    r = generate(service, {"model_name": "stability-ai/sdxl", "prompt": "x"})
    body = r.json()
    assert r.status_code == 400 and body["latest_version"] == SDXL, body
    assert "version" in body["error"] and SDXL in body["error"]
    assert creates(emu) == 0


def test_a_bare_version_is_accepted_once_its_model_is_known(service, emu):
    r = generate(service, {"model_name": SDXL_OLD_VERSION, "prompt": "x"})
    assert r.status_code == 400 and "owner/name:<version>" in r.json()["error"]
    assert creates(emu) == 0
    assert generate(service, {"model_name": f"stability-ai/sdxl:{SDXL_OLD_VERSION}", "prompt": "x"}).status_code == 200
    bare = generate(service, {"model_name": SDXL_OLD_VERSION, "prompt": "x", "width": 2048})
    assert bare.status_code == 400 and "from 256 to 1024" in bare.json()["error"]  # its own schema
    ok = generate(service, {"model_name": SDXL_OLD_VERSION, "prompt": "y"})
    assert ok.status_code == 200 and ok.json()["model_name"] == f"stability-ai/sdxl:{SDXL_OLD_VERSION}"


# -- MODELS_FILE ----------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_models_file_aliases_carry_default_parameters(make_service, emu, tmp_path, suffix):
    aliases = {"schnell": {"model": SCHNELL, "defaults": {"num_outputs": 2, "output_format": "jpg"}},
               "portrait": {"model": SDXL, "defaults": {"width": 768, "height": 1024}, "description": "tall"}}
    path = tmp_path / f"models.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(aliases))
    else:
        import yaml

        path.write_text(yaml.safe_dump(aliases, sort_keys=False))
    service = make_service(MODELS_FILE=path)
    r = generate(service, {"model_name": "schnell", "prompt": "x", "custom_filename": "s"})
    assert r.status_code == 200 and names(r.json()["files"]) == ["s_1.jpg", "s_2.jpg"], r.json()
    tall = generate(service, {"model_name": "portrait", "prompt": "y", "height": 512})  # the request wins
    assert tall.status_code == 200
    inputs = sorted((p["input"] for p in emu.predictions()), key=lambda i: i["prompt"])
    assert inputs[1] == {"prompt": "y", "width": 768, "height": 512}
    listed = service.get("/models").json()
    assert listed["supported_models"][-2:] == ["schnell", "portrait"]
    assert [a["alias"] for a in listed["aliases"]] == ["schnell", "portrait"]
    described = service.get("/models/schnell", headers=ADMIN).json()
    assert described["defaults"] == {"num_outputs": 2, "output_format": "jpg"}


@pytest.mark.parametrize("content,needle", [
    ({"fast": {"defaults": {}}}, "alias 'fast': 'model' is required"),
    ({"fast": {"model": "a/b/c"}}, "alias 'fast'"),
    ({"fast": {"model": SCHNELL, "defaults": [1]}}, "alias 'fast': 'defaults' must be an object"),
    ({"flux-dev": {"model": SCHNELL}}, "alias 'flux-dev': is already the name of a built-in model"),
    ({"bad name": {"model": SCHNELL}}, "alias 'bad name'"),
    ({"fast": {"model": SCHNELL, "extra": 1}}, "alias 'fast': unknown key(s) extra"),
])
def test_a_bad_models_file_stops_start_up_naming_the_alias(tmp_path, emulator_server, content, needle):
    path = tmp_path / "models.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as error:
        create_app({"REPLICATE_BASE_URL": emulator_server.url, "OUTPUT_DIR": str(tmp_path / "out"),
                    "MODELS_FILE": str(path)})
    assert needle in str(error.value) and "MODELS_FILE" in str(error.value)


def test_an_unreadable_models_file_stops_start_up(tmp_path, emulator_server):
    broken = tmp_path / "models.json"
    broken.write_text("{not json")
    for path, needle in ((broken, "not valid JSON"), (tmp_path / "missing.json", "cannot be read")):
        with pytest.raises(ConfigError, match=needle):
            create_app({"REPLICATE_BASE_URL": emulator_server.url, "OUTPUT_DIR": str(tmp_path / "out"),
                        "MODELS_FILE": str(path)})


# -- discovery ------------------------------------------------------------------------------------

def test_a_models_parameters_are_shown_and_fetching_them_needs_a_key(service, emu):
    path = f"/models/{SCHNELL}"
    assert service.get(path).status_code == 401  # it would cost a read upstream
    described = service.get(path, headers=USER).json()
    steps = described["parameters"]["num_inference_steps"]
    assert steps == {"type": "integer", "default": 4, "allowed": "a whole number from 1 to 4", "minimum": 1,
                     "maximum": 4}
    assert described["parameters"]["aspect_ratio"]["choices"][:2] == ["1:1", "16:9"]
    assert described["parameters"]["seed"]["allowed"] == "a whole number"
    assert described["run_by"] == "model" and described["output"] == "a list of files"
    assert service.get(path).status_code == 200  # at hand now: no key needed
    listed = service.get("/models").json()
    assert [m["id"] for m in listed["schemas"]] == [SCHNELL]

    old = service.get(f"/models/stability-ai/sdxl/versions/{SDXL_OLD_VERSION}", headers=ADMIN).json()
    assert old["parameters"]["width"]["maximum"] == 1024 and old["version"] == SDXL_OLD_VERSION
    latest = service.get("/models/stability-ai/sdxl", headers=ADMIN).json()
    assert latest["version_required"] and latest["latest_version"] == SDXL
    deployment = service.get(f"/models/{DEPLOYMENT}", headers=ADMIN).json()
    assert deployment["run_by"] == "deployment" and deployment["replicate_model"] == "stability-ai/sdxl"
    assert service.get("/models/acme/nothing-here", headers=ADMIN).status_code == 400
    assert creates(emu) == 0
