"""Property-based: malformed input of every shape, at every endpoint, in every header, query
string and path, is a 4xx JSON answer that costs nothing upstream; never a 500, a traceback,
a file outside OUTPUT_DIR, or a service that stops answering /health.

The shapes are the ones that broke the service once: huge whole numbers, lists and objects
where a scalar belongs, text with lone surrogates, deep nesting, NaN and Infinity literals,
non-ASCII bytes in key headers, odd query arguments and paths. Example counts are bounded
so this file runs in well under a minute on a loaded 2-core machine."""
from __future__ import annotations

import json
import math
import re
from urllib.parse import quote, quote_from_bytes

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_functions import MODELS

from helpers import ADMIN, USER_TOKEN

USER = {"X-Replicate-API-Key": USER_TOKEN}
JSON_TYPE = {"Content-Type": "application/json"}
FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def creates(emu) -> int:
    return emu.stats()["counters"].get("create_attempts", 0)


def assert_json_error(r: requests.Response, *statuses: int) -> dict:
    """A 4xx (one of `statuses` if given) in JSON, with no trace of the server's insides."""
    where = f"{r.request.method} {r.request.path_url[:200]}"
    assert 400 <= r.status_code < 500 and (not statuses or r.status_code in statuses), \
        (where, r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json"), where
    assert "Traceback" not in r.text and 'File "' not in r.text, where
    return r.json()


# -- shapes ---------------------------------------------------------------------------------
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=20)  # surrogates (Cs) too
HUGE_INTS = st.integers(min_value=10**20, max_value=10**400) | st.integers(min_value=-10**400, max_value=-10**20)
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308 * 10, 5e-324, 1e300]) | st.floats()
SCALARS = st.none() | st.booleans() | st.integers(-2**40, 2**40) | HUGE_INTS | ODD_FLOATS | ANY_TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=5),
                    max_leaves=12)
WITH_SURROGATE = st.builds(lambda a, s, b: a + s + b, st.text(max_size=6), st.characters(categories=["Cs"]),
                           st.text(max_size=6))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# JSON text that no field accepts, whatever the field: written as text, so NaN, 1e309 and
# nesting deeper than json.dumps could write all reach the service as a client may send them.
HOSTILE = st.one_of(
    HUGE_INTS.map(json.dumps),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e309", "-1e400", "1" + "0" * 400]),
    st.lists(st.none() | st.booleans() | st.integers() | HUGE_INTS | st.lists(st.integers(), max_size=2),
             max_size=3).map(json.dumps),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3).map(json.dumps),
    WITH_SURROGATE.map(json.dumps),  # json.dumps writes a lone surrogate as the escape \ud800
    st.integers(33, 800).map(nested),
)
# URLs that urlparse() refuses (a broken IPv6 host, a port that is no port) or that have no host
BROKEN_URLS = st.one_of(
    st.sampled_from(["http://[x", "https://[::1/a.png", "http://example.com:port/a.png",
                     "https://example.com:99999/a.png", "http://:80/", "https://"]),
    st.builds("https://[{}/a.png".format, st.text(max_size=8).filter(lambda s: "]" not in s)),
    st.builds("http://example.com:{}/a.png".format,
              st.text(alphabet="abc-", min_size=1, max_size=5) | st.integers(65536, 10**9)),
).map(json.dumps)
ROUTE_FIELDS = {"/generate": ["model_name", "prompt", "custom_filename"],
                "/generate-batch": ["model_name", "prompts", "custom_filenames"],
                "/jobs": ["model_name", "prompt", "custom_filename", "webhook"]}
BASES = {"/generate": {"prompt": "x"}, "/generate-batch": {"prompts": ["x"]}, "/jobs": {"prompt": "x"}}
URL_FIELDS = {"image", "input_image", "webhook"}


@st.composite
def one_hostile_field(draw) -> tuple[str, str, str]:
    """(path, body text, field): a valid request but for one field, which holds HOSTILE text."""
    path = draw(st.sampled_from(sorted(BASES)))
    model = draw(st.sampled_from(sorted(MODELS)))
    field = draw(st.sampled_from(ROUTE_FIELDS[path] + sorted(MODELS[model].params)))
    body = {"model_name": model, **BASES[path]}
    if model == "flux-kontext-max":
        body["input_image"] = "https://example.com/a.png"
    body.pop(field, None)
    value = draw(HOSTILE | BROKEN_URLS if field in URL_FIELDS else HOSTILE)
    return path, json.dumps(body)[:-1] + f", {json.dumps(field)}: {value}}}", field


def names(body: dict, field: str) -> bool:
    """The answer names `field` or a part of it (`prompts[2]`)."""
    given_field = str(body.get("field", ""))
    if given_field == field or given_field.startswith((f"{field}[", f"{field}.")):
        return True
    return field == "model_name" and "model_name" in body["error"]  # resolve_model names it in its text


# -- arbitrary JSON, anywhere ---------------------------------------------------------------
BODIES = JSON | st.dictionaries(st.sampled_from(
    ["model_name", "prompt", "prompts", "custom_filename", "custom_filenames", "aspect_ratio", "num_outputs",
     "output_format", "input_image", "seed", "guidance", "megapixels", "concurrent_limit", "requests_per_minute",
     "safety_tolerance", "webhook"]), JSON, max_size=6)
PATHS = st.sampled_from(["/generate", "/generate-batch", "/jobs", "/configure", "/health", "/status", "/models"])
HEADERS = st.sampled_from([ADMIN, USER, {}, {"X-Admin-API-Key": "x"}])


@settings(FUZZ, max_examples=80)
@given(path=PATHS, body=BODIES, headers=HEADERS, method=st.sampled_from(["POST", "GET", "PUT"]))
def test_arbitrary_json_never_breaks_the_service(service, emu, tmp_path, path, body, headers, method):
    """(No count of creates here: a job accepted by an earlier example may still be creating.)"""
    raw = json.dumps(body)  # NaN, Infinity and escaped lone surrogates stay in, as a hostile client may send
    r = service.http.request(method, service.url + path, data=raw, headers={**headers, **JSON_TYPE}, timeout=60)
    assert r.status_code < 500 or r.status_code in (502, 503, 504), (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in r.text and 'File "' not in r.text
    output = tmp_path / "output"
    for found in tmp_path.rglob("*"):
        assert found == output or output in found.parents
    if path == "/configure" and r.status_code == 200:  # keep later examples fast
        service.post("/configure", {"concurrent_limit": 60, "requests_per_minute": 600}, ADMIN)
    assert service.get("/health").json()["status"] == "healthy"


# -- one hostile value in any field, on every endpoint that takes a body ---------------------
@settings(FUZZ, max_examples=120)
@given(case=one_hostile_field())
def test_a_hostile_value_in_any_field_is_a_400_naming_it(make_service, emu, case):
    path, raw, field = case
    service = _with_webhooks(make_service)
    r = service.http.post(service.url + path, data=raw, headers={**ADMIN, **JSON_TYPE}, timeout=60)
    body = assert_json_error(r, 400)
    assert names(body, field), (field, raw[:200], body)
    assert creates(emu) == 0


def _with_webhooks(make_service):
    """One service, with webhooks on, for all examples of a test: `make_service` lives for the
    whole test, so the service hangs off it."""
    if not hasattr(make_service, "with_webhooks"):
        make_service.with_webhooks = make_service(WEBHOOK_SECRET="a-webhook-secret")
    return make_service.with_webhooks


@settings(FUZZ, max_examples=40)
@given(data=st.data(), url=BROKEN_URLS)
def test_a_broken_url_in_any_url_field_is_a_400_naming_it(make_service, emu, data, url):
    path, model, field = data.draw(st.sampled_from([
        ("/generate", "flux-dev", "image"), ("/generate-batch", "qwen-image", "image"),
        ("/jobs", "flux-kontext-max", "input_image"), ("/jobs", "flux-dev", "webhook")]))
    body = {"model_name": model, **BASES[path]}
    if model == "flux-kontext-max":
        body["input_image"] = "https://example.com/a.png"
    body.pop(field, None)
    service = _with_webhooks(make_service)
    raw = json.dumps(body)[:-1] + f", {json.dumps(field)}: {url}}}"
    r = service.http.post(service.url + path, data=raw, headers={**ADMIN, **JSON_TYPE}, timeout=60)
    assert assert_json_error(r, 400).get("field") == field, (raw, r.text)
    assert creates(emu) == 0


# -- deep nesting, built as text ------------------------------------------------------------
OPENERS = {"[": "]", '{"a":': "}", '[{"a":': "}]"}


@settings(FUZZ, max_examples=30)
@given(path=st.sampled_from(["/generate", "/generate-batch", "/jobs", "/configure"]),
       depth=st.integers(33, 200_000), opener=st.sampled_from(sorted(OPENERS)), in_field=st.booleans(),
       closed=st.booleans())
def test_deep_nesting_is_a_400(service, emu, path, depth, opener, in_field, closed):
    inner = opener * depth + ("1" if opener.endswith(":") else "") + (OPENERS[opener] * depth if closed else "")
    raw = f'{{"model_name": "flux-dev", "prompt": {inner}}}' if in_field else inner
    r = service.http.post(service.url + path, data=raw, headers={**ADMIN, **JSON_TYPE}, timeout=60)
    body = assert_json_error(r, 400)
    if in_field and closed:
        assert "nested too deeply" in body["error"], body
    assert creates(emu) == 0


# -- malformed key headers, on every endpoint ------------------------------------------------
PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)
BAD_CHAR = st.characters(min_codepoint=0x80, max_codepoint=0xFF) | st.sampled_from([" ", "\t", "\x7f"])
BAD_TOKEN = st.builds(lambda a, c, b: a + c + b, PRINTABLE, BAD_CHAR, PRINTABLE)
# requests sends a str header as latin-1 (one byte per character) and bytes as they are
HEADER_VALUES = st.one_of(
    BAD_TOKEN,
    BAD_TOKEN.map(lambda s: s.encode("utf-8")),
    st.builds(lambda a, b, c: a.encode() + b + c.encode(), PRINTABLE,
              st.lists(st.integers(0x80, 0xFF), min_size=1, max_size=6).map(bytes), PRINTABLE),
    st.integers(513, 3000).map(lambda n: "k" * n),
)
JOB = "job_0123456789abcdef0123"
ENDPOINTS = [("POST", "/generate", {"model_name": "flux-dev", "prompt": "x"}),
             ("POST", "/generate-batch", {"model_name": "flux-dev", "prompts": ["x"]}),
             ("POST", "/jobs", {"model_name": "flux-dev", "prompt": "x"}),
             ("GET", "/jobs", None), ("GET", f"/jobs/{JOB}", None), ("POST", f"/jobs/{JOB}/cancel", None),
             ("POST", f"/jobs/{JOB}/retry", None), ("GET", "/files/folder/name.png", None),
             ("POST", "/configure", {"concurrent_limit": 5})]


@settings(FUZZ, max_examples=80)
@given(header=st.sampled_from(["X-Replicate-API-Key", "X-Admin-API-Key", "Idempotency-Key"]),
       value=HEADER_VALUES, endpoint=st.sampled_from(ENDPOINTS))
def test_a_malformed_header_is_refused_naming_it(service, emu, header, value, endpoint):
    method, path, body = endpoint
    if header == "X-Replicate-API-Key" and path == "/configure":  # needs the admin key whatever else
        method, path, body = ENDPOINTS[0]
    if header == "Idempotency-Key":
        method, path, body, headers, status = "POST", "/jobs", ENDPOINTS[2][2], {**USER, header: value}, 400
    else:
        headers, status = {header: value}, 401
    r = service.http.request(method, service.url + path, json=body, headers=headers, timeout=60)
    assert assert_json_error(r, status).get("field") == header, r.text
    assert creates(emu) == 0
    assert service.get("/health").json()["concurrency_status"]["concurrent_limit"] == 60


# -- odd query arguments for /jobs -----------------------------------------------------------
QUERY_VALUE = st.one_of(st.none(), st.integers(-10**30, 10**30).map(str), st.text(max_size=12), st.binary(max_size=8),
                        st.sampled_from(["", " 1", "1_0", "\u0661", "1e3", "0x10", "+5", "99999999999999999999"]))


def _query_part(name: str, value: str | bytes) -> str:
    encoded = quote_from_bytes(value, safe="") if isinstance(value, bytes) else quote(value, safe="")
    return f"{name}={encoded}"


def _acceptable(value: str | bytes | None, high: int) -> bool:
    if value is None:
        return True
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return bool(re.fullmatch(r"[0-9]{1,9}", value)) and 1 <= int(value) <= high


@settings(FUZZ, max_examples=60)
@given(page=QUERY_VALUE, per_page=QUERY_VALUE)
def test_odd_page_arguments_are_a_400_naming_them(service, emu, page, per_page):
    query = "&".join(_query_part(n, v) for n, v in [("page", page), ("per_page", per_page)] if v is not None)
    r = service.get(f"/jobs?{query}", headers=USER)
    if _acceptable(page, 1_000_000) and _acceptable(per_page, 100):
        assert r.status_code == 200, (query, r.text)
    else:
        bad = "page" if not _acceptable(page, 1_000_000) else "per_page"
        assert assert_json_error(r, 400).get("field") == bad, (query, r.text)


# -- odd paths under /jobs/ and /files/ -------------------------------------------------------
SEGMENT = st.one_of(
    st.text(min_size=1, max_size=30).map(lambda s: quote(s, safe="")),
    st.binary(min_size=1, max_size=20).map(lambda b: quote_from_bytes(b, safe="")),
    st.sampled_from(["..", ".", "%2e%2e", "%00", "a%00b", "%ED%A0%80", "%FF", "%2F", "%5C", "a" * 3000, "%25"]),
)
ROUTES = ["GET /jobs/{a}", "POST /jobs/{a}/cancel", "POST /jobs/{a}/retry", "GET /jobs/{job}{a}",
          "POST /jobs/{job}{a}/retry", "GET /files/{a}", "GET /files/{a}/{b}", "GET /files/{folder}/{b}",
          "GET /files/{folder}/{b}/{a}", "DELETE /jobs/{a}"]


@settings(FUZZ, max_examples=80)
@given(route=st.sampled_from(ROUTES), a=SEGMENT, b=SEGMENT)
def test_odd_paths_are_a_4xx_json(service, emu, route, a, b):
    job, folder = _one_finished_job(service)
    method, template = route.split(" ")
    path = template.format(a=a, b=b, job=job, folder=folder)
    before = creates(emu)
    r = service.http.request(method, service.url + path, headers=USER, timeout=60)
    assert r.status_code < 500, (path[:200], r.status_code, r.text[:300])
    if r.status_code >= 400:  # below: a real job or file, hit by chance (`job_x%2F` is `job_x/`)
        assert_json_error(r)
    assert creates(emu) == before


def _one_finished_job(service) -> tuple[str, str]:
    """A job of USER's with a saved file, made once per service, so paths can reach real rows."""
    if not hasattr(service, "fuzz_job"):
        made = service.post("/generate", {"model_name": "flux-dev", "prompt": "x"}, USER).json()
        folder = made["files"][0].replace("\\", "/").split("/")[-2]
        service.fuzz_job = (service.get("/jobs", headers=USER).json()["jobs"][0]["job_id"], folder)
    return service.fuzz_job
