"""A small client of the emulator's control API, for tests and benchmarks."""
from __future__ import annotations

from typing import Any

import requests


class EmulatorControl:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._http = requests.Session()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, f"{self.url}/_emulator/{path}", timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()

    def reset(self, faults: bool = True) -> None:
        self._call("POST", "reset", json={"faults": faults})

    def set_faults(self, **changes: Any) -> dict:
        return self._call("PATCH", "faults", json=changes)

    def faults(self) -> dict:
        return self._call("GET", "faults")

    def set_token(self, token: str, state: str) -> None:
        self._call("PUT", f"tokens/{token}", json={"state": state})

    def stats(self) -> dict:
        return self._call("GET", "stats")

    def predictions(self) -> list[dict]:
        return self._call("GET", "predictions")


def max_in_window(times: list[float], window: float) -> int:
    """The most events that fall in any half-open window of `window` seconds."""
    ordered, best, start = sorted(times), 0, 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an interval is [start, end))."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best
