"""Keeps secrets out of log lines: every record is redacted when it is created.

Known secrets (the server token, the admin key, each caller's token) are registered here;
anything shaped like a Replicate token (`r8_...`) is redacted even if never registered.
Exception text is formatted and redacted up front, so a traceback cannot carry one either.
"""
from __future__ import annotations

import logging
import re
import threading

TOKEN_SHAPE = re.compile(r"r8_[A-Za-z0-9]{8,}")
MASK = "[redacted]"


class Redactor:
    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()
        self._formatter = logging.Formatter()

    def add(self, secret: str) -> None:
        if secret and len(secret) >= 4:
            with self._lock:
                self._secrets.add(secret)

    def redact(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
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

    def merge(self, other: "Redactor") -> None:
        """Share one secret set with a later app in the same process (tests build many)."""
        other._secrets = self._secrets
        other._lock = self._lock
