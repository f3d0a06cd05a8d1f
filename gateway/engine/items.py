"""One prompt of a request or job, and the typed events of its life.

An item goes `queued` → `running` (from the moment its create is sent) → one of
`succeeded`, `failed`, `canceled`. Whoever needs to know (the journal, the service's list
of unfinished work) implements `ItemListener` and is told `created` (the upstream answered
with a prediction id), `done` (the item is final: answered to its client) and `stopped`
(its worker has returned: nothing of it runs upstream or on disk any more).
"""
from __future__ import annotations

import contextvars
import dataclasses
import threading
from enum import StrEnum
from pathlib import Path
from typing import Any


class ItemStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_ITEM_STATUSES = frozenset({ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELED})

# The one place that decides what an upstream error status means for an item:
# - FAIL_FAST: retrying cannot change the answer (bad input, bad token, no credit), so the
#   item fails at once with the upstream's reason;
# - CLIENT_STATUSES: a synchronous caller sees these as they are (401/402 the token, 409 a
#   cancel, 422 the upstream's field errors, 504 a deadline); anything else is a 500.
FAIL_FAST = frozenset({400, 401, 402, 403, 404, 422})
CLIENT_STATUSES = frozenset({401, 402, 409, 422, 504})


def client_status(status: int | None) -> int:
    """The HTTP status a synchronous caller gets for an item that failed with `status`."""
    return status if status in CLIENT_STATUSES else 500


class ItemListener:
    """Told about an item's steps. Every method is optional (a no-op here)."""

    def claimed(self) -> set[str]:
        """Prediction ids that other items (of the same job) already own."""
        return set()

    def created(self, item: GenerationItem) -> None:
        """The upstream answered the create: `item.prediction_id` is known."""

    def done(self, item: GenerationItem) -> None:
        """The item is final (succeeded, failed or canceled)."""

    def stopped(self, item: GenerationItem) -> None:
        """The item's worker has returned; it may be run again."""


@dataclasses.dataclass(eq=False)  # compared and hashed by identity: items are dict keys
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
    output: Any = None                   # a non-file output (text, JSON), as the model answered it
    error: str | None = None
    status: int | None = None            # an upstream status worth passing on (401/402/422)
    invalid_fields: list | None = None
    prediction_id: str | None = None
    sent_after: float | None = None      # when the last create was sent (wall time): finds a lost answer
    create_held: bool = False            # a create is on its way: sent, its answer (and id) not back yet
    state: ItemStatus = ItemStatus.QUEUED  # QUEUED until final
    listeners: list[ItemListener] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # the log context it was made in (the request's id, its job's): its worker runs in it
    context: contextvars.Context = dataclasses.field(default_factory=contextvars.copy_context, repr=False)

    def fail(self, message: str, status: int | None = None, invalid_fields: list | None = None,
             state: ItemStatus = ItemStatus.FAILED) -> None:
        """Make the item final with an error (once: a final item stays as it is)."""
        with self.lock:
            if self.done.is_set():
                return
            self.error, self.status, self.invalid_fields, self.state = message, status, invalid_fields, state
            self.done.set()
        self.notify_done()

    def expire(self) -> None:
        """The request's time is up: fail the item now and tell its worker to stop."""
        self.fail(f"Generation timed out after {self.timeout:g} s ({self.deadline_label})", 504)
        self.cancelled.set()

    def cancel(self) -> None:
        """Canceled by its owner: stop now; the worker cancels the upstream prediction."""
        self.fail("Canceled by request", 409, state=ItemStatus.CANCELED)
        self.cancelled.set()

    def abandon(self, reason: str, status: int) -> None:
        """Given up by the service itself (it is stopping): fail now, tell the worker to stop."""
        self.fail(reason, status)
        self.cancelled.set()

    @property
    def live_status(self) -> ItemStatus:
        """What a watcher should see: running from the moment a create is sent."""
        if self.done.is_set():
            return self.state
        return ItemStatus.RUNNING if self.sent_after is not None else ItemStatus.QUEUED

    def claimed(self) -> set[str]:
        return set().union(*(listener.claimed() for listener in self.listeners))

    def notify_created(self) -> None:
        for listener in self.listeners:
            listener.created(self)

    def notify_done(self) -> None:
        for listener in self.listeners:
            listener.done(self)

    def notify_stopped(self) -> None:
        for listener in self.listeners:
            listener.stopped(self)
