"""The emulator's catalog: official and community models, versions, a deployment; outputs of
every kind (image lists, one mp4, an object of URLs, a wav, text) and validation by each
version's published Cog schema on every create route."""
from __future__ import annotations

import io
import struct
import wave

import pytest
import replicate
import requests
from PIL import Image

from replicate_emulator import read_stamp
from replicate_emulator.catalog import SDXL_OLD_VERSION, SDXL_VERSION

TOKEN = "r8_modelstest00000000000001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIGNATURES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/webp": b"RIFF", "image/jpeg": b"\xff\xd8\xff",
              "video/mp4": b"ftyp", "audio/wav": b"RIFF"}


def client(emulator_server) -> replicate.Client:
    return replicate.Client(api_token=TOKEN, base_url=emulator_server.url)


def post(emulator_server, path: str, body: dict, wait: int = 5) -> requests.Response:
    return requests.post(f"{emulator_server.url}{path}", json=body, timeout=15,
                         headers={**AUTH, "Prefer": f"wait={wait}"})


def get(emulator_server, path: str) -> requests.Response:
    return requests.get(f"{emulator_server.url}{path}", headers=AUTH, timeout=10)


def download(url: str, content_type: str) -> bytes:
    """The file at `url`, checked for its Content-Type and its format's signature."""
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    assert response.headers["Content-Type"] == content_type
    signature = SIGNATURES[content_type]
    data = response.content
    assert (data[4:8] == signature) if content_type == "video/mp4" else data.startswith(signature)
    return data


def schema_of(emulator_server, model: str) -> dict:
    return get(emulator_server, f"/v1/models/{model}").json()["latest_version"]["openapi_schema"]


def test_flux_schnell_runs_by_model_route_and_publishes_a_cog_schema(emulator_server, emu):
    output = client(emulator_server).run("black-forest-labs/flux-schnell", input={
        "prompt": "a lighthouse", "num_outputs": 2, "output_format": "png", "aspect_ratio": "16:9"})
    assert len(output) == 2
    for index, url in enumerate(output):
        stamp = read_stamp(download(str(url), "image/png"))
        assert stamp["prompt"] == "a lighthouse" and stamp["index"] == index
    schemas = schema_of(emulator_server, "black-forest-labs/flux-schnell")["components"]["schemas"]
    props = schemas["Input"]["properties"]
    assert props["aspect_ratio"]["allOf"] == [{"$ref": "#/components/schemas/aspect_ratio"}]
    assert schemas["aspect_ratio"]["title"] == "aspect_ratio" and "16:9" in schemas["aspect_ratio"]["enum"]
    assert schemas["megapixels"]["enum"] == ["1", "0.25"]
    assert (props["num_inference_steps"]["default"], props["num_inference_steps"]["maximum"]) == (4, 4)
    assert schemas["Output"] == {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"}


@pytest.mark.parametrize("model", ["black-forest-labs/flux-dev", "black-forest-labs/flux-schnell",
                                   "black-forest-labs/flux-kontext-max", "qwen/qwen-image", "stability-ai/sdxl",
                                   "acme/video-gen", "acme/background-remover", "acme/tts", "acme/text-gen"])
def test_every_schema_has_the_shape_cog_writes(emulator_server, emu, model):
    schema = schema_of(emulator_server, model)
    components = schema["components"]["schemas"]
    props = components["Input"]["properties"]
    assert schema["openapi"] == "3.0.2" and "Output" in components
    assert sorted(p["x-order"] for p in props.values()) == list(range(len(props)))
    for name, prop in props.items():
        for ref in prop.get("allOf", []):
            target = components[ref["$ref"].rsplit("/", 1)[-1]]
            assert target["title"] == name and target["enum"]
        assert "allOf" in prop or "title" in prop
        if name in ("image", "input_image", "mask"):
            assert prop["format"] == "uri"
    assert set(components["Input"].get("required", [])) <= set(props)


def test_sdxl_runs_only_by_version(emulator_server, emu):
    refused = post(emulator_server, "/v1/models/stability-ai/sdxl/predictions", {"input": {"prompt": "x"}})
    assert refused.status_code == 404 and refused.headers["Content-Type"].startswith("application/problem+json")
    by_name = post(emulator_server, "/v1/predictions", {"version": "stability-ai/sdxl", "input": {"prompt": "x"}})
    assert by_name.status_code == 422 and by_name.json()["title"] == "Invalid version or not permitted"
    wrong_model = post(emulator_server, "/v1/predictions", {"version": f"qwen/qwen-image:{SDXL_VERSION}",
                                                            "input": {"prompt": "x"}})
    assert wrong_model.status_code == 422
    by_id = post(emulator_server, "/v1/predictions", {"version": SDXL_VERSION,
                                                      "input": {"prompt": "a fox", "width": 512, "height": 768}})
    body = by_id.json()
    assert by_id.status_code == 201 and body["version"] == SDXL_VERSION and body["model"] == "stability-ai/sdxl"
    image = Image.open(io.BytesIO(download(body["output"][0], "image/png")))
    assert image.size == (171, 256)  # 512:768 at the emulator's 256 px long side
    output = client(emulator_server).run(f"stability-ai/sdxl:{SDXL_VERSION}", input={"prompt": "by client"})
    assert read_stamp(download(str(output[0]), "image/png"))["prompt"] == "by client"


def test_pinning_an_sdxl_version_changes_what_validates(emulator_server, emu):
    newer_only = {"prompt": "x", "width": 2048, "scheduler": "KarrasDPM", "refine": "expert_ensemble_refiner"}
    old = post(emulator_server, "/v1/predictions", {"version": f"stability-ai/sdxl:{SDXL_OLD_VERSION}",
                                                    "input": newer_only})
    assert old.status_code == 422
    assert {f["type"] for f in old.json()["invalid_fields"]} == {"number_lte", "enum",
                                                                "additional_property_not_allowed"}
    new = post(emulator_server, "/v1/predictions", {"version": f"stability-ai/sdxl:{SDXL_VERSION}",
                                                    "input": newer_only})
    assert new.status_code == 201 and new.json()["status"] == "succeeded"
    ran = post(emulator_server, "/v1/predictions", {"version": SDXL_OLD_VERSION, "input": {"prompt": "old"}})
    assert read_stamp(download(ran.json()["output"][0], "image/png"))["version"] == SDXL_OLD_VERSION


def test_model_version_and_version_list_gets(emulator_server, emu):
    model = get(emulator_server, "/v1/models/stability-ai/sdxl").json()
    assert model["latest_version"]["id"] == SDXL_VERSION and model["is_official"] is False
    listed = get(emulator_server, "/v1/models/stability-ai/sdxl/versions").json()
    assert [v["id"] for v in listed["results"]] == [SDXL_VERSION, SDXL_OLD_VERSION] and listed["next"] is None
    one = get(emulator_server, f"/v1/models/stability-ai/sdxl/versions/{SDXL_OLD_VERSION}").json()
    assert one["openapi_schema"]["components"]["schemas"]["Input"]["properties"]["width"]["maximum"] == 1024
    official = get(emulator_server, "/v1/models/black-forest-labs/flux-schnell/versions")
    assert official.status_code == 404 and "official model" in official.json()["detail"]
    c = client(emulator_server)
    assert [v.id for v in c.models.get("stability-ai/sdxl").versions.list()] == [SDXL_VERSION, SDXL_OLD_VERSION]
    latest = c.models.get("acme/video-gen").latest_version.id
    assert c.models.get("acme/video-gen").versions.get(latest).openapi_schema["components"]["schemas"]["fps"][
        "enum"] == [24, 30]


@pytest.mark.parametrize("path", [
    "/v1/models/nobody/nothing", "/v1/models/nobody/nothing/versions",
    f"/v1/models/stability-ai/sdxl/versions/{'0' * 64}",
    f"/v1/models/qwen/qwen-image/versions/{SDXL_VERSION}",  # a real id, of another model
    "/v1/deployments/acme/nothing"])
def test_unknown_model_version_or_deployment_is_a_404_problem(emulator_server, emu, path):
    response = get(emulator_server, path)
    assert response.status_code == 404 and response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["status"] == 404


def test_deployment_runs_its_release(emulator_server, emu):
    c = client(emulator_server)
    deployment = c.deployments.get("acme/image-gen")
    release = deployment.current_release
    assert (release.model, release.version) == ("stability-ai/sdxl", SDXL_VERSION)
    assert release.configuration.max_instances >= release.configuration.min_instances >= 0
    prediction = deployment.predictions.create(input={"prompt": "deployed", "num_outputs": 2}, wait=5)
    assert prediction.status == "succeeded" and prediction.version == SDXL_VERSION
    assert len(prediction.output) == 2
    assert read_stamp(download(prediction.output[1], "image/png"))["prompt"] == "deployed"
    assert emu.predictions()[-1]["deployment"] == "acme/image-gen"
    raw = get(emulator_server, "/v1/deployments/acme/image-gen").json()
    assert set(raw["current_release"]) >= {"number", "model", "version", "created_at", "created_by", "configuration"}
    missing = post(emulator_server, "/v1/deployments/acme/nothing/predictions", {"input": {"prompt": "x"}})
    assert missing.status_code == 404


def test_deployment_create_honours_prefer_wait_and_rate_window(emulator_server, emu):
    emu.set_faults(latency_s=5, create_limit=2, window_s=30)
    running = post(emulator_server, "/v1/deployments/acme/image-gen/predictions", {"input": {"prompt": "x"}}, wait=1)
    assert running.status_code == 201 and running.headers["Preference-Applied"] == "wait=1"
    assert running.json()["status"] in ("starting", "processing")
    post(emulator_server, "/v1/models/acme/text-gen/predictions", {"input": {"prompt": "x"}}, wait=1)
    throttled = post(emulator_server, "/v1/deployments/acme/image-gen/predictions", {"input": {"prompt": "x"}})
    assert throttled.status_code == 429 and throttled.json()["retry_after"] >= 1  # one window for every route


def test_video_model_outputs_one_mp4(emulator_server, emu):
    body = post(emulator_server, "/v1/models/acme/video-gen/predictions",
                {"input": {"prompt": "waves", "duration": 3, "fps": 30}}).json()
    assert isinstance(body["output"], str) and body["output"].endswith(".mp4")
    data = download(body["output"], "video/mp4")
    boxes, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        boxes.append((kind, data[offset + 8:offset + size]))
        offset += size
    assert [kind for kind, _ in boxes] == [b"ftyp", b"moov", b"mdat"] and offset == len(data)
    mvhd = boxes[1][1]
    assert mvhd[4:8] == b"mvhd"
    timescale, duration = struct.unpack(">II", mvhd[20:28])
    assert duration / timescale == 3
    stamp = read_stamp(data)
    assert stamp["prompt"] == "waves" and stamp["fps"] == 30


def test_background_remover_outputs_an_object_of_urls(emulator_server, emu):
    output = client(emulator_server).run("acme/background-remover", input={"image": "https://example.com/cat.png"})
    assert set(output) == {"cut_image", "mask"}
    for key, url in output.items():
        assert read_stamp(download(str(url), "image/png"))["key"] == key
    schema = schema_of(emulator_server, "acme/background-remover")["components"]["schemas"]["Output"]
    assert schema["type"] == "object" and schema["properties"]["mask"]["format"] == "uri"


def test_tts_outputs_a_wav_and_text_model_a_string(emulator_server, emu):
    url = post(emulator_server, "/v1/models/acme/tts/predictions", {"input": {"text": "hello there"}}).json()["output"]
    data = download(url, "audio/wav")
    with wave.open(io.BytesIO(data)) as audio:
        assert audio.getframerate() == 16000 and audio.getnframes() > 0
    assert read_stamp(data)["prompt"] == "hello there"
    failed = post(emulator_server, "/v1/models/acme/tts/predictions", {"input": {"text": "x [[fail]]"}}).json()
    assert failed["status"] == "failed"  # markers are read from the model's main input
    text = client(emulator_server).run("acme/text-gen", input={"prompt": "say hi"})
    assert isinstance(text, str) and "say hi" in text and read_stamp(text.encode())["model"] == "acme/text-gen"


SDXL_ROUTE = ("/v1/predictions", SDXL_VERSION)
DEPLOYMENT_ROUTE = ("/v1/deployments/acme/image-gen/predictions", None)


def model_route(model: str) -> tuple[str, None]:
    return (f"/v1/models/{model}/predictions", None)


@pytest.mark.parametrize("route,data,kind", [
    (model_route("black-forest-labs/flux-schnell"), {"prompt": "x", "megapixels": "2"}, "enum"),
    (model_route("black-forest-labs/flux-schnell"), {"prompt": "x", "num_inference_steps": 5}, "number_lte"),
    (model_route("black-forest-labs/flux-schnell"), {"prompt": "x", "num_outputs": "2"}, "invalid_type"),
    (model_route("black-forest-labs/flux-schnell"), {"num_outputs": 1}, "required"),
    (SDXL_ROUTE, {"prompt": "x", "width": 100}, "number_gte"),
    (SDXL_ROUTE, {"prompt": "x", "scheduler": "EULER"}, "enum"),
    (SDXL_ROUTE, {"prompt": "x", "guidance_scale": "high"}, "invalid_type"),
    (SDXL_ROUTE, {"prompt": "x", "steps": 20}, "additional_property_not_allowed"),
    (DEPLOYMENT_ROUTE, {"prompt": "x", "num_outputs": 5}, "number_lte"),
    (DEPLOYMENT_ROUTE, {"prompt": "x", "num_inference_steps": 0}, "number_gte"),
    (DEPLOYMENT_ROUTE, {"prompt": "x", "seed": "7"}, "invalid_type"),
    (DEPLOYMENT_ROUTE, {"prompt": "x", "typo": 1}, "additional_property_not_allowed"),
    (model_route("acme/video-gen"), {"prompt": "x", "fps": 25}, "enum"),
    (model_route("acme/video-gen"), {"prompt": "x", "fps": "24"}, "invalid_type"),
    (model_route("acme/video-gen"), {"prompt": "x", "duration": 11}, "number_lte"),
    (model_route("acme/background-remover"), {"threshold": 0.5}, "required"),
    (model_route("acme/background-remover"), {"image": "https://e.com/a.png", "prompt": "x"},
     "additional_property_not_allowed"),
    (model_route("acme/tts"), {"text": "x", "voice": "bob"}, "enum"),
    (model_route("acme/tts"), {"text": "x", "speed": 0.1}, "number_gte"),
    (model_route("acme/text-gen"), {"prompt": "x", "max_tokens": 1.5}, "invalid_type"),
])
def test_bad_input_is_422_on_every_route_and_nothing_is_created(emulator_server, emu, route, data, kind):
    path, version = route
    body = {"input": data} if version is None else {"version": version, "input": data}
    response = post(emulator_server, path, body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["title"] == "Input validation failed" and [f["type"] for f in problem["invalid_fields"]] == [kind]
    counts = emu.stats()["by_token"][TOKEN]
    assert counts["create_attempts"] == 1 and counts["invalid"] == 1 and "creates" not in counts


def test_every_create_path_counts_attempts_and_creates(emulator_server, emu):
    creates = [("/v1/models/black-forest-labs/flux-schnell/predictions", {"input": {"prompt": "x"}}),
               ("/v1/predictions", {"version": SDXL_VERSION, "input": {}}),
               ("/v1/predictions", {"version": f"stability-ai/sdxl:{SDXL_OLD_VERSION}", "input": {}}),
               ("/v1/deployments/acme/image-gen/predictions", {"input": {"prompt": "x"}}),
               ("/v1/models/acme/video-gen/predictions", {"input": {"prompt": "x"}})]
    refused = [("/v1/models/stability-ai/sdxl/predictions", {"input": {"prompt": "x"}}),
               ("/v1/predictions", {"version": "f" * 64, "input": {"prompt": "x"}}),
               ("/v1/deployments/acme/nothing/predictions", {"input": {"prompt": "x"}})]
    assert [post(emulator_server, p, b).status_code for p, b in creates] == [201] * len(creates)
    assert [post(emulator_server, p, b).status_code for p, b in refused] == [404, 422, 404]
    counts = emu.stats()["by_token"][TOKEN]
    assert counts["create_attempts"] == len(creates) + len(refused) and counts["creates"] == len(creates)
    assert [p["version"] for p in emu.predictions()][1:3] == [SDXL_VERSION, SDXL_OLD_VERSION]
