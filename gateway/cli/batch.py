"""`rcg batch`: submit the jobs of a prompt file, watch them, download their files and write
results.jsonl. `rcg generate` shares its submit and watch steps."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import secrets
from pathlib import Path
from typing import Any

from .client import Client, job_path
from .config import Config, emit, emit_json
from .downloads import prepare_out, write_atomically
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SERVICE, CliError, usage_error
from .inputs import parse_params, read_rows
from .plans import RUNNING_JOB, JobPlan, plan_jobs
from .runner import Runner

log = logging.getLogger("rcg")  # not __name__: main installs its redacting handler on "rcg"


def cmd_batch(args: argparse.Namespace, config: Config) -> int:
    """Run a prompt file; the exit code says whether every row succeeded."""
    config.require_credentials()
    rows, data = read_rows(Path(args.file))
    params = parse_params(args.param)
    require_out(args)
    client = Client(config)
    nonce = secrets.token_hex(8) if args.new else ""
    plans = plan_jobs(rows, args.model, params, _max_batch(client), hashlib.sha256(data).hexdigest(), nonce)
    out = prepare_out(args.out) if args.out else None
    if not submit_or_show_ids(client, config, plans, args):
        return EXIT_OK
    runner = watch(client, config, plans, args.out)
    records = runner.records()
    write_results(out / "results.jsonl", records)
    report_batch(config, runner, records, out / "results.jsonl")
    return outcome(records, runner)


def _max_batch(client: Client) -> int:
    try:
        return max(1, int(client.json("GET", "/status")["limits"]["max_batch_size"]))
    except (KeyError, TypeError, ValueError):
        return 1000


def require_out(args: argparse.Namespace) -> None:
    """Raise a usage error when the files would have nowhere to go."""
    if not args.out and not args.no_wait:
        raise usage_error("--out DIR is required (unless --no-wait)")


def submit(client: Client, plans: list[JobPlan]) -> None:
    """POST each job; a key the service has seen answers 200 with the same job (reattached)."""
    for plan in plans:
        response = client.request("POST", "/jobs", json=plan.body, headers={"Idempotency-Key": plan.key})
        plan.job_id, plan.reattached = response.json()["job_id"], response.status_code == 200
        log.info("%s job %s (%d prompts)", "reattached to" if plan.reattached else "submitted", plan.job_id,
                 len(plan.rows))


def retry_failures(client: Client, plans: list[JobPlan]) -> None:
    """Run failed and canceled items of finished jobs again (for --retry-failed)."""
    for plan in plans:
        job = client.json("GET", job_path(plan.job_id))
        if job["status"] not in RUNNING_JOB and job["counts"].get("failed", 0) + job["counts"].get("canceled", 0):
            again = client.json("POST", job_path(plan.job_id) + "/retry", retry=False)["retried"]
            log.info("job %s: retrying %d item(s)", plan.job_id, len(again))


def submit_or_show_ids(client: Client, config: Config, plans: list[JobPlan], args: argparse.Namespace) -> bool:
    """Submit; with --no-wait print the job ids and return False (nothing more to do)."""
    submit(client, plans)
    if args.no_wait:
        ids = [p.job_id for p in plans]
        if config.as_json:
            emit_json(config, {"jobs": ids})
        else:
            emit(config, "\n".join(ids))
        return False
    if args.retry_failed:
        retry_failures(client, plans)
    return True


def watch(client: Client, config: Config, plans: list[JobPlan], out: str) -> Runner:
    """Run the jobs to the end; an interruption or a lost gateway says how to reattach."""
    runner = Runner(client, plans, out, config.progress)
    ids = " ".join(p.job_id for p in plans)
    try:
        runner.run()
    except KeyboardInterrupt:
        raise CliError(f"interrupted; the job(s) keep running on the gateway ({ids}): run the same command "
                       "again to reattach and download what is missing", EXIT_INTERRUPTED) from None
    except CliError as exc:
        if exc.code != EXIT_SERVICE:
            raise
        raise CliError(f"{exc.message}; the job(s) {ids} keep running: run the same command again to "
                       "reattach", EXIT_SERVICE) from None
    return runner


def write_results(path: Path, records: list[dict[str, Any]]) -> None:
    """results.jsonl: one JSON line per input row, written whole or not at all."""
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def outcome(records: list[dict[str, Any]], runner: Runner) -> int:
    """The exit code: 3 when a file could not be saved, 1 when a row did not succeed, else 0."""
    if runner.download_errors:
        return EXIT_SERVICE
    return EXIT_OK if all(r["status"] == "succeeded" for r in records) else EXIT_FAILED


def _report_failures(records: list[dict[str, Any]], shown: int = 10) -> None:
    bad = [r for r in records if r["status"] != "succeeded" or r["error"]]
    for record in bad[:shown]:
        log.warning("row %d %s: %s", record["index"], record["status"] or "unfinished", record["error"])
    if len(bad) > shown:
        log.warning("... and %d more (see results.jsonl)", len(bad) - shown)


def report_batch(config: Config, runner: Runner, records: list[dict[str, Any]], results: Path) -> None:
    """The failed rows on stderr, and the summary (a line or JSON) on stdout."""
    counts = runner.counts()
    files = sum(len(r["files"]) for r in records)
    summary = {"jobs": [p.job_id for p in runner.plans], "total": len(records), "succeeded": counts["succeeded"],
               "failed": counts["failed"], "canceled": counts["canceled"],
               "download_errors": len(runner.download_errors), "files": files, "downloaded": runner.fetched,
               "already_present": runner.present, "out": runner.out, "results": str(results)}
    _report_failures(records)
    if config.as_json:
        emit_json(config, summary)
        return
    emit(config, f"{len(records)} prompts: {counts['succeeded']} succeeded, {counts['failed']} failed, "
                 f"{counts['canceled']} canceled; {files} files in {runner.out} ({runner.fetched} downloaded, "
                 f"{runner.present} already there)")
    emit(config, f"results: {results}  job(s): {' '.join(summary['jobs'])}")
