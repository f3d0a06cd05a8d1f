"""The HTTP API of the spec: /health, /status, /models, /generate, /generate-batch, /configure."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from gateway.api.auth import current_caller, require_admin
from gateway.api.parsing import json_object, parse_batch, parse_single
from gateway.engine.files import download_urls
from gateway.engine.items import GenerationItem, client_status
from gateway.engine.models import describe_models, invalid, supported_models
from gateway.errors import ServiceError
from gateway.state import gateway_state

bp = Blueprint("api", __name__)
SERVICE_NAME = "replicate-concurrent-generation"
LIMIT_FIELDS = {"concurrent_limit": 5000, "requests_per_minute": 100000}


@bp.get("/health")
def health():
    return jsonify({"status": "healthy", "service": SERVICE_NAME,
                    "supported_models": supported_models(),
                    "concurrency_status": gateway_state().service.status()})


@bp.get("/status")
def status():
    state = gateway_state()
    settings = state.settings
    return jsonify({"status": "running", "service": SERVICE_NAME,
                    "concurrency_status": state.service.status(),
                    "sync_requests": {"in_progress": state.sync_gate.in_progress, "limit": state.sync_gate.limit},
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


@bp.post("/generate")
def generate():
    state = gateway_state()
    caller = current_caller()
    wanted = parse_single(state.settings)
    with state.sync_gate.hold():
        job_id, [item] = state.jobs.run_sync(caller, wanted.spec, wanted.prompts, wanted.stems, wanted.params,
                                             state.settings.generation_timeout, "GENERATION_TIMEOUT")
    if item.error:
        raise _item_error(item)
    return jsonify({"success": True, "model_name": wanted.spec.id, "files": item.files,
                    "urls": download_urls(item.folder.name, item.files),
                    "count": len(item.files), "prediction_id": item.prediction_id, "job_id": job_id})


def _item_error(item: GenerationItem) -> ServiceError:
    extra = {"invalid_fields": item.invalid_fields} if item.invalid_fields else {}
    return ServiceError(client_status(item.status), item.error, **extra)


@bp.post("/generate-batch")
def generate_batch():
    state = gateway_state()
    caller = current_caller()
    wanted = parse_batch(state.settings)
    with state.sync_gate.hold():
        job_id, items = state.jobs.run_sync(caller, wanted.spec, wanted.prompts, wanted.stems, wanted.params,
                                            state.settings.batch_timeout, "BATCH_TIMEOUT")
    failed = [i for i in items if i.error]
    statuses = {i.status for i in failed}
    if len(failed) == len(items) and len(statuses) == 1 and statuses <= {401, 402}:
        raise _item_error(failed[0])  # the token itself is refused: say so, not 200
    return jsonify({
        "success": not failed, "model_name": wanted.spec.id, "job_id": job_id, "total_prompts": len(items),
        "successful_count": len(items) - len(failed), "failed_count": len(failed),
        "successful_results": [{"prompt_index": i.index, "prompt": i.prompt, "files": i.files,
                                "urls": download_urls(i.folder.name, i.files),
                                "prediction_id": i.prediction_id} for i in items if not i.error],
        "failed_results": [{"prompt_index": i.index, "prompt": i.prompt, "error": i.error,
                            "prediction_id": i.prediction_id} for i in failed],
    })


@bp.post("/configure")
def configure():
    state = gateway_state()
    require_admin(request.headers, state.settings)
    body = json_object()
    unknown = sorted(str(k) for k in set(body) - set(LIMIT_FIELDS))
    if unknown:
        raise ServiceError(400, f"Unknown field(s) {', '.join(repr(u[:60]) for u in unknown[:5])}; "
                           "allowed: concurrent_limit, requests_per_minute")
    limit, rpm = (_limit_value(body, field, high) for field, high in LIMIT_FIELDS.items())
    if limit is None and rpm is None:
        raise ServiceError(400, "Give concurrent_limit and/or requests_per_minute")
    state.service.configure_limits(limit, rpm)
    return jsonify({"success": True, "concurrency_status": state.service.status()})


def _limit_value(body: dict, field: str, high: int) -> int | None:
    value: Any = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise invalid(field, value, f"a whole number from 1 to {high}")  # shows the value cut short
    return value
