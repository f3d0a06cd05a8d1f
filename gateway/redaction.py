"""Keeps secrets out of log lines: every record is redacted when it is created.

What is masked, and why the set stays small:
- anything shaped like a Replicate token (`r8_...`), registered or not;
- the configured secrets (`add`: the server token, the admin key, the webhook secret);
- the callers' tokens *in use*: the upstream session cache `track`s a token when it builds
  its session and `untrack`s it when the session is closed, so the set is bounded by the
  cache's capacity (UPSTREAM_SESSION_CACHE_SIZE) plus the sessions still held by running
  work, never by how many tokens were ever seen. Caller tokens shorter than MIN_TRACKED
  characters are not tracked: masking a caller's `POST` or `2026` would let anyone erase
  words from everyone's log lines. The service never logs a token itself; this is the
  safety net for text that might carry one (an exception's message, say).
Exception text is formatted and redacted up front, so a traceback cannot carry one either.

A log line costs one substring search per secret (a few microseconds for the default 64
sessions) plus one regex. A compiled alternation of the secrets would be cheaper per line,
but must be rebuilt whenever a session comes or goes, and compiling 64 tokens of 8 KB (the
largest header) takes about half a second: a flood of made-up tokens would buy that per
request.
"""
from __future__ import annotations

import collections
import logging
import re
import threading

TOKEN_SHAPE = re.compile(r"r8_[A-Za-z0-9]{8,}")
MASK = "[redacted]"
MIN_CONFIGURED = 4   # an operator's secret: masked from this length
MIN_TRACKED = 16     # a caller's token: shorter ones are not masked (they could be any word)


class _Secrets:
    """The secret set one or more Redactors share (see `merge`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.configured: set[str] = set()
        self.in_use: collections.Counter[str] = collections.Counter()  # token -> sessions holding it
        self.ordered: tuple[str, ...] = ()  # all of them, longest first; replaced, never mutated

    def rebuild(self) -> None:
        """Under the lock: the snapshot `redact` reads without taking the lock."""
        self.ordered = tuple(sorted(self.configured | set(self.in_use), key=len, reverse=True))


class Redactor:
    def __init__(self) -> None:
        self._state = _Secrets()
        self._formatter = logging.Formatter()

    def add(self, secret: str) -> None:
        """A configured secret, masked for the life of the process."""
        if secret and len(secret) >= MIN_CONFIGURED:
            state = self._state
            with state.lock:
                if secret not in state.configured:
                    state.configured.add(secret)
                    state.rebuild()

    def track(self, token: str) -> None:
        """A caller's token now in use (one more session holds it); ignored if short."""
        if len(token) < MIN_TRACKED:
            return
        state = self._state
        with state.lock:
            state.in_use[token] += 1
            if state.in_use[token] == 1:
                state.rebuild()

    def untrack(self, token: str) -> None:
        """One session of `token` is gone; the token is forgotten with its last one."""
        state = self._state
        with state.lock:
            if token not in state.in_use:
                return
            state.in_use[token] -= 1
            if state.in_use[token] <= 0:
                del state.in_use[token]
                state.rebuild()

    @property
    def tracked(self) -> int:
        """How many distinct caller tokens are masked now (bounded: see the module doc)."""
        return len(self._state.in_use)

    def redact(self, text: str) -> str:
        for secret in self._state.ordered:  # longest first: a secret inside another goes with it
            if secret in text:
                text = text.replace(secret, MASK)
        return TOKEN_SHAPE.sub(MASK, text)

    def install(self) -> None:
        """Wrap the process's log-record factory (logging is process-wide by nature)."""
        previous = logging.getLogRecordFactory()
        if getattr(previous, "redactor", None) is not None:
            previous.redactor.merge(self)
            return

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            record.msg = factory.redactor.redact(record.getMessage())
            record.args = None
            if record.exc_info and record.exc_info[0] is not None:
                record.exc_text = factory.redactor.redact(self._formatter.formatException(record.exc_info))
            return record

        factory.redactor = self
        logging.setLogRecordFactory(factory)

    def merge(self, other: Redactor) -> None:
        """Share one secret set with a later app in the same process (tests build many)."""
        other._state = self._state
