"""One generation, from its turn in the rate window to its files on disk.

`Pipeline.run` takes one item through create (`Prefer: wait`, held at most until the item's
deadline), paced polls, cancel at the deadline, and the output saver. Every blocking step is
bounded by the item's deadline, and a cancel or a client-side timeout reaches the worker
through `item.cancelled`, which cancels the upstream prediction instead of leaving it
running and billing. A create still held open when its item is canceled is found in the
upstream's list and canceled from `cancel_held`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable

import httpx

from gateway.engine.items import FAIL_FAST, GenerationItem
from gateway.engine.limits import AccountLane
from gateway.engine.lost_creates import find_lost_creates
from gateway.engine.models import ModelSpec
from gateway.engine.observed import ItemObserver
from gateway.engine.outputs import ItemFailed, OutputSaver
from gateway.engine.upstream import PredictionState, UpstreamError, UpstreamSession

log = logging.getLogger(__name__)
POLL_START, POLL_GROWTH, POLL_MAX = 0.5, 1.5, 5.0
HELD_CANCEL_ATTEMPTS, HELD_CANCEL_PAUSE = 4, 0.5


@dataclasses.dataclass
class Pipeline:
    spec: ModelSpec
    lane: AccountLane  # in-process or shared on Redis: the same interface
    session: UpstreamSession
    saver: OutputSaver
    generation_timeout: float
    prefer_wait: int
    create_attempts: int
    throttle_retries: int
    clock: Callable[[], float] = time.monotonic
    observer: ItemObserver = dataclasses.field(default_factory=ItemObserver.unobserved)  # metrics

    def run(self, item: GenerationItem, release: Callable[[], None]) -> Callable[[], None]:
        """The job a lane runs, holding the item's slot: create the prediction and wait until
        it is final. Returns the rest (journal, download, files), which needs no slot: the
        lane runs it once the slot has gone to the next queued job, so that job's create is
        not held up behind this one's download. (The slot is freed when this returns:
        `release`, the lane's early release, is not needed.)"""
        outcome: Callable[[], None] | None = None  # nothing to do for an item canceled before its turn
        created = False  # created here and answered already final: journaled in the rest
        try:
            if not item.cancelled.is_set():
                fresh = item.prediction_id is None
                with contextlib.ExitStack() as in_flight:  # counted from the create until final
                    state, deadline, label = self._start(item, in_flight)
                    created = fresh and state.final
                    state = self._until_final(item, state, deadline, label)
                    self.observer.prediction_final(item, state)
                outcome = functools.partial(self.saver.save, item, self.spec, state, deadline, self.observer)
        except ItemFailed as failure:
            outcome = functools.partial(item.fail, failure.message, failure.status, failure.invalid_fields)
        except Exception:
            log.exception("item %d failed unexpectedly", item.index)
            outcome = functools.partial(item.fail, "Generation failed: internal error (see the service log)")
        return functools.partial(self._finish, item, outcome, created)

    def _finish(self, item: GenerationItem, outcome: Callable[[], None] | None, created: bool) -> None:
        """The rest of `run`, after the slot is freed."""
        try:
            if created:
                item.notify_created()
            if outcome is not None:
                outcome()
        except ItemFailed as failure:
            item.fail(failure.message, failure.status, failure.invalid_fields)
        except Exception:
            log.exception("item %d failed unexpectedly", item.index)
            item.fail("Generation failed: internal error (see the service log)")
        finally:
            item.notify_stopped()  # nothing of this item runs any more: it may be run again

    # -- create ------------------------------------------------------------------------
    def _start(self, item: GenerationItem, in_flight: contextlib.ExitStack) -> tuple[PredictionState, float, str]:
        """Create the prediction, or pick up the one an earlier process created."""
        if item.prediction_id is None:
            return self._create(item, in_flight)
        in_flight.enter_context(self.lane.prediction())
        state = PredictionState(item.prediction_id, "starting")  # read on the first poll
        return (state, *self._deadline_from(item, self.clock()))

    def _deadline_from(self, item: GenerationItem, created: float) -> tuple[float, str]:
        if created + self.generation_timeout < item.deadline:
            return created + self.generation_timeout, "GENERATION_TIMEOUT"
        return item.deadline, item.deadline_label

    def _create(self, item: GenerationItem, in_flight: contextlib.ExitStack) -> tuple[PredictionState, float, str]:
        failures = throttles = 0
        while True:
            delay = self._window_delay(item)
            if delay > 0:
                self.lane.create_waits()  # finished work need not wait for this create
            self._pause(item, delay)
            # The prediction's deadline runs from the moment its create is sent.
            deadline, label = self._deadline_from(item, self.clock())
            with contextlib.ExitStack() as attempt:
                # In flight from the moment the create is sent: with `Prefer: wait` the answer
                # may only come when the prediction is already done.
                attempt.enter_context(self.lane.prediction())
                try:
                    state = self._send_create(item, deadline)
                except (UpstreamError, httpx.TransportError) as exc:
                    # A connection lost after sending may have created it: look before creating again.
                    state = self._find_lost(item) if isinstance(exc, httpx.TransportError) else None
                    if state is None:
                        attempt.close()  # nothing runs upstream while this backs off
                        throttled = isinstance(exc, UpstreamError) and exc.status == 429
                        throttles, failures = throttles + throttled, failures + (not throttled)
                        self._create_failed(item, exc, failures, throttles)
                        self.observer.create_retried(throttled)
                        continue
                in_flight.enter_context(attempt.pop_all())  # stays in flight until final
            self.lane.creates.succeeded()
            item.prediction_id = state.id
            item.timings["created"] = time.time()
            if not state.final:  # else journaled after the slot is freed (see `run`)
                item.notify_created()
            return state, deadline, label

    def _send_create(self, item: GenerationItem, deadline: float) -> PredictionState:
        """One create; the answer is held at most until `deadline` (whole seconds, rounded
        down), so a deadline is kept even while the upstream holds the answer."""
        item.sent_after = time.time()
        item.timings.setdefault("started", item.sent_after)
        item.create_held = True
        try:
            if item.cancelled.is_set():  # see GenerationService.cancel: checked after the flag is up
                raise ItemFailed(item.error or "Generation canceled", item.status)
            wait = min(self.prefer_wait, int(deadline - self.clock()))
            with self.observer.create_call():
                # Run as the spec says (an official model, a version, a deployment), with the
                # prompt in the model's own prompt input.
                return self.session.create(self.spec.run_target, self.spec.upstream_input(item.data), wait)
        finally:
            item.create_held = False

    def _find_lost(self, item: GenerationItem) -> PredictionState | None:
        """The prediction a create without an answer made (see lost_creates); None if there
        is none (or the list cannot be read: then a duplicate create is the lesser harm than
        a lost item)."""
        for attempt in range(3):
            self._pause(item, self.lane.reads.reserve())
            try:
                found = find_lost_creates(self.session, [(item.index, self.spec.upstream_input(item.data))],
                                          item.sent_after or 0, item.claimed(), max_pages=5)
                return found.get(item.index)
            except (UpstreamError, httpx.TransportError) as exc:
                log.warning("looking up a lost create failed (attempt %d): %s", attempt + 1, exc)
        return None

    def _create_failed(self, item: GenerationItem, exc: Exception, failures: int, throttles: int) -> None:
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
        else:
            reason = f"upstream unreachable ({type(exc).__name__})"
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
        self._pause(item, delay)

    # -- wait --------------------------------------------------------------------------
    def _until_final(self, item: GenerationItem, state: PredictionState, deadline: float,
                     label: str) -> PredictionState:
        interval = POLL_START
        while not state.final:
            if item.cancelled.is_set() or self.clock() >= deadline:
                self._cancel(state.id)
                raise self._timed_out(self._span(item, label), label)
            self._pause(item, min(interval, max(0.0, deadline - self.clock())), cancel=state.id)
            interval = min(interval * POLL_GROWTH, POLL_MAX)
            if self.clock() < deadline:
                state = self._poll(item, state, deadline)
        return state

    def _poll(self, item: GenerationItem, state: PredictionState, deadline: float) -> PredictionState:
        """Read the prediction once, paced by the account's read budget."""
        self._pause(item, self.lane.reads.reserve(), cancel=state.id)
        try:
            return self.session.get(state.id)
        except UpstreamError as exc:
            if exc.status in FAIL_FAST:
                raise ItemFailed(f"Generation failed: reading prediction {state.id}: {exc.detail}",
                                 exc.status) from None
            if exc.retry_after:
                self._pause(item, min(exc.retry_after, max(0.0, deadline - self.clock())), cancel=state.id)
        except httpx.TransportError as exc:
            log.warning("poll of %s failed: %s", state.id, type(exc).__name__)
        return state

    def _span(self, item: GenerationItem, label: str) -> float:
        return self.generation_timeout if label == "GENERATION_TIMEOUT" else item.timeout

    # -- cancel ------------------------------------------------------------------------
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
            claimed = set().union(*(i.claimed() for i in held))
            try:
                wanted = [(i.index, self.spec.upstream_input(i.data)) for i in held]
                found = find_lost_creates(self.session, wanted,
                                          min(i.sent_after or 0 for i in held), claimed, only_running=True)
            except (UpstreamError, httpx.TransportError) as exc:
                log.warning("looking up held creates to cancel failed (attempt %d): %s", attempt + 1, exc)
                found = {}
            for state in found.values():
                self._cancel(state.id)
            items = [i for i in held if i.index not in found]
            time.sleep(HELD_CANCEL_PAUSE * (attempt + 1))

    def _cancel(self, prediction_id: str) -> None:
        """Cancel upstream so a prediction past its deadline stops billing; a few tries."""
        for attempt in range(3):
            time.sleep(min(self.lane.reads.reserve(), 2.0))
            try:
                self.session.cancel(prediction_id)
                self.observer.cancel_sent()
                log.info("canceled prediction %s", prediction_id)
                return
            except (UpstreamError, httpx.TransportError) as exc:
                log.warning("cancel of %s failed (attempt %d): %s", prediction_id, attempt + 1, exc)
                time.sleep(0.2 * 2 ** attempt)

    def _pause(self, item: GenerationItem, seconds: float, cancel: str | None = None) -> None:
        """Sleep, waking at once if the request gave up on this item (then cancel upstream)."""
        if seconds > 0 and item.cancelled.wait(seconds) or item.cancelled.is_set():
            if cancel:
                self._cancel(cancel)
            raise ItemFailed(item.error or "Generation canceled", item.status)

    def _timed_out(self, seconds: float, label: str, doing: str = "") -> ItemFailed:
        where = f" {doing}" if doing else ""
        return ItemFailed(f"Generation timed out after {seconds:g} s ({label}){where}", 504)
