"""The OpenAPI 3.0 document of the service (`GET /openapi.json`), built from the same
constants the service validates with, so it cannot drift from them:

- request bodies from the request parser's field sets (`api/parsing.py`) and the model
  registry's parameter table (`engine/models.py`: types, choices, bounds, defaults, which
  parameters are required), the limits from the settings (MAX_PROMPT_LENGTH,
  MAX_BATCH_SIZE, the name rules of `engine/files.py`);
- security from the settings (METRICS_REQUIRE_KEY puts /metrics behind the admin key).

What cannot be derived (the shape of each answer) is written here once, and
tests/test_openapi.py holds it to the truth: it validates the document, checks that every
route of the app is documented, and runs schemathesis against the live service.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask

from gateway.api.body import MAX_DEPTH
from gateway.api.job_routes import MAX_KEY, MAX_PAGE
from gateway.api.openai_params import EDIT_FIELDS, GENERATION_FIELDS, MAX_IMAGES, RESPONSE_FORMATS
from gateway.api.parsing import BATCH_FIELDS, JOB_FIELDS, SINGLE_FIELDS
from gateway.config import Settings
from gateway.engine.files import MAX_NAME, NAME_RULE
from gateway.engine.models import MAX_URI_LENGTH, MAX_WHOLE, MODELS, ModelSpec, Param
from gateway.logs import REQUEST_ID

VERSION = "1.0.0"
JSON = "application/json"
ADMIN = {"adminKey": []}
USER = {"replicateToken": []}
BEARER = {"bearer": []}
EITHER = [ADMIN, USER]
PUBLIC: list[dict] = []
# Documented here because it describes routes the app registers: checked against the URL map
# by the tests, so a new route fails them until it is described.
UNDOCUMENTED = frozenset({"/static/<path:filename>"})
# Routes whose one path variable holds a whole sub-path, documented by its parts.
SPELLED = {"/files/<path:relative>": "/files/{folder}/{name}", "/ui/static/<path:filename>": "/ui/static/{filename}"}


def ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def schema(name: str) -> dict[str, str]:
    return ref("schemas", name)


# -- request bodies ----------------------------------------------------------------------------
def param_schema(param: Param) -> dict[str, Any]:
    """A model parameter's rule (engine/models.py `Param`) as a JSON schema."""
    out: dict[str, Any] = {
        "string": {"type": "string"}, "integer": {"type": "integer"}, "number": {"type": "number"},
        "boolean": {"type": "boolean"}, "array": {"type": "array"}, "object": {"type": "object"},
        "image": {"type": "string", "format": "uri", "maxLength": MAX_URI_LENGTH},
        "uri": {"type": "string", "format": "uri", "maxLength": MAX_URI_LENGTH},
    }.get(param.kind, {})
    out = dict(out)
    if param.choices or param.aliases:
        out["enum"] = [*param.choices, *param.aliases]
        if any(not isinstance(v, str) for v in out["enum"]):
            out.pop("type", None)  # megapixels: "1" or 1
    if param.kind in ("integer", "number"):
        out["minimum"] = -MAX_WHOLE if param.minimum is None else param.minimum
        out["maximum"] = MAX_WHOLE if param.maximum is None else param.maximum
    if param.nullable:
        out["nullable"] = True
        if "enum" in out:
            out["enum"].append(None)
    if param.default is not None:
        out["default"] = param.default
    out["description"] = param.describe()
    return out


def request_fields(settings: Settings) -> dict[str, dict[str, Any]]:
    """The request's own fields (not model parameters): every name in parsing.JOB_FIELDS."""
    return {
        "model_name": {"type": "string", "description": "A model id (GET /models) or its Replicate name"},
        "prompt": schema("Prompt"),
        "custom_filename": schema("FileName"),
        "prompts": {"type": "array", "minItems": 1, "maxItems": settings.max_batch_size, "items": schema("Prompt"),
                    "description": "One item per prompt (MAX_BATCH_SIZE)"},
        "custom_filenames": {"type": "array", "items": schema("FileName"), "maxItems": settings.max_batch_size,
                             "description": "One name per prompt, in order"},
        "webhook": {"type": "string", "format": "uri", "maxLength": 2000,
                    "description": "Called (signed, see README) when the job is final; needs WEBHOOK_SECRET"},
    }


def _variant(spec: ModelSpec, fields: frozenset[str], settings: Settings, *required: str) -> dict[str, Any]:
    props = {name: request_fields(settings)[name] for name in sorted(fields)}
    props["model_name"] = {"type": "string", "enum": [spec.id, spec.replicate_name]}
    props.update({name: param_schema(param) for name, param in spec.params.items()})
    return {"type": "object", "title": spec.id, "additionalProperties": not spec.closed,
            "required": ["model_name", *required, *spec.required], "properties": props}


def _any_model(fields: frozenset[str], settings: Settings, *required: str) -> dict[str, Any]:
    """Any other Replicate model: its parameters are its published input schema's
    (GET /models/{name} shows them), checked when the request arrives."""
    props = {name: request_fields(settings)[name] for name in sorted(fields)}
    props["model_name"] = {"type": "string", "minLength": 1,
                           "description": "owner/name, owner/name:version, deployments/owner/name, or an alias "
                                          "(MODELS_FILE), within ALLOWED_MODELS"}
    return {"type": "object", "title": "any other model", "additionalProperties": True,
            "required": ["model_name", *required], "properties": props}


def generation_body(settings: Settings, fields: frozenset[str], *required: str) -> dict[str, Any]:
    """A body of /generate, /generate-batch or one form of /jobs: one variant per curated
    model (its parameter table), and one for any other model."""
    return {"anyOf": [*(_variant(spec, fields, settings, *required) for spec in MODELS.values()),
                      _any_model(fields, settings, *required)]}


def job_body(settings: Settings) -> dict[str, Any]:
    single = SINGLE_FIELDS | (JOB_FIELDS - SINGLE_FIELDS - BATCH_FIELDS)
    batch = BATCH_FIELDS | (JOB_FIELDS - SINGLE_FIELDS - BATCH_FIELDS)
    return {"anyOf": [*generation_body(settings, single, "prompt")["anyOf"],
                      *generation_body(settings, batch, "prompts")["anyOf"]]}


# -- answers -----------------------------------------------------------------------------------
def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", **({"required": required} if required else {}), "properties": props}


STR, INT, BOOL, NUM = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
NSTR = {"type": "string", "nullable": True}
STRS = {"type": "array", "items": STR}


def answer_schemas(settings: Settings) -> dict[str, Any]:
    concurrency = _obj(["concurrent_limit", "requests_per_minute", "current_concurrent", "queued"],
                       concurrent_limit=INT, requests_per_minute=INT, current_concurrent=INT, slots_in_use=INT,
                       queued=INT, creates_in_window=INT, active_accounts=INT)
    item_result = _obj(["prompt_index", "prompt", "prediction_id"], prompt_index=INT, prompt=STR, files=STRS,
                       urls=STRS, signed_urls=STRS, prediction_id=NSTR, error=STR, output={})
    job_item = _obj(["index", "prompt", "status", "files", "urls", "error", "prediction_id"],
                    index=INT, prompt=STR, status=schema("ItemStatus"), files=STRS, urls=STRS, error=NSTR,
                    prediction_id=NSTR, started_at=NSTR, finished_at=NSTR)
    return {
        "Error": {**_obj(["error", "request_id"], error=STR, request_id=STR, field=STR, allowed=STR,
                         allowed_fields=STRS, supported_models=STRS,
                         invalid_fields={"type": "array", "items": {"type": "object"}}),
                  "description": "Every error answer: what is wrong (and allowed), and the request's id"},
        "Prompt": {"type": "string", "minLength": 1, "maxLength": settings.max_prompt_length, "pattern": r"\S",
                   "description": "Not blank; at most MAX_PROMPT_LENGTH characters"},
        "FileName": {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "description": NAME_RULE},
        "ItemStatus": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]},
        "JobStatus": {"type": "string"},
        "ConcurrencyStatus": concurrency,
        "Health": _obj(["status", "service", "supported_models", "concurrency_status"], status=STR, service=STR,
                       supported_models=STRS, concurrency_status=schema("ConcurrencyStatus"), error=STR),
        "Status": _obj(["status", "service", "concurrency_status"], status=STR, service=STR,
                       concurrency_status=schema("ConcurrencyStatus"), sync_requests={"type": "object"},
                       admin_access_enabled=BOOL, server_token_configured=BOOL, limits={"type": "object"}),
        "Models": _obj(["supported_models", "models"], supported_models=STRS,
                       models={"type": "array", "items": {"type": "object"}}),
        "GenerateResult": _obj(["success", "model_name", "files", "urls", "count", "prediction_id", "job_id"],
                               success=BOOL, model_name=STR, files=STRS, urls=STRS, signed_urls=STRS, count=INT,
                               prediction_id=NSTR, job_id=STR, output={}),
        "BatchResult": _obj(["success", "model_name", "job_id", "total_prompts", "successful_count", "failed_count",
                             "successful_results", "failed_results"],
                            success=BOOL, model_name=STR, job_id=STR, total_prompts=INT, successful_count=INT,
                            failed_count=INT, successful_results={"type": "array", "items": item_result},
                            failed_results={"type": "array", "items": item_result}),
        "Configured": _obj(["success", "concurrency_status"], success=BOOL,
                           concurrency_status=schema("ConcurrencyStatus")),
        "JobAccepted": _obj(["job_id", "status", "status_url"], job_id=STR, status=schema("JobStatus"),
                            status_url=STR),
        "Job": _obj(["job_id", "status", "model_name", "created_at", "finished_at", "total", "counts", "items"],
                    job_id=STR, status=schema("JobStatus"), model_name=STR, created_at=STR, finished_at=NSTR,
                    total=INT, counts={"type": "object", "additionalProperties": INT},
                    items={"type": "array", "items": job_item}),
        "JobList": _obj(["jobs", "page", "per_page", "next_page"], page=INT, per_page=INT,
                        next_page={"type": "integer", "nullable": True},
                        jobs={"type": "array", "items": _obj(["job_id", "status", "status_url"], job_id=STR,
                                                             status=schema("JobStatus"), model_name=STR, kind=STR,
                                                             created_at=STR, status_url=STR)}),
        "Retried": _obj(["job_id", "retried", "status_url"], job_id=STR, retried={"type": "array", "items": INT},
                        status_url=STR),
        "OpenAIError": {**_obj(["error", "request_id"], request_id=STR, error=_obj(
            ["message", "type"], message=STR, type=STR, param=NSTR, code=NSTR)),
                        "description": "OpenAI's error shape (its SDKs map the status to an exception)"},
        "OpenAIImages": _obj(["created", "data"], created=INT, job_id=STR, data={"type": "array", "items": _obj(
            [], url=STR, b64_json=STR, revised_prompt=STR)}),
        "Ready": _obj(["status", "checks"], status={"type": "string", "enum": ["ready", "not ready"]},
                      checks={"type": "object", "additionalProperties": STR}, error=STR, request_id=STR),
    }


ERRORS = {
    400: "Invalid input: the field, what was given and what is allowed (nothing is spent upstream)",
    401: "No key, a wrong key, or (passed on from Replicate) a token it refuses",
    402: "Replicate: insufficient credit on the token",
    403: "The model is not allowed here (ALLOWED_MODELS), or a signed link does not verify",
    404: "Not found (or not yours)",
    409: "Conflict: canceled, still running, or an Idempotency-Key reused with another body",
    413: "Request body larger than MAX_CONTENT_LENGTH",
    422: "Replicate refused the input (invalid_fields has its reasons)",
    500: "The generation failed (the upstream's reason in `error`), or an internal error",
    502: "Replicate kept failing (5xx or unreachable) for the whole retry budget",
    503: "Busy (MAX_SYNC_REQUESTS), stopping, or shared limits unavailable: retry after Retry-After",
    504: "Not done within GENERATION_TIMEOUT or BATCH_TIMEOUT (the prediction was canceled upstream)",
}


def _headers(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"X-Request-ID": ref("headers", "RequestId"), **(extra or {})}


def ok(description: str, body: dict[str, Any] | None, *media: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "headers": _headers()}
    if body is not None:
        answer["content"] = {kind: {"schema": body} for kind in media or (JSON,)}
    return answer


def errors(*codes: int) -> dict[str, Any]:
    out = {}
    for code in codes:
        extra = {"Retry-After": ref("headers", "RetryAfter")} if code == 503 else None
        out[str(code)] = {"description": ERRORS[code], "headers": _headers(extra),
                          "content": {JSON: {"schema": schema("Error")}}}
    return out


def operation(summary: str, responses: dict[str, Any], security: list[dict], tag: str,
              body: dict[str, Any] | None = None, params: list[dict] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "security": security,
                          "parameters": [ref("parameters", "RequestId"), *(params or [])], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    return op


def path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": STR, "description": description}


def query_param(name: str, high: int, default: int) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": high, "default": default}}


# -- the document --------------------------------------------------------------------------------
def paths(settings: Settings) -> dict[str, Any]:
    generation_errors = errors(400, 401, 402, 403, 404, 409, 413, 422, 500, 502, 503, 504)
    metrics_security = [ADMIN] if settings.metrics_require_key else PUBLIC
    return {
        "/health": {"get": operation("Liveness, and the concurrency status", {
            "200": ok("The service is up", schema("Health")),
            "503": ok("Up, but the shared limits (REDIS_URL) do not answer", schema("Health"))}, PUBLIC, "service")},
        "/ready": {"get": operation("Readiness: 503 with the reason while the service cannot do its work", {
            "200": ok("Ready: journal and output folder writable, Redis answering, start-up recovery done",
                      schema("Ready")),
            "503": {**ok("Not ready, and why", schema("Ready")),
                    "headers": _headers({"Retry-After": ref("headers", "RetryAfter")})}}, PUBLIC, "service")},
        "/status": {"get": operation("Limits, in-flight counts and settings", {
            "200": ok("The status", schema("Status"))}, PUBLIC, "service")},
        "/models": {"get": operation("The supported models and their parameters", {
            "200": ok("The models", schema("Models"))}, PUBLIC, "generation")},
        "/models/{name}": {"get": operation("One model's parameters (its schema is read upstream if needed)", {
            "200": ok("The model", {"type": "object", "required": ["id", "parameters"]}),
            **errors(400, 401, 403, 404, 502, 503)}, [*EITHER, {}], "generation",
            params=[path_param("name", "owner/name, owner/name:version, deployments/owner/name or an alias")])},
        "/generate": {"post": operation("Generate with one prompt, synchronously", {
            "200": ok("The saved files", schema("GenerateResult")), **generation_errors}, EITHER, "generation",
            generation_body(settings, SINGLE_FIELDS, "prompt"))},
        "/generate-batch": {"post": operation("Generate with several prompts at once, synchronously", {
            "200": ok("Every item's files or error", schema("BatchResult")),
            **errors(400, 401, 402, 403, 404, 413, 502, 503)}, EITHER, "generation",
            generation_body(settings, BATCH_FIELDS, "prompts"))},
        "/configure": {"post": operation("Change the concurrency and rate limits at run time", {
            "200": ok("The new limits", schema("Configured")), **errors(400, 401, 413, 503)}, [ADMIN], "service",
            {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
                "concurrent_limit": {"type": "integer", "minimum": 1, "maximum": 5000},
                "requests_per_minute": {"type": "integer", "minimum": 1, "maximum": 100000}}})},
        "/jobs": {
            "post": operation("Submit a durable job (one prompt or several)", {
                "202": {**ok("A new job", schema("JobAccepted")),
                        "headers": _headers({"Location": {"schema": STR}})},
                "200": {**ok("The job this Idempotency-Key already made", schema("JobAccepted")),
                        "headers": _headers({"Location": {"schema": STR}})},
                **errors(400, 401, 403, 404, 409, 413, 502, 503)}, EITHER, "jobs", job_body(settings),
                [ref("parameters", "IdempotencyKey")]),
            "get": operation("Your jobs, newest first (every job for the admin)", {
                "200": ok("A page of jobs", schema("JobList")), **errors(400, 401)}, EITHER, "jobs",
                params=[query_param("page", MAX_PAGE, 1), query_param("per_page", 100, 20)])},
        "/jobs/{job_id}": {"get": operation("A job and its items", {
            "200": ok("The job", schema("Job")), **errors(401, 404)}, EITHER, "jobs",
            params=[path_param("job_id", "The job's id")])},
        "/jobs/{job_id}/cancel": {"post": operation("Cancel a job's unfinished items (and their predictions)", {
            "200": ok("The job as it stands", schema("JobAccepted")), **errors(401, 404)}, EITHER, "jobs",
            params=[path_param("job_id", "The job's id")])},
        "/jobs/{job_id}/retry": {"post": operation("Run a finished job's failed and canceled items again", {
            "202": ok("Which items run again", schema("Retried")), **errors(401, 404, 409, 503)}, EITHER,
            "jobs", params=[path_param("job_id", "The job's id")])},
        "/files/{folder}/{name}": {"get": operation("Download a saved file (or its provenance record)", {
            "200": ok("The file (its type from its extension)", {"type": "string", "format": "binary"}, "*/*"),
            **errors(401, 403, 404)}, EITHER, "jobs",
            params=[path_param("folder", "The request's folder"), path_param("name", "The file's name"),
                    {"name": "expires", "in": "query", "required": False, "schema": STR,
                     "description": "A signed link's expiry (with `signature` no key is needed)"},
                    {"name": "signature", "in": "query", "required": False, "schema": STR}])},
        **ui_paths(),
        **openai_paths(settings),
        "/metrics": {"get": operation("Prometheus metrics (text format)", {
            "200": ok("The metrics", STR, "text/plain"),
            **(errors(401) if settings.metrics_require_key else {})}, metrics_security, "service")},
        "/openapi.json": {"get": operation("This document", {
            "200": ok("The OpenAPI document", {"type": "object"})}, PUBLIC, "service")},
        "/docs": {"get": operation("A readable page of this document (works offline)", {
            "200": ok("HTML", STR, "text/html")}, PUBLIC, "service")},
        "/docs/assets/{name}": {"get": operation("The page's scripts and styles", {
            "200": ok("The asset", STR, "text/css", "text/javascript", "image/png"), **errors(404)}, PUBLIC, "service",
            params=[path_param("name", "An asset's file name")])},
    }


def ui_paths() -> dict[str, Any]:
    """The web gallery (api/ui.py): page shells; the key stays in the browser."""
    page = {"200": ok("The page", STR, "text/html")}
    pages = {"/ui": "The key page", "/ui/": "The key page", "/ui/jobs": "Your jobs", "/ui/jobs/new": "A new batch",
             "/ui/jobs/{job_id}": "One job's thumbnails", "/ui/files/{folder}/{name}": "One image and its provenance"}
    paths = {}
    for path, summary in pages.items():
        params = [path_param(name, name) for name in ("job_id", "folder", "name") if f"{{{name}}}" in path]
        paths[path] = {"get": operation(f"Gallery: {summary}", page, PUBLIC, "gallery", params=params)}
    paths["/ui/static/{filename}"] = {"get": operation("Gallery: scripts and styles", {
        "200": ok("The file", STR, "text/css", "text/javascript", "application/javascript", "image/png",
                  "image/svg+xml"), **errors(404)}, PUBLIC, "gallery", params=[path_param("filename", "A file")])}
    return paths


def _openai_errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"description": ERRORS.get(code, "An error in OpenAI's shape"), "headers": _headers(),
                        "content": {JSON: {"schema": schema("OpenAIError")}}} for code in codes}


def openai_paths(settings: Settings) -> dict[str, Any]:
    """The OpenAI-compatible images API (api/openai.py): its field sets, OpenAI's error shape."""
    common = {"model": {"type": "string", "minLength": 1, "example": next(iter(MODELS)),
                        "description": "A model id, alias or Replicate name (GET /v1/models)"},
              "prompt": schema("Prompt"),
              "n": {"type": "integer", "minimum": 1, "maximum": min(MAX_IMAGES, settings.max_batch_size)},
              "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)}}
    fields = lambda names: {name: common.get(name, {}) for name in sorted(names)}  # noqa: E731
    images = {"200": ok("The images", schema("OpenAIImages")), **_openai_errors(400, 401, 403, 404, 413, 429, 500)}
    upload = {"type": "string", "format": "binary"}
    edit = {"type": "object", "required": ["model", "image", "prompt"], "additionalProperties": False,
            "properties": {**fields(EDIT_FIELDS - {"n"}), "n": common["n"], "image": upload, "mask": upload}}
    return {
        "/v1/images/generations": {"post": operation("OpenAI-compatible: generate images", images, [BEARER],
                                                     "openai", {"type": "object", "required": ["model", "prompt"],
                                                                "additionalProperties": False,
                                                                "properties": fields(GENERATION_FIELDS)})},
        "/v1/images/edits": {"post": {**operation("OpenAI-compatible: edit an image", images, [BEARER], "openai"),
                                      "requestBody": {"required": True,
                                                      "content": {"multipart/form-data": {"schema": edit}}}}},
        "/v1/models": {"get": operation("OpenAI-compatible: the models you may run", {
            "200": ok("A list", {"type": "object", "required": ["object", "data"]}),
            **_openai_errors(401)}, [BEARER], "openai")},
        "/v1/models/{model_id}": {"get": operation("OpenAI-compatible: one model", {
            "200": ok("The model", {"type": "object", "required": ["id", "object"]}),
            **_openai_errors(400, 401, 403, 404, 429, 500)}, [BEARER], "openai",
            params=[path_param("model_id", "A model id, as /v1/models lists")])},
    }


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of a service with these settings."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "Replicate Concurrent Generation API", "version": VERSION,
                 "description": "A gateway in front of Replicate: limits per account, durable jobs, "
                                "files saved under your names. Errors answer JSON with `error` and `request_id`."},
        "servers": [{"url": "/"}],
        "tags": [{"name": name} for name in ("generation", "jobs", "service", "openai", "gallery")],
        "paths": paths(settings),
        "components": {
            "securitySchemes": {
                "adminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-API-Key",
                             "description": "CONCURRENT_DOCKER_ADMIN_API_KEY: runs on the server's token"},
                "replicateToken": {"type": "apiKey", "in": "header", "name": "X-Replicate-API-Key",
                                   "description": "Your own Replicate token, for this request only"},
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The OpenAI-compatible API (/v1): the admin key or a Replicate token"},
            },
            "parameters": {
                "RequestId": {"name": "X-Request-ID", "in": "header", "required": False,
                              "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
                              "description": "Your id for this request, echoed in the answer and the logs; "
                                             "a value that does not match is replaced by a new one"},
                "IdempotencyKey": {"name": "Idempotency-Key", "in": "header", "required": False,
                                   "schema": {"type": "string", "pattern": f"^[!-~]{{1,{MAX_KEY}}}$"},
                                   "description": "The same key and body give the same job (200), "
                                                  "another body a 409"},
            },
            "headers": {
                "RequestId": {"description": "The request's id (yours if sane, else a new one)", "required": True,
                              "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"}},
                "RetryAfter": {"description": "Seconds to wait before trying again",
                               "schema": {"type": "string", "pattern": "^[0-9]+$"}},
            },
            "schemas": answer_schemas(settings),
        },
        "x-limits": {"max_body_nesting": MAX_DEPTH, "max_prompt_length": settings.max_prompt_length},
    }


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(path, method) of every documented operation, for the tests' comparison with the app."""
    return {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}


def app_routes(app: Flask | Blueprint) -> set[tuple[str, str]]:
    """(path in OpenAPI's spelling, method) of every route of the app."""
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.rule in UNDOCUMENTED:
            continue
        path = SPELLED.get(rule.rule, rule.rule)
        for converter in ("path:", "int:", "string:"):
            path = path.replace(f"<{converter}", "<")
        path = path.replace("<", "{").replace(">", "}")
        found |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return found
