"""Every example of the spec works as written; validation; errors are JSON."""
from __future__ import annotations

import json
import os

import pytest

from replicate_emulator import read_stamp

from helpers import ADMIN, SERVER_TOKEN, USER_TOKEN


def test_health(service):
    body = service.get("/health").json()
    assert body["status"] == "healthy" and body["service"] == "replicate-concurrent-generation"
    assert body["supported_models"] == ["flux-dev", "flux-kontext-max", "qwen-image"]
    assert body["concurrency_status"]["concurrent_limit"] == 60
    assert body["concurrency_status"]["requests_per_minute"] == 600


def test_generate_example(service, emu):
    r = service.post("/generate", {"model_name": "flux-dev", "prompt": "A serene mountain landscape at sunset",
                                   "aspect_ratio": "16:9", "output_format": "jpg"}, ADMIN)
    body = r.json()
    assert r.status_code == 200 and body["success"] is True and body["count"] == 1
    assert body["model_name"] == "flux-dev" and body["files"][0].endswith("/flux_dev.jpg")
    stamp = read_stamp(body["files"][0])
    assert stamp["prompt"] == "A serene mountain landscape at sunset" and stamp["aspect_ratio"] == "16:9"
    assert emu.predictions()[0]["token"] == SERVER_TOKEN


def test_batch_examples(service):
    prompts = ["A red sports car", "A blue ocean wave", "A green forest path"]
    basic = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": prompts,
                                             "aspect_ratio": "1:1"}, ADMIN).json()
    assert basic["success"] and basic["total_prompts"] == 3 and basic["successful_count"] == 3
    assert basic["failed_count"] == 0 and basic["failed_results"] == []
    named = service.post("/generate-batch", {
        "model_name": "flux-dev", "prompts": prompts,
        "custom_filenames": ["car_image_001", "ocean_wave_002", "forest_path_003"],
        "aspect_ratio": "16:9"}, ADMIN).json()
    results = named["successful_results"]
    assert [r["prompt_index"] for r in results] == [0, 1, 2]
    assert [os.path.basename(r["files"][0]) for r in results] == [
        "car_image_001.webp", "ocean_wave_002.webp", "forest_path_003.webp"]
    for result in results:
        assert result["prompt"] == prompts[result["prompt_index"]]
        assert read_stamp(result["files"][0])["prompt"] == result["prompt"]


def test_sneakers_example_guaranteed_names(service):
    names = ["product_red_sneakers_001", "product_blue_sneakers_002", "product_green_sneakers_003"]
    body = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": [
        "Product photo of red sneakers", "Product photo of blue sneakers", "Product photo of green sneakers"],
        "custom_filenames": names, "output_format": "jpg"}, ADMIN).json()
    assert [os.path.basename(r["files"][0]) for r in body["successful_results"]] == [n + ".jpg" for n in names]


def test_kontext_and_qwen_examples(service):
    kontext = service.post("/generate", {"model_name": "flux-kontext-max", "prompt": "Transform this image",
                                         "input_image": "https://example.com/image.jpg",
                                         "aspect_ratio": "match_input_image", "output_format": "png",
                                         "seed": 42, "safety_tolerance": 2, "prompt_upsampling": False,
                                         "custom_filename": "edited_image"}, ADMIN).json()
    assert [os.path.basename(f) for f in kontext["files"]] == ["edited_image.png"]
    qwen = service.post("/generate", {"model_name": "qwen-image", "prompt": "一只在竹林里的熊猫",
                                      "aspect_ratio": "16:9", "output_format": "webp", "output_quality": 80,
                                      "image_size": "optimize_for_quality", "guidance": 4.0,
                                      "num_inference_steps": 50, "lora_scale": 1.0, "enhance_prompt": False,
                                      "negative_prompt": "", "go_fast": True,
                                      "custom_filename": "qwen_artwork"}, ADMIN).json()
    assert [os.path.basename(f) for f in qwen["files"]] == ["qwen_artwork.webp"]
    assert read_stamp(qwen["files"][0])["prompt"] == "一只在竹林里的熊猫"


def test_flux_dev_all_parameters(service):
    body = service.post("/generate", {
        "model_name": "flux-dev", "prompt": "Your text prompt", "aspect_ratio": "16:9", "megapixels": "1",
        "output_format": "webp", "output_quality": 80, "seed": 42, "guidance": 3.0,
        "num_inference_steps": 28, "prompt_strength": 0.8, "go_fast": True, "num_outputs": 2,
        "disable_safety_checker": False, "custom_filename": "my_image"}, ADMIN).json()
    assert [os.path.basename(f) for f in body["files"]] == ["my_image_1.webp", "my_image_2.webp"]
    assert [read_stamp(f)["index"] for f in body["files"]] == [0, 1]


def test_status_models_configure(service):
    status = service.get("/status").json()
    assert status["concurrency_status"]["current_concurrent"] == 0
    assert SERVER_TOKEN not in str(status) and "admin-key" not in str(status)
    models = service.get("/models").json()
    assert [m["id"] for m in models["models"]] == ["flux-dev", "flux-kontext-max", "qwen-image"]
    assert models["models"][0]["replicate_model"] == "black-forest-labs/flux-dev"
    configured = service.post("/configure", {"concurrent_limit": 30, "requests_per_minute": 300}, ADMIN)
    assert configured.status_code == 200
    assert service.get("/health").json()["concurrency_status"]["concurrent_limit"] == 30
    assert service.get("/status").json()["concurrency_status"]["requests_per_minute"] == 300


def test_full_replicate_names_accepted(service):
    body = service.post("/generate", {"model_name": "black-forest-labs/flux-dev", "prompt": "x"}, ADMIN).json()
    assert body["success"] and body["model_name"] == "flux-dev"


def test_auth_errors(service):
    r = service.post("/generate", {"model_name": "flux-dev", "prompt": "x"})
    assert r.status_code == 401 and r.json() == {
        "error": "No valid API key provided. Either provide X-Admin-API-Key or X-Replicate-API-Key header",
        "request_id": r.headers["X-Request-ID"]}
    wrong = service.post("/generate", {"model_name": "flux-dev", "prompt": "x"},
                         {"X-Admin-API-Key": "wrong", "X-Replicate-API-Key": USER_TOKEN})
    assert wrong.status_code == 401
    assert service.post("/configure", {"concurrent_limit": 5}, {"X-Replicate-API-Key": USER_TOKEN}).status_code == 401


def test_unsupported_model(service):
    r = service.post("/generate", {"model_name": "invalid-model", "prompt": "x"}, ADMIN)
    assert r.status_code == 400 and r.json() == {
        "error": "Model 'invalid-model' not supported",
        "supported_models": ["flux-dev", "flux-kontext-max", "qwen-image"], "request_id": r.headers["X-Request-ID"]}


BAD_PARAMS = [
    ("flux-dev", {"aspect_ratio": "7:3"}, "aspect_ratio"),
    ("flux-dev", {"guidance": 10.5}, "guidance"),
    ("flux-dev", {"guidance": "3"}, "guidance"),
    ("flux-dev", {"num_outputs": 5}, "num_outputs"),
    ("flux-dev", {"num_outputs": 2.5}, "num_outputs"),
    ("flux-dev", {"num_inference_steps": True}, "num_inference_steps"),
    ("flux-dev", {"megapixels": "2"}, "megapixels"),
    ("flux-dev", {"output_format": "gif"}, "output_format"),
    ("flux-dev", {"output_quality": -1}, "output_quality"),
    ("flux-dev", {"go_fast": "yes"}, "go_fast"),
    ("flux-dev", {"seed": "42"}, "seed"),
    ("flux-dev", {"image": "/etc/passwd"}, "image"),
    ("flux-kontext-max", {"output_format": "webp", "input_image": "https://e.com/a.png"}, "output_format"),
    ("flux-kontext-max", {"safety_tolerance": 3, "input_image": "https://e.com/a.png"}, "safety_tolerance"),
    ("flux-kontext-max", {"safety_tolerance": 7, "input_image": "https://e.com/a.png"}, "safety_tolerance"),
    ("flux-kontext-max", {}, "input_image"),
    ("flux-kontext-max", {"input_image": "/proc/self/environ"}, "input_image"),
    ("flux-kontext-max", {"input_image": "file:///etc/passwd"}, "input_image"),
    ("flux-kontext-max", {"input_image": "ftp://e.com/a.png"}, "input_image"),
    ("flux-kontext-max", {"input_image": "data:text/plain;base64,aGk="}, "input_image"),
    ("qwen-image", {"num_inference_steps": 51}, "num_inference_steps"),
    ("qwen-image", {"aspect_ratio": "21:9"}, "aspect_ratio"),
    ("qwen-image", {"image_size": "huge"}, "image_size"),
    ("qwen-image", {"guidance": float("nan")}, "guidance"),
]


@pytest.mark.parametrize("model,params,field", BAD_PARAMS)
def test_bad_parameters_name_the_field(service, emu, model, params, field):
    body = json.dumps({"model_name": model, "prompt": "x", **params})  # NaN kept as the literal NaN
    r = service.http.post(service.url + "/generate", data=body, headers={**ADMIN, "Content-Type": "application/json"})
    body = r.json()
    assert r.status_code == 400 and body["field"] == field and field in body["error"]
    assert "allowed" in body["error"]
    assert emu.stats()["counters"].get("create_attempts", 0) == 0


GOOD_PARAMS = [
    ("flux-dev", {"megapixels": 0.25}),                  # the spec's numeric form
    ("flux-dev", {"aspect_ratio": "21:9"}),              # wider than the spec, as upstream
    ("qwen-image", {"lora_scale": 3.5}),                 # upstream declares no bound
    ("qwen-image", {"seed": None, "extra_lora_scale": None}),
    ("flux-kontext-max", {"input_image": "data:image/png;base64,iVBORw0KGgo=", "aspect_ratio": "2:1"}),
]


@pytest.mark.parametrize("model,params", GOOD_PARAMS)
def test_upstream_choices_accepted(service, model, params):
    r = service.post("/generate", {"model_name": model, "prompt": "x", **params}, ADMIN)
    assert r.status_code == 200, r.json()


@pytest.mark.parametrize("body,needle", [
    ({"model_name": "flux-dev", "prompt": "x", "guidence": 3}, "guidence"),
    ({"model_name": "flux-dev"}, "prompt"),
    ({"model_name": "flux-dev", "prompt": ""}, "prompt"),
    ({"model_name": "flux-dev", "prompt": 5}, "prompt"),
    ({"prompt": "x"}, "model_name"),
    ({"model_name": "flux-dev", "prompt": "x", "custom_filenames": ["a"]}, "custom_filenames"),
])
def test_request_field_errors(service, body, needle):
    r = service.post("/generate", body, ADMIN)
    assert r.status_code == 400 and needle in r.json()["error"]


@pytest.mark.parametrize("body,needle", [
    ({"model_name": "flux-dev", "prompts": []}, "prompts"),
    ({"model_name": "flux-dev", "prompts": "one"}, "prompts"),
    ({"model_name": "flux-dev", "prompts": ["a", 3]}, "prompts[1]"),
    ({"model_name": "flux-dev", "prompts": ["a", "b"], "custom_filenames": ["x"]}, "custom_filenames"),
    ({"model_name": "flux-dev", "prompts": ["a", "b"], "custom_filenames": ["x", "X.png"]}, "custom_filenames[1]"),
    ({"model_name": "flux-dev", "prompts": ["a", "b"], "custom_filenames": ["x", "../y"]}, "custom_filenames[1]"),
    ({"model_name": "flux-dev", "prompts": ["a", "b"], "num_outputs": 2,
      "custom_filenames": ["x.jpg", "x.webp"]}, "custom_filenames[1]"),
])
def test_batch_field_errors(service, body, needle):
    r = service.post("/generate-batch", body, ADMIN)
    assert r.status_code == 400 and needle in r.json()["error"]


def test_batch_size_cap(make_service, emu):
    service = make_service(MAX_BATCH_SIZE=3)
    r = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": ["a"] * 4}, ADMIN)
    assert r.status_code == 400 and "limit is 3" in r.json()["error"]


@pytest.mark.parametrize("data,content_type", [
    ("not json", "application/json"), ("not json", "text/plain"), ("[1, 2]", "application/json"),
    ("", "application/json"), ('{"a": ', "application/json"),
])
def test_malformed_bodies_are_400_json(service, data, content_type):
    for path in ("/generate", "/generate-batch", "/configure"):
        r = service.http.post(service.url + path, data=data, headers={**ADMIN, "Content-Type": content_type})
        assert r.status_code == 400 and "JSON object" in r.json()["error"]


def test_http_errors_are_json(make_service, emu):
    service = make_service(MAX_CONTENT_LENGTH=2048)
    assert service.get("/nowhere").status_code == 404 and "error" in service.get("/nowhere").json()
    r = service.get("/generate")
    assert r.status_code == 405 and "error" in r.json()
    big = service.post("/generate", {"model_name": "flux-dev", "prompt": "x" * 5000}, ADMIN)
    assert big.status_code == 413 and "2048" in big.json()["error"]


def test_prompt_length_cap(make_service, emu):
    service = make_service(MAX_PROMPT_LENGTH=10)
    r = service.post("/generate", {"model_name": "flux-dev", "prompt": "x" * 11}, ADMIN)
    assert r.status_code == 400 and "10-character" in r.json()["error"]
