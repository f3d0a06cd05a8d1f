"""The commands other than `batch`: generate one prompt, look at jobs, models and the gateway."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import secrets
from typing import Any

from .batch import outcome, require_out, submit_or_show_ids, watch
from .client import Client, job_path
from .config import Config, emit, emit_json
from .downloads import prepare_out
from .errors import EXIT_OK, usage_error
from .inputs import Row, parse_params
from .plans import plan_jobs

log = logging.getLogger("rcg")  # not __name__: main installs its redacting handler on "rcg"


def default_name(prompt: str, model: str, params: dict[str, Any], nonce: str) -> str:
    """A readable, stable file name for `generate`: a slug of the prompt and a short digest,
    so two prompts never share a name and a rerun finds its own file."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40].strip("_") or "image"
    digest = hashlib.sha256(json.dumps([prompt, model, params, nonce], sort_keys=True).encode()).hexdigest()
    return f"{slug}_{digest[:8]}"


def cmd_generate(args: argparse.Namespace, config: Config) -> int:
    """Run one prompt as a job of one; print the saved files."""
    config.require_credentials()
    if not args.prompt.strip():
        raise usage_error("the prompt is empty")
    params = parse_params(args.param)
    require_out(args)
    nonce = secrets.token_hex(8) if args.new else ""
    row = Row(0, args.prompt, args.name or default_name(args.prompt, args.model, params, nonce))
    client = Client(config)
    plans = plan_jobs([row], args.model, params, 1, hashlib.sha256(args.prompt.encode()).hexdigest(), nonce)
    if args.out:
        prepare_out(args.out)
    if not submit_or_show_ids(client, config, plans, args):
        return EXIT_OK
    runner = watch(client, config, plans, args.out)
    record = runner.records()[0]
    _report_generated(config, record)
    return outcome([record], runner)


def _report_generated(config: Config, record: dict[str, Any]) -> None:
    if config.as_json:
        emit_json(config, {k: record[k] for k in ("job_id", "status", "files", "error", "prediction_id")})
        return
    if record["status"] != "succeeded" or record["error"]:
        log.warning("%s: %s", record["status"] or "unfinished", record["error"])
    if record["files"]:
        emit(config, "\n".join(record["files"]))


def cmd_jobs_list(args: argparse.Namespace, config: Config) -> int:
    """Print a page of the caller's jobs, newest first."""
    config.require_credentials()
    page = Client(config).json("GET", "/jobs", params={"page": args.page, "per_page": args.per_page})
    if config.as_json:
        emit_json(config, page)
        return EXIT_OK
    lines = [f"{j['job_id']}  {j['status']:<9}  {j['model_name']:<16}  {j['kind']:<4}  {j['created_at']}"
             for j in page.get("jobs", [])]
    if page.get("next_page"):
        lines.append(f"(more: rcg jobs list --page {page['next_page']})")
    emit(config, "\n".join(lines) if lines else "no jobs")
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace, config: Config) -> int:
    """Print a job and each of its items."""
    config.require_credentials()
    job = Client(config).json("GET", job_path(args.id))
    if config.as_json:
        emit_json(config, job)
        return EXIT_OK
    counts = ", ".join(f"{v} {k}" for k, v in job.get("counts", {}).items() if v)
    lines = [f"{job['job_id']}  {job['status']}  {job['model_name']}  created {job['created_at']}  "
             f"finished {job.get('finished_at') or '-'}", f"{job.get('total', 0)} items: {counts or 'none'}"]
    for item in job.get("items", []):
        detail = " ".join(item.get("urls") or []) or item.get("error") or ""
        lines.append(f"{item['index']:>5}  {item['status']:<9}  {detail}")
    emit(config, "\n".join(lines))
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace, config: Config) -> int:
    """Cancel a job's unfinished items."""
    config.require_credentials()
    answer = Client(config).json("POST", job_path(args.id) + "/cancel")
    if config.as_json:
        emit_json(config, answer)
    else:
        emit(config, f"{answer['job_id']}  {answer['status']}")
    return EXIT_OK


def cmd_jobs_retry(args: argparse.Namespace, config: Config) -> int:
    """Run a finished job's failed items again (not retried on a network error: not idempotent)."""
    config.require_credentials()
    answer = Client(config).json("POST", job_path(args.id) + "/retry", retry=False)
    if config.as_json:
        emit_json(config, answer)
    else:
        again = answer.get("retried") or []
        emit(config, f"{answer['job_id']}  retrying item(s) {', '.join(map(str, again))}" if again
             else f"{answer['job_id']}  nothing to retry")
    return EXIT_OK


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    """Print the models, or one model and its parameters."""
    models = Client(config).json("GET", "/models").get("models", [])
    if args.name:
        found = [m for m in models if args.name in (m.get("id"), m.get("replicate_model"))]
        if not found:
            raise usage_error(f"unknown model {args.name!r}; supported: {', '.join(m['id'] for m in models)}")
        models = found
    if config.as_json:
        emit_json(config, models[0] if args.name else models)
    elif args.name:
        emit(config, "\n".join(_model_lines(models[0])))
    else:
        emit(config, "\n".join(f"{m['id']:<18}  {m['replicate_model']:<36}  {m.get('purpose', '')}" for m in models))
    return EXIT_OK


def _model_lines(model: dict[str, Any]) -> list[str]:
    lines = [f"{model['id']} ({model['replicate_model']}): {model.get('purpose', '')}; output: {model.get('output')}"]
    for name, spec in model.get("parameters", {}).items():
        lines.append(f"  {name:<24} {spec.get('type', ''):<8} default {json.dumps(spec.get('default'))}; "
                     f"{spec.get('allowed', '')}")
    return lines


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    """Print the gateway's limits and load."""
    status = Client(config).json("GET", "/status")
    if config.as_json:
        emit_json(config, status)
        return EXIT_OK
    lines = [f"{config.shown_url}: {status.get('status')}"]
    for section in ("concurrency_status", "limits"):
        lines += [f"  {k}: {v}" for k, v in (status.get(section) or {}).items()]
    lines += [f"  admin_access_enabled: {status.get('admin_access_enabled')}",
              f"  server_token_configured: {status.get('server_token_configured')}"]
    emit(config, "\n".join(lines))
    return EXIT_OK
