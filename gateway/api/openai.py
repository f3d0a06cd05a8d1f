"""An OpenAI-compatible images API, so OpenAI's SDKs run Replicate models through the gateway.

    POST /v1/images/generations   JSON, OpenAI's request shape (see openai_params.py)
    POST /v1/images/edits         multipart: image, optional mask, prompt, n, size, model
    GET  /v1/models[/<id>]        the models callers may run, in OpenAI's list shape

Auth is `Authorization: Bearer <key>` (auth.authenticate_bearer). An `n`-image request is
one synchronous job of `n` items (journaled, visible in /jobs), run as /generate-batch runs
its prompts. `url` answers are signed links to the gateway's own `/files/...`, absolute
(PUBLIC_BASE_URL, else the request's host), that download without a key.

Errors here, and only here, answer OpenAI's shape `{"error": {"message", "type", "param",
"code"}}` with the statuses its SDKs map to exception classes (400, 401, 403, 404, 429,
500); the gateway's own limit (MAX_SYNC_REQUESTS) is a 429 with `Retry-After`.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException

from gateway.accounts import Caller
from gateway.api.auth import current_bearer_caller
from gateway.api.openai_params import (
    EDIT_FIELDS,
    EDIT_IMAGE_PARAMS,
    GENERATION_FIELDS,
    ImageRequest,
    Resolver,
    bad,
    form_values,
    model_of,
    param,
    read_request,
)
from gateway.api.parsing import json_object
from gateway.engine.files import default_stems, download_urls
from gateway.engine.items import GenerationItem
from gateway.engine.models import MAX_URI_LENGTH, ModelSpec, resolve_model, supported_models
from gateway.errors import ServiceError
from gateway.state import GatewayState, gateway_state

log = logging.getLogger(__name__)
bp = Blueprint("openai", __name__, url_prefix="/v1")
STARTED = int(time.time())  # `created` of the listed models
UPLOAD_FIELDS = frozenset({"image", "image[]", "mask"})
MAX_UPLOAD = (MAX_URI_LENGTH - 64) * 3 // 4  # the largest image whose data URI fits the cap
MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
         (b"GIF89a", "image/gif"))
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
         404: "invalid_request_error", 429: "requests", 500: "server_error"}
CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
PARAM_NAMES = {"model_name": "model", "X-Admin-API-Key": None, "X-Replicate-API-Key": None, "Authorization": None}
THROTTLED_RETRY_AFTER = "10"


# -- routes ----------------------------------------------------------------------------------
@bp.post("/images/generations")
def generations():
    state = gateway_state()
    caller = current_bearer_caller()
    return _generate(state, caller, read_request(json_object(), GENERATION_FIELDS, state.settings,
                                                 _resolver(state, caller)))


@bp.post("/images/edits")
def edits():
    state = gateway_state()
    caller = current_bearer_caller()
    if request.mimetype != "multipart/form-data":
        raise bad("image", "Send the edit as multipart/form-data with an 'image' file")
    unknown = sorted(set(request.files) - UPLOAD_FIELDS)
    if unknown:
        raise bad(unknown[0][:60], f"Unrecognized file field(s): {', '.join(u[:60] for u in unknown[:5])}; "
                  "allowed: image, mask")
    return _generate(state, caller, read_request(form_values(request.form), EDIT_FIELDS, state.settings,
                                                 _resolver(state, caller), uploads=_uploads, form=True))


@bp.get("/models")
def models():
    state = gateway_state()
    listed = _allowed_models(state, current_bearer_caller())
    return jsonify({"object": "list", "data": [_model(name, spec) for name, spec in listed]})


@bp.get("/models/<path:model_id>")
def model(model_id: str):
    state = gateway_state()
    return jsonify(_model(model_id, model_of(model_id, _resolver(state, current_bearer_caller()))))


# -- running ---------------------------------------------------------------------------------
def _resolver(state: GatewayState, caller: Caller) -> Resolver:
    """Model names resolve as for /generate: aliases, references, ALLOWED_MODELS, schemas."""
    return lambda name: state.models.resolve(name, caller)


def _generate(state: GatewayState, caller: Caller, wanted: ImageRequest):
    """Run the request as one synchronous job of `n` items; answer OpenAI's response shape."""
    settings = state.settings
    single = wanted.n == 1
    timeout, label = ((settings.generation_timeout, "GENERATION_TIMEOUT") if single
                      else (settings.batch_timeout, "BATCH_TIMEOUT"))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(state.sync_gate.hold())
        except ServiceError as exc:
            gate = state.sync_gate
            if gate.in_progress < gate.limit:  # refused for another reason (shared limits away)
                raise
            # the gateway's own limit (MAX_SYNC_REQUESTS): OpenAI's SDKs retry a 429 after its Retry-After
            raise ServiceError(429, exc.message, exc.headers, code="rate_limit_exceeded") from None
        job_id, items = state.jobs.run_sync(caller, wanted.spec, [wanted.prompt] * wanted.n,
                                            default_stems(wanted.spec.file_stem, wanted.n, batch=not single),
                                            wanted.params, timeout, label)
    done = [item for item in items if not item.error]
    if not done:
        raise _failure(items[0])
    base = settings.public_base_url or request.host_url.rstrip("/")
    data = [_datum(state, item, path, wanted.response_format, base) for item in done for path in item.files]
    return jsonify({"created": int(time.time()), "data": data, "job_id": job_id})


def _datum(state: GatewayState, item: GenerationItem, path: str, response_format: str, base: str) -> dict:
    if response_format == "b64_json":
        return {"b64_json": base64.b64encode(Path(path).read_bytes()).decode(), "revised_prompt": item.prompt}
    [url] = download_urls(item.folder.name, [path])
    return {"url": state.signer.sign(url, base), "revised_prompt": item.prompt}


def _failure(item: GenerationItem) -> ServiceError:
    """A failed item as the error OpenAI's SDKs expect for the same cause."""
    message = item.error or "Generation failed"
    if item.status == 401:
        return ServiceError(401, message, code="invalid_api_key")
    if item.status == 402:  # OpenAI's "insufficient_quota": a 429 that retrying cannot cure
        return ServiceError(429, message, {"x-should-retry": "false"}, code="insufficient_quota",
                            type="insufficient_quota")
    if item.status == 422:
        fields = item.invalid_fields or [{}]
        field = str(fields[0].get("field") or "").removeprefix("input.") or None
        return ServiceError(400, message, field=field, code="invalid_value")
    if item.status == 429:
        return ServiceError(429, message, {"Retry-After": THROTTLED_RETRY_AFTER}, code="rate_limit_exceeded")
    if item.status == 504:  # already waited the whole timeout: an automatic retry would pay again
        return ServiceError(500, message, {"x-should-retry": "false"}, code="timeout")
    return ServiceError(500, message)


# -- uploads (edits) -------------------------------------------------------------------------
def _uploads(spec: ModelSpec) -> dict[str, tuple[str, str]]:
    """The edit's image (and mask, where the model takes one) as data URIs, by model parameter."""
    images = request.files.getlist("image") + request.files.getlist("image[]")
    if len(images) != 1:
        raise bad("image", f"Give exactly one 'image' file ({len(images)} given)")
    target = next((name for name in EDIT_IMAGE_PARAMS if param(spec, name)), None)
    if target is None:
        raise bad("model", f"Model '{spec.id}' takes no input image (none of {', '.join(EDIT_IMAGE_PARAMS)}); "
                  f"curated models that do: {', '.join(_editing_models())}")
    found = {target: ("image", _data_uri(images[0], "image"))}
    mask = request.files.get("mask")
    if mask is not None and param(spec, "mask"):  # otherwise ignored: the model edits from the prompt
        found["mask"] = ("mask", _data_uri(mask, "mask"))
    return found


def _data_uri(upload: FileStorage, field: str) -> str:
    raw = upload.read(MAX_UPLOAD + 1)
    if len(raw) > MAX_UPLOAD:
        raise bad(field, f"Invalid '{field}': larger than {MAX_UPLOAD} bytes; allowed: an image of at most "
                  f"{MAX_UPLOAD} bytes")
    media = next((kind for magic, kind in MAGIC if raw.startswith(magic)), None)
    if media is None and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        media = "image/webp"
    if media is None:
        raise bad(field, f"Invalid '{field}': not an image; allowed: a PNG, JPEG, GIF or WebP file")
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


def _editing_models() -> list[str]:
    return [name for name in supported_models() if any(param(resolve_model(name), p) for p in EDIT_IMAGE_PARAMS)]


# -- models ----------------------------------------------------------------------------------
def _allowed_models(state: GatewayState, caller: Caller) -> list[tuple[str, ModelSpec]]:
    """Every alias this caller may run (ALLOWED_MODELS), then the Replicate names behind them."""
    listed: dict[str, ModelSpec] = {}
    for name in state.models.names():
        with contextlib.suppress(ServiceError):  # not allowed (or its schema unreadable now): not listed
            listed[name] = state.models.resolve(name, caller)
    for spec in list(listed.values()):
        listed.setdefault(spec.replicate_name, spec)
    return list(listed.items())


def _model(name: str, spec: ModelSpec) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": spec.replicate_name.split("/")[0],
            "replicate_model": spec.replicate_name}


# -- errors in OpenAI's shape ----------------------------------------------------------------
def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None, kind: str | None = None):
    """`{"error": {"message", "type", "param", "code"}}` with a status OpenAI's SDKs know."""
    if status == 402:
        status = 429
    elif status not in TYPES:
        status = 400 if 400 <= status < 500 else 500
    body = {"message": message, "type": kind or TYPES[status], "param": PARAM_NAMES.get(param, param),
            "code": code or CODES.get(status)}
    return jsonify({"error": body}), status, dict(headers or {})


@bp.errorhandler(ServiceError)
def _service_error(error: ServiceError):
    extra = error.extra
    return openai_error(error.status, error.message, extra.get("field"), extra.get("code"), error.headers,
                        extra.get("type"))


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException):
    message = error.description or error.name
    if error.code == 413:
        message = f"Request body too large: the limit is {current_app.config['MAX_CONTENT_LENGTH']} bytes " \
                  "(MAX_CONTENT_LENGTH)"
    return openai_error(error.code or 500, message)


@bp.errorhandler(Exception)
def _unexpected(error: Exception):
    log.exception("unhandled error")  # the traceback to the (redacted) log, a fixed text to the client
    return openai_error(500, "Internal server error")
