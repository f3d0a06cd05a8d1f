"""The HTTP API of the spec: /health, /status, /models, /generate, /generate-batch, /configure."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request

from auth import Caller, authenticate, require_admin
from errors import ServiceError
from json_body import parse_object
from files import check_names, default_stems, download_urls
from generation import GenerationItem
from model_functions import ModelSpec, build_input, describe_models, invalid, resolve_model, supported_models
from service import GenerationService
from settings import Settings

bp = Blueprint("api", __name__)
SERVICE_NAME = "replicate-concurrent-generation"
PASSED_ON = {401, 402, 409, 422, 504}


def current_settings() -> Settings:
    return current_app.extensions["settings"]


def _service() -> GenerationService:
    return current_app.extensions["generation"]


def json_object() -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type; 400 naming what is malformed."""
    return parse_object(request.get_data(cache=True))


def current_caller() -> Caller:
    # The caller's token is not added to the log redactor here (that set grew with every
    # token ever sent): the session cache tracks the tokens it holds (see redaction.py).
    caller = authenticate(request.headers, current_settings())
    current_app.extensions["jobs"].adopt(caller)
    return caller


@bp.get("/health")
def health():
    return jsonify({"status": "healthy", "service": SERVICE_NAME,
                    "supported_models": supported_models(),
                    "concurrency_status": _service().status()})


@bp.get("/status")
def status():
    settings = current_settings()
    return jsonify({"status": "running", "service": SERVICE_NAME,
                    "concurrency_status": _service().status(),
                    "admin_access_enabled": bool(settings.admin_api_key),
                    "server_token_configured": bool(settings.replicate_api_token),
                    "limits": {"generation_timeout": settings.generation_timeout,
                               "batch_timeout": settings.batch_timeout,
                               "max_batch_size": settings.max_batch_size,
                               "max_prompt_length": settings.max_prompt_length,
                               "max_content_length": settings.max_content_length}})


@bp.get("/models")
def models():
    return jsonify({"supported_models": supported_models(), "models": describe_models()})


def check_fields(body: dict, spec: ModelSpec, request_fields: set[str]) -> dict[str, Any]:
    """Refuse unknown fields (a typo must not be dropped); return the model parameters."""
    allowed = request_fields | set(spec.params)
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise ServiceError(400, f"Unknown field(s) {', '.join(repr(u[:60]) for u in unknown[:5])} "
                           f"for model '{spec.id}'; allowed: {', '.join(sorted(allowed))}",
                           allowed_fields=sorted(allowed))
    return {k: v for k, v in body.items() if k in spec.params}


def check_prompt(value: Any, field: str) -> str:
    limit = current_settings().max_prompt_length
    if not isinstance(value, str) or not value.strip():
        raise ServiceError(400, f"Invalid value for '{field}': a non-empty string is required", field=field)
    if len(value) > limit:
        raise ServiceError(400, f"Invalid value for '{field}': longer than the {limit}-character "
                           f"limit (MAX_PROMPT_LENGTH)", field=field)
    return value


def outputs_each(params: dict[str, Any]) -> int:
    return params.get("num_outputs") or 1


def _prepare(request_fields: set[str]) -> tuple[Caller, dict, ModelSpec, dict]:
    caller = current_caller()
    body = json_object()
    spec = resolve_model(body.get("model_name"))
    params = build_input(spec, check_fields(body, spec, request_fields))
    return caller, body, spec, params


@bp.post("/generate")
def generate():
    caller, body, spec, params = _prepare({"model_name", "prompt", "custom_filename"})
    prompt = check_prompt(body.get("prompt"), "prompt")
    name = body.get("custom_filename")
    stems = (check_names([name], "custom_filename", outputs_each(params)) if name is not None
             else default_stems(spec.id, 1, batch=False))
    settings = current_settings()
    with current_app.extensions["sync_requests"].hold():
        job_id, [item] = current_app.extensions["jobs"].run_sync(caller, spec, [prompt], stems, params,
                                                                 settings.generation_timeout, "GENERATION_TIMEOUT")
    if item.error:
        raise _item_error(item)
    return jsonify({"success": True, "model_name": spec.id, "files": item.files,
                    "urls": download_urls(item.folder.name, item.files),
                    "count": len(item.files), "prediction_id": item.prediction_id, "job_id": job_id})


def _item_error(item: GenerationItem) -> ServiceError:
    extra = {"invalid_fields": item.invalid_fields} if item.invalid_fields else {}
    return ServiceError(item.status if item.status in PASSED_ON else 500, item.error, **extra)


def check_batch(body: dict, params: dict) -> tuple[list[str], list[str] | None]:
    prompts, names = body.get("prompts"), body.get("custom_filenames")
    limit = current_settings().max_batch_size
    if not isinstance(prompts, list) or not prompts:
        raise ServiceError(400, "Invalid value for 'prompts': a non-empty list of strings is required",
                           field="prompts")
    if len(prompts) > limit:
        raise ServiceError(400, f"Too many prompts: {len(prompts)}; the limit is {limit} (MAX_BATCH_SIZE)",
                           field="prompts")
    prompts = [check_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    if names is None:
        return prompts, None
    if not isinstance(names, list) or len(names) != len(prompts):
        raise ServiceError(400, "Invalid value for 'custom_filenames': a list with one name per prompt "
                           f"is required ({len(prompts)} prompts)", field="custom_filenames")
    return prompts, check_names(names, "custom_filenames", outputs_each(params))


@bp.post("/generate-batch")
def generate_batch():
    caller, body, spec, params = _prepare({"model_name", "prompts", "custom_filenames"})
    prompts, stems = check_batch(body, params)
    stems = stems or default_stems(spec.id, len(prompts), batch=True)
    settings = current_settings()
    with current_app.extensions["sync_requests"].hold():
        job_id, items = current_app.extensions["jobs"].run_sync(caller, spec, prompts, stems, params,
                                                                settings.batch_timeout, "BATCH_TIMEOUT")
    failed = [i for i in items if i.error]
    statuses = {i.status for i in failed}
    if len(failed) == len(items) and len(statuses) == 1 and statuses <= {401, 402}:
        raise _item_error(failed[0])  # the token itself is refused: say so, not 200
    return jsonify({
        "success": not failed, "model_name": spec.id, "job_id": job_id, "total_prompts": len(items),
        "successful_count": len(items) - len(failed), "failed_count": len(failed),
        "successful_results": [{"prompt_index": i.index, "prompt": i.prompt, "files": i.files,
                                "urls": download_urls(i.folder.name, i.files),
                                "prediction_id": i.prediction_id} for i in items if not i.error],
        "failed_results": [{"prompt_index": i.index, "prompt": i.prompt, "error": i.error,
                            "prediction_id": i.prediction_id} for i in failed],
    })


def _limit_value(body: dict, field: str, high: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise invalid(field, value, f"a whole number from 1 to {high}")  # shows the value cut short
    return value


@bp.post("/configure")
def configure():
    require_admin(request.headers, current_settings())
    body = json_object()
    unknown = sorted(set(body) - {"concurrent_limit", "requests_per_minute"})
    if unknown:
        raise ServiceError(400, f"Unknown field(s) {', '.join(repr(u[:60]) for u in unknown[:5])}; "
                           "allowed: concurrent_limit, requests_per_minute")
    limit = _limit_value(body, "concurrent_limit", 5000)
    rpm = _limit_value(body, "requests_per_minute", 100000)
    if limit is None and rpm is None:
        raise ServiceError(400, "Give concurrent_limit and/or requests_per_minute")
    _service().lanes.configure(limit, rpm)
    return jsonify({"success": True, "concurrency_status": _service().status()})

