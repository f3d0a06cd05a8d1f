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
    concurrency = gateway_state().service.status()
    body = {"status": "healthy", "service": SERVICE_NAME, "supported_models": supported_models(),
            "concurrency_status": concurrency}
    shared = concurrency.get("shared")
    # Still 200: the process is alive (liveness); /ready answers 503 while nothing new can start.
    if shared is not None and shared["redis"] != "reachable":  # shared limits fail closed
        body.update(status="degraded", redis="unreachable", error=shared["error"])
    return jsonify(body)


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
    """The aliases, and every model with a schema at hand (nothing is read upstream)."""
    catalog = gateway_state().models
    return jsonify({"supported_models": catalog.names(), "models": describe_models(),
                    "aliases": catalog.aliases(), "schemas": catalog.describe_known()})


@bp.get("/models/<path:name>")
def model(name: str):
    """One model's parameters: `owner/name`, `owner/name:<version>` (or
    `owner/name/versions/<version>`), `deployments/owner/name`, or an alias. A key is needed
    only when the schema must be read upstream (it costs a read of the caller's account)."""
    owner_name, marker, version = name.partition("/versions/")
    reference = f"{owner_name}:{version}" if marker else name
    return jsonify(gateway_state().models.describe(reference, current_caller))


@bp.post("/generate")
def generate():
    state = gateway_state()
    caller = current_caller()
    wanted = parse_single(state.settings, caller)
    with state.sync_gate.hold():
        job_id, [item] = state.jobs.run_sync(caller, wanted.spec, wanted.prompts, wanted.stems, wanted.params,
                                             state.settings.generation_timeout, "GENERATION_TIMEOUT")
    if item.error:
        raise _item_error(item)
    urls = download_urls(item.folder.name, item.files)
    return jsonify({"success": True, "model_name": wanted.spec.id, "files": item.files, "urls": urls,
                    "signed_urls": _signed(urls), "count": len(item.files),
                    "prediction_id": item.prediction_id, "job_id": job_id, **_data(item)})


def _data(item: GenerationItem) -> dict[str, Any]:
    """A model's non-file output (text, JSON), when it answered one."""
    return {} if item.output is None else {"output": item.output}


def _signed(urls: list[str]) -> list[str]:
    """`urls` as links that download without a key (see gateway/signing.py)."""
    state = gateway_state()
    return state.signer.sign_all(urls, state.settings.public_base_url or "")


def _item_error(item: GenerationItem) -> ServiceError:
    extra = {"invalid_fields": item.invalid_fields} if item.invalid_fields else {}
    return ServiceError(client_status(item.status), item.error, **extra)


@bp.post("/generate-batch")
def generate_batch():
    state = gateway_state()
    caller = current_caller()
    wanted = parse_batch(state.settings, caller)
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
                                "signed_urls": _signed(download_urls(i.folder.name, i.files)),
                                "prediction_id": i.prediction_id, **_data(i)} for i in items if not i.error],
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
