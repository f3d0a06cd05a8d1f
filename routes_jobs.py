"""The job API: submit, watch, list, cancel, retry, and download saved files."""
from __future__ import annotations

import hashlib
import json
import re

from flask import Blueprint, current_app, jsonify, request, send_file

from auth import check_token
from errors import ServiceError
from files import check_names, default_stems
from jobs import JobManager
from routes import (check_batch, check_fields, check_prompt, current_caller, current_settings, json_object,
                    outputs_each)
from model_functions import build_input, resolve_model
from webhooks import check_target

bp = Blueprint("jobs", __name__)
MAX_KEY = 200
MAX_PAGE = 1_000_000  # keeps the offset far inside sqlite's 64-bit INTEGER


def _jobs() -> JobManager:
    return current_app.extensions["jobs"]


def _prompts(body: dict, params: dict) -> tuple[list[str], list[str] | None]:
    """A job takes the body of /generate-batch, or a single `prompt` (+ `custom_filename`)."""
    if "prompts" in body:
        if "prompt" in body or "custom_filename" in body:
            raise ServiceError(400, "Give either 'prompts' (with 'custom_filenames') or 'prompt' "
                               "(with 'custom_filename'), not both")
        return check_batch(body, params)
    prompt = check_prompt(body.get("prompt"), "prompt")
    name = body.get("custom_filename")
    return [prompt], (check_names([name], "custom_filename", outputs_each(params)) if name is not None else None)


@bp.post("/jobs")
def submit():
    caller = current_caller()
    body = json_object()
    spec = resolve_model(body.get("model_name"))
    fields = {"model_name", "prompt", "prompts", "custom_filename", "custom_filenames", "webhook"}
    params = build_input(spec, check_fields(body, spec, fields))
    prompts, stems = _prompts(body, params)
    settings = current_settings()
    webhook = body.get("webhook")
    if webhook is not None:
        if not settings.webhook_secret:
            raise ServiceError(400, "Webhooks need WEBHOOK_SECRET to be configured on the server")
        check_target(webhook, settings.webhook_allow_private)
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        check_token(key, "Idempotency-Key", 400, MAX_KEY)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    stems = stems or default_stems(spec.id, len(prompts), batch="prompts" in body)
    job_id, new = _jobs().submit(caller, spec, prompts, stems, params, webhook, key, digest)
    status = _jobs().journal.job(job_id)["status"]
    response = jsonify({"job_id": job_id, "status": status, "status_url": f"/jobs/{job_id}"})
    response.headers["Location"] = f"/jobs/{job_id}"
    return response, 202 if new else 200


@bp.get("/jobs/<job_id>")
def show(job_id: str):
    return jsonify(_jobs().render(_jobs().visible(job_id, current_caller())))


@bp.get("/jobs")
def listing():
    caller = current_caller()
    page = _whole_arg("page", 1, MAX_PAGE)
    per_page = _whole_arg("per_page", 20, 100)
    return jsonify(_jobs().list(caller, page, per_page))


def _whole_arg(name: str, default: int, high: int) -> int:
    """A query argument from 1 to `high`, in ASCII digits (int() would also take ' 5', '1_0', '٣')."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (re.fullmatch(r"[0-9]{1,9}", raw) and 1 <= int(raw) <= high):
        raise ServiceError(400, f"Invalid value for '{name}': {raw[:20]!r}; allowed: a whole number "
                           f"from 1 to {high}", field=name)
    return int(raw)


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str):
    job = _jobs().cancel(job_id, current_caller())
    return jsonify({"job_id": job["id"], "status": job["status"], "status_url": f"/jobs/{job['id']}"})


@bp.post("/jobs/<job_id>/retry")
def retry(job_id: str):
    again = _jobs().retry(job_id, current_caller())
    return jsonify({"job_id": job_id, "retried": again, "status_url": f"/jobs/{job_id}"}), 202


@bp.get("/files/<path:relative>")
def download(relative: str):
    return send_file(_jobs().file_path(relative, current_caller()), conditional=True)
