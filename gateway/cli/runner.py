"""Watching submitted jobs until every item is final, downloading each finished item's files
as soon as it is reported, on a few threads, so the progress stays live."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .client import Client, job_path
from .downloads import Downloader
from .errors import CliError, usage_error
from .plans import JobPlan
from .progress import make_progress

POLL_MIN, POLL_MAX = 0.5, 1.0               # seconds between polls of a job
DOWNLOAD_WORKERS = 4
STATUSES = ("queued", "running", "succeeded", "failed", "canceled")


class Runner:
    """Polls the jobs until every item is final and downloads each succeeded item's files.
    Afterwards `records()` holds one line per input row and `download_errors` the rows whose
    files could not be saved."""

    def __init__(self, client: Client, plans: list[JobPlan], out: str, progress: bool) -> None:
        self.client, self.plans, self.out = client, plans, out
        self.rows = {row.index: (plan, row) for plan in plans for row in plan.rows}
        self.items: dict[int, dict[str, Any]] = {}      # row index -> the service's item
        self.saved: dict[int, list[str]] = {}            # row index -> local paths
        self.download_errors: dict[int, str] = {}
        self.downloads = Downloader(client, out)
        self._futures: dict[int, Future] = {}
        self._progress = make_progress(progress, len(self.rows))

    @property
    def fetched(self) -> int:
        """Files downloaded by this run."""
        return self.downloads.fetched

    @property
    def present(self) -> int:
        """Files found already complete in the folder."""
        return self.downloads.present

    def run(self) -> None:
        """Poll and download until done; raises CliError (and KeyboardInterrupt) with the
        downloads in progress stopped and their temp files removed."""
        pool = ThreadPoolExecutor(DOWNLOAD_WORKERS, thread_name_prefix="rcg-download")
        try:
            interval = POLL_MIN
            while True:
                changed = self._poll()
                self._collect()
                self._schedule(pool)
                self._progress.show(self.counts(), len(self.saved))
                if not self._futures and all(plan.finished for plan in self.plans):
                    return
                time.sleep(interval)
                interval = POLL_MIN if changed else min(POLL_MAX, interval * 1.25)
        finally:
            self.downloads.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            self._progress.close()

    def _poll(self) -> bool:
        """Fetch every unfinished job; True when any item's status changed."""
        before = {i: item.get("status") for i, item in self.items.items()}
        for plan in self.plans:
            if plan.finished:
                continue
            plan.state = self.client.json("GET", job_path(plan.job_id))
            for item in plan.state.get("items", []):
                index = item.get("index")
                if isinstance(index, int) and 0 <= index < len(plan.rows):
                    self.items[plan.rows[index].index] = item
        return before != {i: item.get("status") for i, item in self.items.items()}

    def _schedule(self, pool: ThreadPoolExecutor) -> None:
        for index, item in self.items.items():
            if item.get("status") == "succeeded" and index not in self._futures and index not in self.saved \
                    and index not in self.download_errors:
                self._futures[index] = pool.submit(self.downloads.save_item, item)

    def _collect(self) -> None:
        for index, future in list(self._futures.items()):
            if not future.done():
                continue
            del self._futures[index]
            error = future.exception()
            if error is None:
                self.saved[index] = future.result()
            elif isinstance(error, CliError):
                self.download_errors[index] = error.message
            elif isinstance(error, OSError):
                raise usage_error(f"cannot write into {self.out}: {error.strerror}")
            else:
                raise error

    def counts(self) -> dict[str, int]:
        """How many rows are in each status (a row not yet seen counts as queued)."""
        counts = dict.fromkeys(STATUSES, 0)
        for index in self.rows:
            status = self.items.get(index, {}).get("status", "queued")
            counts[status] = counts.get(status, 0) + 1
        return counts

    def records(self) -> list[dict[str, Any]]:
        """One record per input row, in input order."""
        records = []
        for index in sorted(self.rows):
            plan, row = self.rows[index]
            item = self.items.get(index, {})
            records.append({"index": index, "prompt": row.prompt, "status": item.get("status"),
                            "files": self.saved.get(index, []),
                            "error": item.get("error") or self.download_errors.get(index),
                            "prediction_id": item.get("prediction_id"), "job_id": plan.job_id})
        return records
