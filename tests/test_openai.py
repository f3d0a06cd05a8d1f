"""The OpenAI-compatible API, driven by the official `openai` SDK against the service and the
emulator: generations, edits, models, errors in OpenAI's shape, and signed file links."""
from __future__ import annotations

import base64
import io
import stat
import threading
import time
from urllib.parse import parse_qs, urlsplit

import openai
import pytest
import requests
from PIL import Image

from gateway.signing import SECRET_FILE, FileSigner, StoredSecret
from replicate_emulator import read_stamp

from helpers import ADMIN, ADMIN_KEY, USER_TOKEN, wait_for

PROMPT = "a lighthouse on a cliff at dawn"
SECRET = "a-file-url-secret-for-tests-0001"


def client(service, key: str = ADMIN_KEY, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{service.url}/v1", max_retries=max_retries, timeout=60)


def creates(emu) -> int:
    return emu.stats()["counters"].get("create_attempts", 0)


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def fetch(url: str, **kwargs) -> requests.Response:
    return requests.get(url, timeout=30, **kwargs)


# -- generations -----------------------------------------------------------------------------
def test_generate_answers_three_signed_urls_of_16_9_images_of_the_prompt_in_one_job(service, emu):
    result = client(service).images.generate(model="flux-dev", prompt=PROMPT, n=3, size="1792x1024")

    assert len(result.data) == 3 and result.created > 0
    for image in result.data:
        assert image.url.startswith(f"{service.url}/files/") and image.revised_prompt == PROMPT
        response = fetch(image.url)  # no key: the link is signed
        assert response.status_code == 200, response.text
        assert read_stamp(response.content)["prompt"] == PROMPT
        width, height = Image.open(io.BytesIO(response.content)).size
        assert abs(width / height - 16 / 9) < 0.02
    assert len({image.url for image in result.data}) == 3
    assert [p["input"]["aspect_ratio"] for p in emu.predictions()] == ["16:9"] * 3
    job = service.get(f"/jobs/{result.job_id}", headers=ADMIN).json()  # one journaled job of n items
    assert job["total"] == 3 and job["status"] == "succeeded"
    assert [urlsplit(url).path for item in job["items"] for url in item["signed_urls"]] == \
        [urlsplit(image.url).path for image in result.data]


def test_b64_json_answers_three_decodable_images(service, emu):
    result = client(service).images.generate(model="flux-dev", prompt=PROMPT, n=3, size="1024x1024",
                                             response_format="b64_json")

    assert len(result.data) == 3
    for image in result.data:
        raw = base64.b64decode(image.b64_json)
        assert Image.open(io.BytesIO(raw)).size == (256, 256)
        assert read_stamp(raw)["prompt"] == PROMPT and image.url is None


def test_openai_fields_map_to_the_models_parameters(service, emu):
    api = client(service)
    api.images.generate(model="flux-dev", prompt=PROMPT, size="1024x1536", output_format="jpeg", quality="hd",
                        style="vivid", user="team-a", extra_body={"replicate_input": {"guidance": 3.5, "seed": 7}})
    api.images.generate(model="qwen-image", prompt=PROMPT, quality="high", output_compression=60)

    flux, qwen = sorted(emu.predictions(), key=lambda p: p["created_t"])
    assert flux["input"] == {"prompt": PROMPT, "aspect_ratio": "2:3", "output_format": "jpg",
                             "guidance": 3.5, "seed": 7}  # quality and style: flux-dev has neither
    assert qwen["input"] == {"prompt": PROMPT, "image_size": "optimize_for_quality", "output_quality": 60}


def test_a_bearer_key_that_is_not_the_admin_key_runs_on_that_replicate_token(service, emu):
    client(service, key=USER_TOKEN).images.generate(model="flux-dev", prompt=PROMPT)

    assert [p["token"] for p in emu.predictions()] == [USER_TOKEN]


# -- edits -----------------------------------------------------------------------------------
def test_edit_with_a_png_runs_flux_kontext_max_on_the_image(service, emu):
    source = png()
    result = client(service).images.edit(model="flux-kontext-max", image=("photo.png", source, "image/png"),
                                         prompt="make the grass blue", size="1024x1024")

    [image] = result.data
    response = fetch(image.url)
    assert response.status_code == 200 and read_stamp(response.content)["prompt"] == "make the grass blue"
    [prediction] = emu.predictions()
    assert prediction["model"] == "black-forest-labs/flux-kontext-max"
    assert prediction["input"]["input_image"] == "data:image/png;base64," + base64.b64encode(source).decode()
    assert prediction["input"]["aspect_ratio"] == "1:1"


def test_edit_form_fields_reach_the_model_typed(service, emu):
    client(service).images.edit(model="flux-kontext-max", image=("photo.png", png(), "image/png"),
                                prompt="a red door", n=2, extra_body={"replicate_input": {"safety_tolerance": 1,
                                                                                          "prompt_upsampling": True}})

    inputs = [p["input"] for p in emu.predictions()]
    assert len(inputs) == 2
    assert all(i["safety_tolerance"] == 1 and i["prompt_upsampling"] is True for i in inputs)


def test_edit_refuses_a_file_that_is_not_an_image_and_one_over_the_size_cap(make_service, emu):
    api = client(make_service(MAX_CONTENT_LENGTH=4096))
    with pytest.raises(openai.BadRequestError) as not_image:
        api.images.edit(model="flux-kontext-max", image=("notes.png", b"just text", "image/png"), prompt="x")
    with pytest.raises(openai.BadRequestError) as too_big:
        api.images.edit(model="flux-kontext-max", image=("big.png", png((400, 400)) + b"\0" * 8192, "image/png"),
                        prompt="x")

    assert not_image.value.param == "image" and "not an image" in not_image.value.message
    assert "too large" in too_big.value.message and "4096" in too_big.value.message
    assert creates(emu) == 0


# -- models ----------------------------------------------------------------------------------
def test_models_list_names_the_aliases(service, emu):
    ids = [model.id for model in client(service).models.list()]

    assert {"flux-dev", "flux-kontext-max", "qwen-image"} <= set(ids)
    assert "black-forest-labs/flux-dev" in ids
    assert client(service).models.retrieve("flux-dev").owned_by == "black-forest-labs"


# -- errors ----------------------------------------------------------------------------------
def test_an_invalid_size_is_a_bad_request_listing_the_sizes_the_model_makes(service, emu):
    with pytest.raises(openai.BadRequestError) as error:
        client(service).images.generate(model="flux-dev", prompt=PROMPT, size="13x7")

    assert error.value.param == "size" and error.value.type == "invalid_request_error"
    assert "1024x576 (16:9)" in error.value.message and "1024x1024 (1:1)" in error.value.message
    assert creates(emu) == 0


def test_an_out_of_range_model_parameter_is_a_bad_request_naming_the_field(service, emu):
    api = client(service)
    with pytest.raises(openai.BadRequestError) as guidance:
        api.images.generate(model="flux-dev", prompt=PROMPT, extra_body={"replicate_input": {"guidance": 99}})
    with pytest.raises(openai.BadRequestError) as count:
        api.images.generate(model="flux-dev", prompt=PROMPT, n=11)
    with pytest.raises(openai.BadRequestError) as unknown:
        api.images.generate(model="flux-dev", prompt=PROMPT, extra_body={"replicate_input": {"guidnce": 3}})

    assert guidance.value.param == "replicate_input.guidance" and "from 0 to 10" in guidance.value.message
    assert count.value.param == "n"
    assert unknown.value.param == "replicate_input.guidnce"
    assert creates(emu) == 0


def test_a_bad_key_is_an_authentication_error(service, emu):
    emu.set_token("r8_revokedtoken0000000003", "invalid")
    for key in ("r8_revokedtoken0000000003", "key with spaces"):
        with pytest.raises(openai.AuthenticationError):
            client(service, key=key).images.generate(model="flux-dev", prompt=PROMPT)

    assert creates(emu) == 0


def test_a_model_outside_allowed_models_is_permission_denied(make_service, emu):
    api = client(make_service(ALLOWED_MODELS="black-forest-labs/*"))
    with pytest.raises(openai.PermissionDeniedError) as error:
        api.images.generate(model="qwen-image", prompt=PROMPT)

    assert error.value.param == "model"
    assert "qwen-image" not in [model.id for model in api.models.list()]
    assert creates(emu) == 0


def test_an_unknown_model_is_not_found(service, emu):
    with pytest.raises(openai.NotFoundError) as error:
        client(service).images.generate(model="dall-e-3", prompt=PROMPT)

    assert error.value.code == "model_not_found" and error.value.param == "model"
    assert creates(emu) == 0


def test_the_gateways_own_limit_is_a_429_with_retry_after(make_service, emu):
    service = make_service(MAX_SYNC_REQUESTS=1)
    emu.set_faults(latency_s=1.5)
    first = threading.Thread(target=lambda: client(service).images.generate(model="flux-dev", prompt=PROMPT))
    first.start()
    wait_for(lambda: service.get("/status").json()["sync_requests"]["in_progress"] == 1, message="first not held")
    with pytest.raises(openai.RateLimitError) as error:
        client(service).images.generate(model="flux-dev", prompt=PROMPT)
    first.join(30)

    assert error.value.response.headers["Retry-After"] == "5" and error.value.code == "rate_limit_exceeded"
    assert creates(emu) == 1


def test_no_credit_is_insufficient_quota_which_the_sdk_does_not_retry(service, emu):
    emu.set_token(USER_TOKEN, "no_credit")
    with pytest.raises(openai.RateLimitError) as error:
        client(service, key=USER_TOKEN, max_retries=2).images.generate(model="flux-dev", prompt=PROMPT)

    assert error.value.code == "insufficient_quota" and "insufficient credit" in error.value.message
    assert creates(emu) == 1  # refused once upstream; not tried again by the SDK


def test_the_rest_of_the_api_keeps_its_own_error_shape(service, emu):
    response = service.post("/generate", {"model_name": "flux-dev", "prompt": PROMPT, "size": "13x7"}, ADMIN)

    assert response.status_code == 400 and isinstance(response.json()["error"], str)


# -- signed file links -----------------------------------------------------------------------
def test_generate_and_jobs_answer_signed_urls_that_download_without_a_key(service, emu):
    answer = service.post("/generate", {"model_name": "flux-dev", "prompt": PROMPT}, ADMIN).json()
    [signed] = answer["signed_urls"]
    job = service.get(f"/jobs/{answer['job_id']}", headers=ADMIN).json()

    assert fetch(service.url + signed).status_code == 200
    assert fetch(service.url + answer["urls"][0]).status_code == 401  # the plain form still needs a key
    assert fetch(service.url + job["items"][0]["signed_urls"][0]).status_code == 200


def test_a_tampered_or_expired_signature_is_forbidden(make_service, emu):
    service = make_service(FILE_URL_SECRET=SECRET)
    [image] = client(service).images.generate(model="flux-dev", prompt=PROMPT).data
    path = urlsplit(image.url).path
    expired = FileSigner(SECRET, ttl=60, clock=lambda: time.time() - 3600).sign(path, service.url)
    tampered = image.url[:-1] + ("0" if image.url[-1] != "0" else "1")
    other = service.post("/generate", {"model_name": "flux-dev", "prompt": "x"}, ADMIN).json()["urls"][0]
    moved = service.url + other + "?" + urlsplit(image.url).query  # a valid signature for another file

    for url in (tampered, expired, moved, f"{service.url}{path}?expires=9999999999&signature=abc"):
        response = fetch(url, headers=ADMIN)  # a key does not rescue a bad signature
        assert response.status_code == 403 and isinstance(response.json()["error"], str), url
    assert "expired" in fetch(expired).json()["error"]
    assert fetch(image.url).status_code == 200


def test_signed_urls_survive_a_restart_with_a_generated_secret(make_service, emu, tmp_path):
    first = make_service()
    secret_file = tmp_path / "output" / SECRET_FILE
    assert not secret_file.exists()  # made when the first link is signed, not before
    [image] = client(first).images.generate(model="flux-dev", prompt=PROMPT).data
    second = make_service()  # another service on the same OUTPUT_DIR, as after a restart
    path, query = urlsplit(image.url).path, parse_qs(urlsplit(image.url).query)

    assert fetch(second.url + path + "?" + urlsplit(image.url).query).status_code == 200
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    FileSigner(StoredSecret(secret_file), ttl=60).verify(path, query["expires"][0], query["signature"][0])


def test_public_base_url_makes_the_links(make_service, emu):
    service = make_service(PUBLIC_BASE_URL="https://images.example.com")
    [image] = client(service).images.generate(model="flux-dev", prompt=PROMPT).data

    assert image.url.startswith("https://images.example.com/files/")
    local = service.url + urlsplit(image.url).path + "?" + urlsplit(image.url).query
    assert fetch(local).status_code == 200
