"""Reading a generation request: the one place `/generate`, `/generate-batch` and `/jobs`
turn a JSON body into a model, its parameters, the prompts and their file names.

Every problem is a ServiceError 400 naming the field, what was given and what is allowed,
raised before anything is spent upstream.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flask import request

from gateway.accounts import Caller
from gateway.api.auth import authenticate
from gateway.api.body import parse_object
from gateway.config import Settings
from gateway.engine.files import check_names, default_stems
from gateway.engine.models import ModelSpec, build_input, check_prompt
from gateway.errors import ServiceError
from gateway.state import gateway_state

SINGLE_FIELDS = frozenset({"model_name", "prompt", "custom_filename"})
BATCH_FIELDS = frozenset({"model_name", "prompts", "custom_filenames"})
JOB_FIELDS = SINGLE_FIELDS | BATCH_FIELDS | {"webhook"}


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    spec: ModelSpec
    params: dict[str, Any]          # the model parameters, validated
    prompts: list[str]
    stems: list[str]                # one file name (without extension) per prompt
    body: dict[str, Any]            # the whole body, as sent


def json_object() -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type; 400 naming what is malformed."""
    return parse_object(request.get_data(cache=True))


def parse_single(settings: Settings, caller: Caller | None = None) -> GenerationRequest:
    """The body of `/generate`: one `prompt`, optionally a `custom_filename`."""
    body, spec, params = _model_and_params(SINGLE_FIELDS, settings, caller)
    return _single(body, spec, params, settings)


def parse_batch(settings: Settings, caller: Caller | None = None) -> GenerationRequest:
    """The body of `/generate-batch`: `prompts`, optionally `custom_filenames`."""
    body, spec, params = _model_and_params(BATCH_FIELDS, settings, caller)
    return _batch(body, spec, params, settings)


def parse_job(settings: Settings, caller: Caller | None = None) -> GenerationRequest:
    """The body of `/jobs`: either form above, plus an optional `webhook`."""
    body, spec, params = _model_and_params(JOB_FIELDS, settings, caller)
    if "prompts" not in body:
        return _single(body, spec, params, settings)
    if "prompt" in body or "custom_filename" in body:
        raise ServiceError(400, "Give either 'prompts' (with 'custom_filenames') or 'prompt' "
                           "(with 'custom_filename'), not both")
    return _batch(body, spec, params, settings)


def _model_and_params(request_fields: frozenset[str], settings: Settings,
                      caller: Caller | None) -> tuple[dict, ModelSpec, dict[str, Any]]:
    """The model (any Replicate model: its schema may be read upstream, with the caller's
    token) and its validated parameters."""
    body = json_object()
    who = caller or authenticate(request.headers, settings)
    spec = gateway_state().models.resolve(body.get("model_name"), who)
    return body, spec, build_input(spec, _model_fields(body, spec, request_fields))


def _model_fields(body: dict, spec: ModelSpec, request_fields: frozenset[str]) -> dict[str, Any]:
    """Refuse unknown fields (a typo must not be dropped); return the model parameters."""
    accepted = set(spec.accepted)
    allowed = request_fields | accepted
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise ServiceError(400, f"Unknown field(s) {', '.join(repr(u[:60]) for u in unknown[:5])} "
                           f"for model '{spec.id}'; allowed: {', '.join(sorted(allowed))}",
                           allowed_fields=sorted(allowed))
    return {k: v for k, v in body.items() if k in accepted and k not in request_fields}


def _single(body: dict, spec: ModelSpec, params: dict, settings: Settings) -> GenerationRequest:
    prompt = check_prompt(spec, "prompt", _prompt(body.get("prompt"), "prompt", settings))
    name = body.get("custom_filename")
    stems = (check_names([name], "custom_filename", _outputs_each(params)) if name is not None
             else default_stems(spec.file_stem, 1, batch=False))
    return GenerationRequest(spec, params, [prompt], stems, body)


def _batch(body: dict, spec: ModelSpec, params: dict, settings: Settings) -> GenerationRequest:
    prompts, names = body.get("prompts"), body.get("custom_filenames")
    limit = settings.max_batch_size
    if not isinstance(prompts, list) or not prompts:
        raise ServiceError(400, "Invalid value for 'prompts': a non-empty list of strings is required",
                           field="prompts")
    if len(prompts) > limit:
        raise ServiceError(400, f"Too many prompts: {len(prompts)}; the limit is {limit} (MAX_BATCH_SIZE)",
                           field="prompts")
    prompts = [check_prompt(spec, f"prompts[{i}]", _prompt(p, f"prompts[{i}]", settings))
               for i, p in enumerate(prompts)]
    if names is None:
        return GenerationRequest(spec, params, prompts, default_stems(spec.file_stem, len(prompts), batch=True),
                                 body)
    if not isinstance(names, list) or len(names) != len(prompts):
        raise ServiceError(400, "Invalid value for 'custom_filenames': a list with one name per prompt "
                           f"is required ({len(prompts)} prompts)", field="custom_filenames")
    return GenerationRequest(spec, params, prompts, check_names(names, "custom_filenames", _outputs_each(params)),
                             body)


def _prompt(value: Any, field: str, settings: Settings) -> str:
    limit = settings.max_prompt_length
    if not isinstance(value, str) or not value.strip():
        raise ServiceError(400, f"Invalid value for '{field}': a non-empty string is required", field=field)
    if len(value) > limit:
        raise ServiceError(400, f"Invalid value for '{field}': longer than the {limit}-character "
                           f"limit (MAX_PROMPT_LENGTH)", field=field)
    return value


def _outputs_each(params: dict[str, Any]) -> int:
    return params.get("num_outputs") or 1
