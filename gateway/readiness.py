"""Readiness (`GET /ready`): can the service do its work right now, and if not, why.

`/health` says the process is alive; readiness says whether it should get traffic. Each
check is a named callable answering None (fine) or the reason it is not: the output folder
and the journal must be writable (probed by really writing, since permissions say nothing
for root or a read-only mount), a configured Redis or PostgreSQL must answer, and start-up
recovery must be over. Reasons name settings, never paths or secrets (the answer needs no key).
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable

Check = Callable[[], "str | None"]
PROBE_PREFIX = ".ready-probe-"


def folder_problem(path: str, setting: str) -> str | None:
    """None if a file can be created (and removed) in `path`; else why not."""
    try:
        handle, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
    except OSError as exc:
        return f"{setting} is not writable: {exc.strerror or type(exc).__name__}"
    os.close(handle)
    os.unlink(name)
    return None


def sqlite_problem(path: str, setting: str) -> str | None:
    """The SQLite journal needs its file and its folder writable (the WAL and lock files)."""
    if path == ":memory:":
        return None
    problem = folder_problem(os.path.dirname(os.path.abspath(path)) or ".", setting)
    if problem or not os.path.exists(path):
        return problem
    try:
        with open(path, "ab"):  # opened for writing, nothing written
            pass
    except OSError as exc:
        return f"{setting} is not writable: {exc.strerror or type(exc).__name__}"
    return None


class Readiness:
    def __init__(self) -> None:
        self._checks: list[tuple[str, Check]] = []
        self._recovered = threading.Event()

    def add(self, name: str, check: Check) -> None:
        self._checks.append((name, check))

    def recovered(self) -> None:
        """Start-up recovery (resuming jobs) is over."""
        self._recovered.set()

    def report(self) -> tuple[bool, dict[str, str]]:
        """(ready, each check's answer: "ok" or the reason)."""
        answers = {"recovery": "ok" if self._recovered.is_set() else "start-up recovery is still running"}
        for name, check in self._checks:
            try:
                answers[name] = check() or "ok"
            except Exception as exc:  # a check that breaks is a reason too, never a 500
                answers[name] = f"check failed: {type(exc).__name__}"
        return all(answer == "ok" for answer in answers.values()), answers
