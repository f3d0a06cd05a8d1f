"""Rows grouped into jobs: one job per distinct parameter set, each with the body to submit
and an Idempotency-Key derived from the input, so a rerun reattaches to the same job."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from .errors import usage_error
from .inputs import Row

RUNNING_JOB = {"queued", "running"}
FINAL_ITEM = {"succeeded", "failed", "canceled"}


@dataclasses.dataclass
class JobPlan:
    """One job: rows sharing one parameter set, the body to submit and its Idempotency-Key."""
    rows: list[Row]
    body: dict[str, Any]
    key: str
    job_id: str = ""
    reattached: bool = False
    state: dict[str, Any] | None = None     # the last GET /jobs/<id>

    @property
    def finished(self) -> bool:
        return (self.state is not None and self.state.get("status") not in RUNNING_JOB
                and all(i.get("status") in FINAL_ITEM for i in self.state.get("items", [])))


def plan_jobs(rows: list[Row], model: str, params: dict[str, Any], max_batch: int, digest: str,
              nonce: str = "") -> list[JobPlan]:
    """Group rows by their parameters (command-line ones overridden per row) into one job per
    distinct set, split at the service's MAX_BATCH_SIZE. Rows are named when any row has a
    name or the rows need more than one job (two jobs' default names would collide in one
    folder): a row without a name becomes `row_<index>`. Raises a usage error for two rows
    with the same name."""
    chunks = _chunks(rows, params, max_batch)
    names = {}
    if len(chunks) > 1 or any(row.name for row in rows):
        names = {row.index: row.name or f"row_{row.index}" for row in rows}
        _check_unique(names)
    plans = []
    for merged, members in chunks:
        body = {"model_name": model, **merged, "prompts": [row.prompt for row in members]}
        if names:
            body["custom_filenames"] = [names[row.index] for row in members]
        plans.append(JobPlan(members, body, _idempotency_key(digest, members, body, nonce)))
    return plans


def _chunks(rows: list[Row], params: dict[str, Any], max_batch: int) -> list[tuple[dict[str, Any], list[Row]]]:
    """(parameters, rows) per job, in the order each parameter set first appears."""
    groups: dict[str, tuple[dict[str, Any], list[Row]]] = {}
    for row in rows:
        merged = {**params, **row.params}
        groups.setdefault(json.dumps(merged, sort_keys=True), (merged, []))[1].append(row)
    return [(merged, members[i:i + max_batch]) for merged, members in groups.values()
            for i in range(0, len(members), max_batch)]


def _idempotency_key(digest: str, members: list[Row], body: dict[str, Any], nonce: str) -> str:
    material = json.dumps({"file": digest, "rows": [row.index for row in members], "body": body,
                           "nonce": nonce}, sort_keys=True)
    return "rcg-" + hashlib.sha256(material.encode()).hexdigest()


def _check_unique(names: dict[int, str]) -> None:
    """The service refuses duplicates within a job (ignoring case and extension); across jobs
    they would overwrite each other in the output folder."""
    seen: dict[str, int] = {}
    for index, name in names.items():
        key = os.path.splitext(name)[0].casefold()
        if key in seen:
            raise usage_error(f"rows {seen[key]} and {index} have the same file name {name!r} "
                              "(names must differ ignoring case and extension)")
        seen[key] = index
