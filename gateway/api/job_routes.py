"""The job API: submit, watch, list, cancel, retry, and download saved files."""
from __future__ import annotations

import hashlib
import json
import re

from flask import Blueprint, jsonify, request, send_file

from gateway.api.auth import check_token, current_caller
from gateway.api.parsing import parse_job
from gateway.errors import ServiceError
from gateway.jobs.manager import JobManager
from gateway.jobs.webhooks import check_target
from gateway.state import gateway_state

bp = Blueprint("jobs", __name__)
MAX_KEY = 200
MAX_PAGE = 1_000_000  # keeps the offset far inside sqlite's 64-bit INTEGER


def _jobs() -> JobManager:
    return gateway_state().jobs


@bp.post("/jobs")
def submit():
    caller = current_caller()
    settings = gateway_state().settings
    wanted = parse_job(settings)
    webhook = wanted.body.get("webhook")
    if webhook is not None:
        if not settings.webhook_secret:
            raise ServiceError(400, "Webhooks need WEBHOOK_SECRET to be configured on the server")
        check_target(webhook, settings.webhook_allow_private)
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        check_token(key, "Idempotency-Key", 400, MAX_KEY)
    digest = hashlib.sha256(json.dumps(wanted.body, sort_keys=True).encode()).hexdigest()
    job, new = _jobs().submit(caller, wanted.spec, wanted.prompts, wanted.stems, wanted.params, webhook, key, digest)
    response = jsonify({"job_id": job["id"], "status": job["status"], "status_url": f"/jobs/{job['id']}"})
    response.headers["Location"] = f"/jobs/{job['id']}"
    return response, 202 if new else 200


@bp.get("/jobs/<job_id>")
def show(job_id: str):
    views = _jobs().views
    return jsonify(views.render(views.visible(job_id, current_caller())))


@bp.get("/jobs")
def listing():
    caller = current_caller()
    page = _whole_arg("page", 1, MAX_PAGE)
    per_page = _whole_arg("per_page", 20, 100)
    return jsonify(_jobs().views.list(caller, page, per_page))


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
    """With `expires` and `signature` (a signed link) no key is needed, and a link that does
    not verify is a 403 whatever key comes with it; without them, the caller's key."""
    views = _jobs().views
    if "signature" in request.args or "expires" in request.args:
        gateway_state().signer.verify(f"/files/{relative}", request.args.get("expires"), request.args.get("signature"))
        return send_file(views.file_path(relative, None), conditional=True)
    return send_file(views.file_path(relative, current_caller()), conditional=True)
