"""One generation, from its turn in the rate window to its files on disk.

A `GenerationItem` is one prompt of a request; `Pipeline.run` takes it through create,
wait (`Prefer: wait`, then paced polls), cancel at its deadline, download and placement.
Every blocking step is bounded by the item's deadline, and a client-side timeout
(`item.expire`) reaches the worker through `item.cancelled`, which cancels the upstream
prediction instead of leaving it running and billing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from concurrency_manager import Lane
from downloads import DownloadError, Downloader
from files import PART_PREFIX, final_stems, place
from lost_creates import find_lost_creates
from model_functions import ModelSpec, outputs_of
from upstream import PredictionState, UpstreamError, UpstreamSession

log = logging.getLogger(__name__)
POLL_START, POLL_GROWTH, POLL_MAX = 0.5, 1.5, 5.0
HELD_CANCEL_ATTEMPTS, HELD_CANCEL_PAUSE = 4, 0.5
FAIL_FAST = {400, 401, 402, 403, 404, 422}


@dataclasses.dataclass(eq=False)  # compared and hashed by identity: items live in sets
class GenerationItem:
    index: int
    prompt: str
    stem: str
    data: dict[str, Any]                 # the upstream input, prompt included
    folder: Path
    shown_folder: str                    # the folder as responses show it
    deadline: float                      # the request's deadline (monotonic)
    deadline_label: str                  # which setting set it
    timeout: float
    files: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    status: int | None = None            # an upstream status worth passing on (401/402/422)
    invalid_fields: list | None = None
    prediction_id: str | None = None
    sent_after: float | None = None      # when the last create was sent (wall time): finds a lost answer
    create_held: bool = False            # a create is on its way: sent, its answer (and id) not back yet
    hooks: Any = None                    # the journal's listener (jobs.ItemHooks), if any
    state: str = "queued"                # queued, then succeeded | failed | canceled
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    done_callbacks: list = dataclasses.field(default_factory=list)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def fail(self, message: str, status: int | None = None, invalid_fields: list | None = None,
             state: str = "failed") -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.error, self.status, self.invalid_fields, self.state = message, status, invalid_fields, state
            self.done.set()
        self.notify("done")

    def expire(self) -> None:
        """The request's time is up: fail the item now and tell its worker to stop."""
        self.fail(f"Generation timed out after {self.timeout:g} s ({self.deadline_label})", 504)
        self.cancelled.set()

    def cancel(self) -> None:
        """Canceled by its owner: stop now; the worker cancels the upstream prediction."""
        self.fail("Canceled by request", 409, state="canceled")
        self.cancelled.set()

    @property
    def live_status(self) -> str:
        """What a watcher should see: running from the moment a create is sent."""
        if self.done.is_set():
            return self.state
        return "running" if self.sent_after is not None else "queued"

    def notify(self, event: str) -> None:
        if self.hooks is not None:
            getattr(self.hooks, event)(self)
        if event == "done":
            for callback in self.done_callbacks:
                callback(self)


class ItemFailed(Exception):
    def __init__(self, message: str, status: int | None = None, invalid_fields: list | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.invalid_fields = message, status, invalid_fields


@dataclasses.dataclass
class Pipeline:
    spec: ModelSpec
    lane: Lane
    session: UpstreamSession
    downloader: Downloader
    generation_timeout: float
    prefer_wait: int
    create_attempts: int
    throttle_retries: int
    clock: Callable[[], float] = time.monotonic

    def run(self, item: GenerationItem, release: Callable[[], None]) -> None:
        """The job a lane runs; `release` frees the item's slot once the prediction is final."""
        try:
            if item.cancelled.is_set():
                return
            state, deadline, label = self._start(item)  # counted in flight from here
            try:
                state = self._until_final(item, state, deadline, label)
            finally:
                self.lane.prediction_ended()
                release()
            self._save(item, state, deadline)
        except ItemFailed as failure:
            item.fail(failure.message, failure.status, failure.invalid_fields)
        except Exception:
            log.exception("item %d failed unexpectedly", item.index)
            item.fail("Generation failed: internal error (see the service log)")
        finally:
            item.notify("stopped")  # nothing of this item runs any more: it may be run again

    # -- create ------------------------------------------------------------------------
    def _start(self, item: GenerationItem) -> tuple[PredictionState, float, str]:
        """Create the prediction, or pick up the one an earlier process created."""
        if item.prediction_id is None:
            return self._create(item)
        self.lane.prediction_started()
        state = PredictionState(item.prediction_id, "starting")  # read on the first poll
        return (state, *self._deadline_from(item, self.clock()))

    def _find_lost(self, item: GenerationItem) -> PredictionState | None:
        """The prediction a create without an answer made (see lost_creates); None if there
        is none (or the list cannot be read: then a duplicate create is the lesser harm than
        a lost item)."""
        for attempt in range(3):
            self._pause(item, self.lane.reads.reserve(), item.deadline)
            try:
                found = find_lost_creates(self.session, [(item.index, item.data)], item.sent_after or 0,
                                          _claimed(item), max_pages=5)
                return found.get(item.index)
            except (UpstreamError, httpx.TransportError) as exc:
                log.warning("looking up a lost create failed (attempt %d): %s", attempt + 1, exc)
        return None

    def cancel_held(self, items: list[GenerationItem]) -> None:
        """Cancel upstream the predictions of canceled items whose create is still held open
        (`Prefer: wait`): their ids are unknown until the answer comes, which may take a
        minute, so they are found in the upstream's list by their input (one read for all).
        A create may reach the upstream a moment after it was sent: look a few times."""
        for attempt in range(HELD_CANCEL_ATTEMPTS):
            held = [i for i in items if i.create_held and i.prediction_id is None]
            if not held:
                return
            time.sleep(min(self.lane.reads.reserve(), 2.0))
            claimed = set().union(*(_claimed(i) for i in held))
            try:
                found = find_lost_creates(self.session, [(i.index, i.data) for i in held],
                                          min(i.sent_after or 0 for i in held), claimed, only_running=True)
            except (UpstreamError, httpx.TransportError) as exc:
                log.warning("looking up held creates to cancel failed (attempt %d): %s", attempt + 1, exc)
                found = {}
            for state in found.values():
                self._cancel(state.id)
            items = [i for i in held if i.index not in found]
            time.sleep(HELD_CANCEL_PAUSE * (attempt + 1))

    def _deadline_from(self, item: GenerationItem, created: float) -> tuple[float, str]:
        if created + self.generation_timeout < item.deadline:
            return created + self.generation_timeout, "GENERATION_TIMEOUT"
        return item.deadline, item.deadline_label

    def _create(self, item: GenerationItem) -> tuple[PredictionState, float, str]:
        failures = throttles = 0
        while True:
            self._pause(item, self._window_delay(item), item.deadline)
            # In flight from the moment the create is sent: with `Prefer: wait` the answer
            # may only come when the prediction is already done.
            self.lane.prediction_started()
            item.sent_after = time.time()
            item.timings.setdefault("started", item.sent_after)
            # The prediction's deadline runs from now, and the held answer must come back by
            # then (whole seconds, rounded down), so the deadline is kept even mid-wait.
            deadline, label = self._deadline_from(item, self.clock())
            item.create_held = True
            if item.cancelled.is_set():  # see GenerationService.cancel: checked after the flag is up
                item.create_held = False
                self.lane.prediction_ended()
                raise ItemFailed(item.error or "Generation canceled", item.status)
            try:
                wait = min(self.prefer_wait, int(deadline - self.clock()))
                state = self.session.create(self.spec.replicate_name, item.data, wait)
            except BaseException as exc:
                item.create_held = False
                self.lane.prediction_ended()
                # A connection lost after sending may have created it: look before creating again.
                found = self._find_lost(item) if isinstance(exc, httpx.TransportError) else None
                if found is None:
                    if isinstance(exc, UpstreamError) and exc.status == 429:
                        throttles += 1
                    else:
                        failures += 1
                    self._create_failed(item, exc, failures, throttles)
                    continue
                self.lane.prediction_started()
                state = found
            item.create_held = False
            self.lane.creates.succeeded()
            item.prediction_id = state.id
            item.timings["created"] = time.time()
            item.notify("created")
            return state, deadline, label

    def _create_failed(self, item: GenerationItem, exc: BaseException, failures: int, throttles: int) -> None:
        """Decide about a failed create: raise ItemFailed, or return to try again.

        429s and faults (5xx, connection errors) have separate budgets: a throttle says
        "not yet", a fault may mean the create half-happened (see README, Failure handling)."""
        if isinstance(exc, UpstreamError) and exc.status in FAIL_FAST:
            raise ItemFailed(f"Generation failed: {exc.detail}", exc.status, exc.invalid_fields) from None
        if isinstance(exc, UpstreamError) and exc.status == 429:
            self.lane.creates.throttled(exc.retry_after)
            if throttles > self.throttle_retries:
                raise ItemFailed(f"Generation failed: upstream kept throttling (429) after "
                                 f"{throttles} attempts", 429)
            self._pause_before_retry(item, exc.retry_after, throttles, f"upstream throttled: {exc.detail}")
            return
        if isinstance(exc, UpstreamError):
            reason = f"upstream answered {exc.status}: {exc.detail}"
        elif isinstance(exc, httpx.TransportError):
            reason = f"upstream unreachable ({type(exc).__name__})"
        else:
            raise exc
        if failures >= self.create_attempts:
            raise ItemFailed(f"Generation failed: {reason} (gave up after {failures} attempts)", 502)
        self._pause_before_retry(item, None, failures, reason)

    def _window_delay(self, item: GenerationItem) -> float:
        delay = self.lane.creates.reserve(latest=item.deadline)
        if delay is None:
            raise self._timed_out(item.timeout, item.deadline_label, "waiting for its turn in the rate limit")
        return delay

    def _pause_before_retry(self, item: GenerationItem, retry_after: float | None, attempts: int,
                            reason: str) -> None:
        """Wait what the upstream asked, else exponential backoff with jitter."""
        backoff = min(0.5 * 2 ** (attempts - 1), 30.0) * random.uniform(0.5, 1.5)
        delay = retry_after if retry_after is not None else backoff
        if self.clock() + delay >= item.deadline:
            raise self._timed_out(item.timeout, item.deadline_label, f"retrying after: {reason}")
        self._pause(item, delay, item.deadline)

    # -- wait --------------------------------------------------------------------------
    def _until_final(self, item: GenerationItem, state: PredictionState, deadline: float,
                     label: str) -> PredictionState:
        interval = POLL_START
        while not state.final:
            if item.cancelled.is_set() or self.clock() >= deadline:
                self._cancel(state.id)
                raise self._timed_out(self._span(item, label), label)
            self._pause(item, min(interval, max(0.0, deadline - self.clock())), deadline, cancel=state.id)
            interval = min(interval * POLL_GROWTH, POLL_MAX)
            if self.clock() >= deadline:
                continue
            self._pause(item, self.lane.reads.reserve(), deadline, cancel=state.id)
            try:
                state = self.session.get(state.id)
            except UpstreamError as exc:
                if exc.status in FAIL_FAST:
                    raise ItemFailed(f"Generation failed: reading prediction {state.id}: {exc.detail}", exc.status) from None
                if exc.retry_after:
                    self._pause(item, min(exc.retry_after, max(0.0, deadline - self.clock())), deadline, cancel=state.id)
            except httpx.TransportError as exc:
                log.warning("poll of %s failed: %s", state.id, type(exc).__name__)
        return state

    def _span(self, item: GenerationItem, label: str) -> float:
        return self.generation_timeout if label == "GENERATION_TIMEOUT" else item.timeout

    def _cancel(self, prediction_id: str) -> None:
        """Cancel upstream so a prediction past its deadline stops billing; a few tries."""
        for attempt in range(3):
            time.sleep(min(self.lane.reads.reserve(), 2.0))
            try:
                self.session.cancel(prediction_id)
                log.info("canceled prediction %s at its deadline", prediction_id)
                return
            except (UpstreamError, httpx.TransportError) as exc:
                log.warning("cancel of %s failed (attempt %d): %s", prediction_id, attempt + 1, exc)
                time.sleep(0.2 * 2 ** attempt)

    def _pause(self, item: GenerationItem, seconds: float, deadline: float, cancel: str | None = None) -> None:
        """Sleep, waking at once if the request gave up on this item."""
        if seconds > 0 and item.cancelled.wait(seconds) or item.cancelled.is_set():
            if cancel:
                self._cancel(cancel)
            raise ItemFailed(item.error or "Generation canceled", item.status)

    def _timed_out(self, seconds: float, label: str, doing: str = "") -> ItemFailed:
        where = f" {doing}" if doing else ""
        return ItemFailed(f"Generation timed out after {seconds:g} s ({label}){where}", 504)

    # -- save --------------------------------------------------------------------------
    def _save(self, item: GenerationItem, state: PredictionState, deadline: float) -> None:
        pid = state.id
        if state.status == "failed":
            raise ItemFailed(f"Generation failed: prediction {pid} failed: {state.error or 'no reason given'}")
        if state.status in ("canceled", "aborted"):
            raise ItemFailed(f"Generation failed: prediction {pid} was {state.status} upstream")
        urls = outputs_of(self.spec, state.output)
        if not urls:
            raise ItemFailed(f"Generation failed: prediction {pid} succeeded with no output")
        temps: list[tuple[Path, str]] = []
        try:
            for url in urls:
                temps.append(self.downloader.fetch(url, item.folder, deadline))
        except DownloadError as exc:
            raise ItemFailed(f"Generation failed: prediction {pid}: {exc}") from None
        finally:
            if len(temps) < len(urls):
                for path, _ in temps:
                    path.unlink(missing_ok=True)
        self._place(item, temps)

    def _place(self, item: GenerationItem, temps: list[tuple[Path, str]]) -> None:
        names = [f"{stem}.{ext}" for stem, (_, ext) in zip(final_stems(item.stem, len(temps)), temps)]
        item.timings["completed"] = time.time()
        digests = [_sha256(path) for path, _ in temps]
        with item.lock:
            if item.done.is_set():  # the request already answered (timed out, canceled): keep nothing
                for path, _ in temps:
                    path.unlink(missing_ok=True)
                return
            placed = []
            try:
                for (path, _), name in zip(temps, names):
                    place(path, item.folder / name)
                    placed.append(name)
            except FileExistsError:
                for path, _ in temps:
                    path.unlink(missing_ok=True)
                for name in placed:
                    (item.folder / name).unlink(missing_ok=True)
                item.error, item.status, item.state = "Generation failed: an output name is already taken", 409, "failed"
                item.done.set()
            else:
                for name, digest in zip(names, digests):
                    self._write_provenance(item, name, digest)
                item.files = [os.path.join(item.shown_folder, name) for name in names]
                item.state = "succeeded"
                item.done.set()
        item.notify("done")

    def _write_provenance(self, item: GenerationItem, name: str, digest: str) -> None:
        """`<name>.json` beside the image: what made it, when, and its SHA-256. A `data:` input
        is recorded by its type, size and SHA-256, not copied into every record."""
        from files import describe_data_uri
        record = {
            "file": name, "sha256": digest, "prompt": item.prompt, "model": self.spec.id,
            "replicate_model": self.spec.replicate_name, "prediction_id": item.prediction_id,
            "parameters": {k: describe_data_uri(v) for k, v in item.data.items() if k != "prompt"},
            "created_at": item.timings.get("created"), "completed_at": item.timings.get("completed"),
        }
        target = item.folder / (os.path.splitext(name)[0] + ".json")
        # A short temporary name: `.part-` + a name already at NAME_MAX would be too long.
        temp = target.with_name(f"{PART_PREFIX}{hashlib.sha256(name.encode()).hexdigest()[:16]}.json")
        temp.write_text(json.dumps(record, indent=2, ensure_ascii=False))
        os.replace(temp, target)


def _claimed(item: GenerationItem) -> set[str]:
    """Prediction ids other items of the same job already own."""
    return item.hooks.claimed() if item.hooks is not None else set()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()
