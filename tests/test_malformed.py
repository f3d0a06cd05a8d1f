"""Malformed input is a 400 (401 for a key) naming the field, what is wrong and what is
allowed, answered as JSON before anything is spent upstream: never a 500.

One test per shape a tester found, on every endpoint it reaches: lists and objects where a
scalar belongs, numbers of hundreds of digits, lone surrogates, deep nesting, huge or odd
query arguments, non-ASCII bytes in key headers, URLs that break the URL parser."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import requests

from gateway.engine.models import MODELS, check_param, invalid
from gateway.errors import ServiceError

from helpers import ADMIN, GUNICORN, USER_TOKEN, free_port, service_env, start, stop, wait_healthy

USER = {"X-Replicate-API-Key": USER_TOKEN}
JSON_TYPE = {"Content-Type": "application/json"}
BASES = {
    "/generate": {"model_name": "flux-dev", "prompt": "x"},
    "/generate-batch": {"model_name": "flux-dev", "prompts": ["x"]},
    "/jobs": {"model_name": "flux-dev", "prompt": "x"},
}


def send(service, method: str, path: str, body: str | bytes | None = None,
         headers: dict | None = None) -> requests.Response:
    """`body` goes as it is: `json.dumps` keeps NaN and writes a lone surrogate as `\\ud800`."""
    return service.http.request(method, service.url + path, data=body, timeout=60,
                                headers={**JSON_TYPE, **(ADMIN if headers is None else headers)})


def assert_refused(r: requests.Response, emu, field: str | None, status: int = 400) -> dict:
    """The status, a JSON body naming `field` (its `field` and its message), nothing upstream."""
    where = f"{r.request.method} {r.request.path_url}"
    assert r.status_code == status, (where, r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json"), where
    body = r.json()
    if field is not None:
        assert body.get("field") == field and field in body["error"], (where, body)
        assert "allowed" in body["error"], (where, body)
    assert emu.stats()["counters"].get("create_attempts", 0) == 0
    return body


# -- values of the wrong shape in model parameters, on every endpoint that takes them -------
HUGE = 10 ** 400  # 401 digits: math.isfinite() overflows on it
BAD_PARAMS = [
    ("megapixels", [1]),                      # unhashable: `value in aliases` raised TypeError
    ("megapixels", {"a": 1}),
    ("guidance", HUGE),
    ("guidance", [[1]]),
    ("seed", 10 ** 30),                       # went upstream: beyond any model's seed, and sqlite's INTEGER
    ("seed", -(10 ** 30)),
    ("image", "http://[x"),                   # urlparse raised ValueError (a broken IPv6 host)
    ("image", "http://example.com:port/a.png"),  # a port that is not a number went upstream
]


@pytest.mark.parametrize("field,value", BAD_PARAMS, ids=[f"{f}-{str(v)[:12]}" for f, v in BAD_PARAMS])
def test_wrong_shape_in_a_parameter_is_a_400_naming_it(service, emu, field, value):
    for path, base in BASES.items():
        assert_refused(send(service, "POST", path, json.dumps({**base, field: value})), emu, field)


# -- lone surrogates, in every text field ---------------------------------------------------
SURROGATE_BODIES = [
    ("/generate", {"prompt": "a\ud800b"}, "prompt"),
    ("/jobs", {"prompt": "\udfff"}, "prompt"),
    ("/generate-batch", {"prompts": ["fine", "\ud800"]}, "prompts[1]"),
    ("/jobs", {"prompt": None, "prompts": ["\ud800"]}, "prompts[0]"),
    ("/generate", {"image": "https://e.com/\ud800.png"}, "image"),
    ("/generate", {"model_name": "qwen-image", "negative_prompt": "\ud800"}, "negative_prompt"),
    ("/generate", {"model_name": "flux-dev\ud800"}, "model_name"),
    ("/generate", {"custom_filename": "name\ud800"}, "custom_filename"),
    ("/generate-batch", {"custom_filenames": ["\udc00"]}, "custom_filenames[0]"),
    ("/jobs", {"webhook": "https://example.com/\ud800"}, "webhook"),
]


def test_a_lone_surrogate_is_refused_in_every_text_field(service, emu):
    """It cannot be encoded as UTF-8 for the upstream, sqlite or the log."""
    for path, extra, field in SURROGATE_BODIES:
        body = {k: v for k, v in {**BASES[path], **extra}.items() if v is not None}
        assert "surrogate" in assert_refused(send(service, "POST", path, json.dumps(body)), emu, field)["error"]
    key = json.dumps({**BASES["/generate"], "a\ud800": 1})  # in a field name too
    assert "surrogate" in assert_refused(send(service, "POST", "/generate", key), emu, "a\\ud800")["error"]


# -- deep nesting ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["list", "object", "in-a-field"])
def test_json_nested_100000_deep_is_a_400(service, emu, shape):
    depth = 100_000
    raw = {"list": "[" * depth + "]" * depth,
           "object": '{"a":' * depth + "1" + "}" * depth,
           "in-a-field": '{"model_name": "flux-dev", "prompt": ' + "[" * depth + "]" * depth + "}"}[shape]
    for path in [*BASES, "/configure"]:
        body = assert_refused(send(service, "POST", path, raw), emu, None)
        assert "nested too deeply" in body["error"], path


def test_json_nested_past_the_bound_names_the_field(service, emu):
    raw = '{"model_name": "flux-dev", "prompt": "x", "seed": ' + "[" * 40 + "]" * 40 + "}"
    assert "nested too deeply" in assert_refused(send(service, "POST", "/generate", raw), emu, "seed")["error"]


# -- numbers JSON does not have -------------------------------------------------------------
def test_non_finite_and_out_of_range_numbers_name_the_field(service, emu):
    for literal in ["NaN", "Infinity", "-Infinity", "1e309", "-1e400", "1" + "0" * 400, "-" + "9" * 5000]:
        raw = f'{{"model_name": "qwen-image", "prompt": "x", "lora_scale": {literal}}}'
        assert_refused(send(service, "POST", "/generate", raw), emu, "lora_scale")
        raw = f'{{"concurrent_limit": {literal}}}'
        assert_refused(send(service, "POST", "/configure", raw), emu, "concurrent_limit")


def test_check_param_takes_any_json_value():
    """The parameter checker alone: a huge int, a list, an object are 400s, not TypeError or
    OverflowError; the message shows a huge value cut short."""
    params = MODELS["flux-dev"].params
    for name, value in [("guidance", HUGE), ("megapixels", [1]), ("megapixels", {"a": 1}), ("seed", 2 ** 63)]:
        with pytest.raises(ServiceError) as caught:
            check_param(name, params[name], value)
        assert caught.value.status == 400 and caught.value.extra["field"] == name
    assert len(invalid("seed", 10 ** 5000, "a whole number").message) < 200
    assert len(invalid("prompt", "x" * 10 ** 6, "a string").message) < 200


# -- query strings --------------------------------------------------------------------------
def test_odd_page_arguments_are_a_400_naming_them(service, emu):
    for query, field in [
        ("page=99999999999999999999", "page"),    # sqlite OverflowError on the offset
        ("page=1000001", "page"),
        ("page=1&per_page=99999999999999999999", "per_page"),
        ("page=%D9%A1", "page"),                   # an Arabic-Indic one: int() takes it, the rule does not
        ("per_page=1_0", "per_page"),
    ]:
        assert_refused(service.get(f"/jobs?{query}", headers=USER), emu, field)
    assert service.get("/jobs?page=1000000&per_page=100", headers=USER).status_code == 200


# -- headers --------------------------------------------------------------------------------
ENDPOINTS = [
    ("POST", "/generate", json.dumps(BASES["/generate"])),
    ("POST", "/generate-batch", json.dumps(BASES["/generate-batch"])),
    ("POST", "/jobs", json.dumps(BASES["/jobs"])),
    ("GET", "/jobs", None),
    ("GET", "/jobs/job_0123456789abcdef0123", None),
    ("POST", "/jobs/job_0123456789abcdef0123/cancel", None),
    ("POST", "/jobs/job_0123456789abcdef0123/retry", None),
    ("GET", "/files/folder/name.png", None),
]
BAD_TOKENS = ["r8_\xe9t\xe9",             # requests sends a str header as latin-1: one byte 0xE9
              "r8_caf\xc3\xa9".encode("latin-1"),  # the UTF-8 bytes of "é", sent raw
              "r8_two words", "r8_" + "x" * 600]


@pytest.mark.parametrize("token", BAD_TOKENS, ids=["latin-1", "utf-8", "space", "long"])
def test_a_malformed_user_key_is_a_401_naming_the_header(service, emu, token):
    for method, path, body in ENDPOINTS:
        r = send(service, method, path, body, {"X-Replicate-API-Key": token})
        assert_refused(r, emu, "X-Replicate-API-Key", 401)


@pytest.mark.parametrize("token", BAD_TOKENS, ids=["latin-1", "utf-8", "space", "long"])
def test_a_malformed_admin_key_is_a_401_naming_the_header(service, emu, token):
    for method, path, body in [*ENDPOINTS, ("POST", "/configure", '{"concurrent_limit": 5}')]:
        r = send(service, method, path, body, {"X-Admin-API-Key": token})
        assert_refused(r, emu, "X-Admin-API-Key", 401)
    assert service.get("/health").json()["concurrency_status"]["concurrent_limit"] == 60


def test_a_malformed_idempotency_key_is_a_400_naming_the_header(service, emu):
    for key in ["k\xe9", "caf\xc3\xa9".encode("latin-1"), "two words", "k" * 201]:
        r = send(service, "POST", "/jobs", json.dumps(BASES["/jobs"]), {**USER, "Idempotency-Key": key})
        assert_refused(r, emu, "Idempotency-Key")
    assert service.get("/jobs", headers=USER).json()["jobs"] == []


# -- webhooks: the URL parser raises on some strings ----------------------------------------
def test_an_odd_webhook_is_a_400_naming_it(make_service, emu):
    service = make_service(WEBHOOK_SECRET="a-webhook-secret")
    for webhook in ["http://[x", "https://example.com:port/hook", 5, ["http://e.com"], {"url": "http://e.com"}, True]:
        r = send(service, "POST", "/jobs", json.dumps({**BASES["/jobs"], "webhook": webhook}))
        assert r.status_code == 400 and r.json()["field"] == "webhook", (webhook, r.text)
    assert emu.stats()["counters"].get("create_attempts", 0) == 0


# -- the same under gunicorn, whose request parsing is not werkzeug's -------------------------
def test_malformed_input_under_gunicorn(emulator_server, emu, tmp_path):
    port = free_port()
    proc = start([sys.executable, *GUNICORN],
                 service_env(emulator_server, tmp_path, port), tmp_path)
    service = SimpleNamespace(url=f"http://127.0.0.1:{port}", http=requests.Session())
    generate = json.dumps(BASES["/generate"])
    try:
        wait_healthy(service.url, proc)
        for method, path, body, headers, status, field in [
            ("POST", "/generate", generate, {"X-Replicate-API-Key": "r8_\xe9"}, 401, "X-Replicate-API-Key"),
            ("GET", "/jobs", None, {"X-Replicate-API-Key": "r8_caf\xc3\xa9".encode("latin-1")}, 401,
             "X-Replicate-API-Key"),
            ("POST", "/configure", '{"concurrent_limit": 5}', {"X-Admin-API-Key": "\xff"}, 401, "X-Admin-API-Key"),
            ("POST", "/jobs", generate, {**USER, "Idempotency-Key": "k\xe9"}, 400, "Idempotency-Key"),
            ("POST", "/generate", json.dumps({**BASES["/generate"], "megapixels": [1]}), None, 400, "megapixels"),
            ("POST", "/generate", json.dumps({**BASES["/generate"], "guidance": HUGE}), None, 400, "guidance"),
            ("POST", "/generate", json.dumps({**BASES["/generate"], "prompt": "\ud800"}), None, 400, "prompt"),
            ("POST", "/generate", "[" * 100_000, None, 400, None),
            ("GET", "/jobs?page=99999999999999999999", None, USER, 400, "page"),
        ]:
            assert_refused(send(service, method, path, body, headers), emu, field, status)
    finally:
        stop(proc)
