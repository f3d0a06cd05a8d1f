"""Predictions, output files, per-token rate windows and the statistics tests assert on."""
from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import os
import time
from datetime import UTC, datetime
from typing import Any

FINAL = ("succeeded", "failed", "canceled", "aborted")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_id() -> str:
    return base64.b32encode(os.urandom(16)).decode().rstrip("=").lower()


@dataclasses.dataclass
class OutputFile:
    stamp: dict[str, Any]
    fmt: str
    aspect_ratio: str
    created: float
    missing: bool = False          # answers 404 from the start
    truncate: bool = False         # every download is cut short
    data: bytes | None = None      # made while the prediction ran, else on first download


@dataclasses.dataclass
class Prediction:
    id: str
    model: str
    token: str
    input: dict[str, Any]
    version: Any = None            # the catalog.Version that runs
    official: bool = True          # official models report `version: "hidden"`
    deployment: str | None = None  # `owner/name` when created through a deployment
    created_at: str = dataclasses.field(default_factory=now_iso)
    created_t: float = dataclasses.field(default_factory=time.monotonic)
    status: str = "starting"
    output: Any = None
    error: str | None = None
    logs: str = ""
    started_at: str | None = None
    completed_at: str | None = None
    completed_t: float | None = None
    predict_time: float | None = None
    started_t: float | None = None
    data_removed: bool = False
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    tasks: list = dataclasses.field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_json(self, base: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "model": self.model,
            "version": "hidden" if self.official or self.version is None else self.version.id,
            "input": {} if self.data_removed else self.input,
            "output": None if self.data_removed else self.output,
            "logs": "" if self.data_removed else self.logs,
            "error": self.error, "status": self.status, "data_removed": self.data_removed,
            "created_at": self.created_at, "started_at": self.started_at,
            "completed_at": self.completed_at, "source": "api",
            "urls": {"get": f"{base}/v1/predictions/{self.id}",
                     "cancel": f"{base}/v1/predictions/{self.id}/cancel",
                     "web": f"https://replicate.com/p/{self.id}"},
        }
        if self.predict_time is not None:
            body["metrics"] = {"predict_time": self.predict_time,
                               "total_time": (self.completed_t or 0) - self.created_t}
        return body


class Windows:
    """Sliding-window request logs per (kind, token)."""

    def __init__(self) -> None:
        self._log: dict[tuple[str, str], collections.deque] = collections.defaultdict(collections.deque)

    def admit(self, key: tuple[str, str], limit: int, window: float, spacing: float = 0.0) -> float | None:
        """Record a request and return None, or return the seconds until one would pass."""
        now = time.monotonic()
        log = self._log[key]
        while log and log[0] <= now - window:
            log.popleft()
        if len(log) >= limit:
            return log[0] + window - now
        if spacing and log and log[-1] + spacing > now:
            return log[-1] + spacing - now
        log.append(now)
        return None


class Stats:
    """Counters read through `GET /_emulator/stats`. Times are seconds since `epoch`."""

    def __init__(self) -> None:
        self.epoch = time.monotonic()
        self.counters: collections.Counter = collections.Counter()
        self.by_token: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.create_times: dict[str, list[float]] = collections.defaultdict(list)
        self.attempt_times: dict[str, list[float]] = collections.defaultdict(list)
        self.in_flight: collections.Counter = collections.Counter()
        self.max_in_flight = 0
        self.max_in_flight_by_token: collections.Counter = collections.Counter()
        self.canceled_ids: list[str] = []

    def count(self, name: str, token: str | None = None) -> None:
        self.counters[name] += 1
        if token is not None:
            self.by_token[token][name] += 1

    def stamp(self, series: dict[str, list[float]], token: str) -> None:
        series[token].append(round(time.monotonic() - self.epoch, 6))

    def started(self, token: str) -> None:
        self.in_flight[token] += 1
        total = sum(self.in_flight.values())
        self.max_in_flight = max(self.max_in_flight, total)
        self.max_in_flight_by_token[token] = max(self.max_in_flight_by_token[token],
                                                 self.in_flight[token])

    def finished(self, token: str) -> None:
        self.in_flight[token] -= 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "by_token": {t: dict(c) for t, c in self.by_token.items()},
            "create_times": dict(self.create_times),
            "attempt_times": dict(self.attempt_times),
            "in_flight": sum(self.in_flight.values()),
            "max_in_flight": self.max_in_flight,
            "max_in_flight_by_token": dict(self.max_in_flight_by_token),
            "canceled_ids": list(self.canceled_ids),
        }
