"""The OpenAPI document: valid, describing every route the app has (and no other), built from
the parser's and the registry's own rules, readable at /docs without the network, and true
of the live service: schemathesis calls every operation, as the admin and as a user, and
every answer must be documented (status, headers, body) and none a 500."""
from __future__ import annotations

import re

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.api.openapi import app_routes, document, documented_routes, param_schema
from gateway.api.parsing import JOB_FIELDS
from gateway.config import Settings
from gateway.engine.models import MODELS
from gateway.state import gateway_state

from helpers import ADMIN, ADMIN_KEY, USER_TOKEN

# The service schemathesis runs against: small bounds, so generated batches stay small and
# generated generations finish quickly against the emulator.
CONFIG = {"MAX_BATCH_SIZE": "3", "MAX_PROMPT_LENGTH": "200", "GENERATION_TIMEOUT": "10", "BATCH_TIMEOUT": "10",
          "WEBHOOK_SECRET": "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXQ=", "WEBHOOK_ALLOW_PRIVATE": "true"}
DOCUMENT = document(Settings.from_mapping(CONFIG))
# Both keys of each caller: the headers of the spec's API, and the bearer of the OpenAI one (/v1).
CALLERS = {"admin": {**ADMIN, "Authorization": f"Bearer {ADMIN_KEY}"},
           "user": {"X-Replicate-API-Key": USER_TOKEN, "Authorization": f"Bearer {USER_TOKEN}"}}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
EXAMPLES = 12  # per operation and caller: bounded, for CI
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_document_is_valid_openapi(service):
    served = service.get("/openapi.json").json()
    validate(served)
    assert served == document(gateway_state(service.app).settings)
    validate(DOCUMENT)


def test_every_route_of_the_app_is_documented_and_nothing_else(service):
    documented, routes = documented_routes(service.get("/openapi.json").json()), app_routes(service.app)
    assert routes - documented == set(), "routes missing from the document"
    assert documented - routes == set(), "documented operations the app does not have"


def test_schemathesis_covers_every_operation():
    """Nothing is skipped silently: the run below has one test per documented operation."""
    covered = {(op.ok().path, op.ok().method.upper()) for op in schema.get_all_operations()}
    assert covered == documented_routes(DOCUMENT)


def test_the_bodies_are_the_parsers_and_the_registrys_rules():
    """Every request field the parser accepts is described, and each model's parameters are its
    registry entries (choices, bounds, defaults, required)."""
    variants = DOCUMENT["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    described = set().union(*(v["properties"] for v in variants))
    assert JOB_FIELDS <= described
    for spec in MODELS.values():
        mine = [v for v in variants if v["title"] == spec.id]
        assert len(mine) == 2  # one prompt, or several
        for variant in mine:
            assert {k: variant["properties"][k] for k in spec.params} == {
                k: param_schema(p) for k, p in spec.params.items()}
            assert set(spec.required) <= set(variant["required"]) and variant["additionalProperties"] is False


@pytest.mark.parametrize("model", list(MODELS))
def test_a_value_past_a_documented_bound_is_refused_by_the_service(service, emu, model):
    """The document and the service agree: one past each documented maximum is a 400, and
    nothing reaches the upstream."""
    body_schema = DOCUMENT["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    [variant] = [v for v in body_schema["anyOf"] if v["title"] == model]
    base = {"model_name": model, "prompt": "x", **({"input_image": "https://example.com/a.png"}
                                                    if "input_image" in variant["required"] else {})}
    bounded = {k: p["maximum"] for k, p in variant["properties"].items() if p.get("maximum") is not None}
    assert bounded
    for name, high in bounded.items():
        r = service.post("/generate", {**base, name: high + 1}, ADMIN)
        assert r.status_code == 400 and r.json()["field"] == name, (name, r.text)
    assert emu.stats()["counters"] == {}


def test_the_docs_page_works_offline(service):
    page = service.get("/docs")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe-eval" not in policy
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert links and not [link for link in links if "//" in link]  # nothing from another host
    for link in links:
        asset = service.get("/" + link)
        assert asset.status_code == 200 and asset.content, link
    assert "validatorUrl: null" in service.get("/docs/assets/docs.js").text  # no call to swagger.io
    assert service.get("/docs/assets/../openapi.py").status_code == 404


@pytest.fixture(params=sorted(CALLERS))
def caller(request) -> dict[str, str]:
    return CALLERS[request.param]


@pytest.fixture
def live(make_service, emu):
    """A fresh service per operation: /configure or a job cannot change another's run."""
    service = make_service(**CONFIG)
    assert service.get("/openapi.json").json() == DOCUMENT  # the document tested is the one served
    return service


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_the_live_service_answers_as_documented(case, live, caller):
    case.call_and_validate(base_url=live.url, headers=caller, checks=CHECKS, session=requests.Session())
