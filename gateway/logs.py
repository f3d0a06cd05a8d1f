"""Logging in one place: who a log line belongs to, and how lines are written.

Every record carries four fields from the current `contextvars` context: `request_id`,
`job_id`, `item` (the prompt's index) and `prediction_id` (None where they do not apply).
- A request starts a fresh context (`begin_request`): its id, nothing else.
- Code that starts work for a job binds `job_id` around it (`log_fields`).
- A generation item captures the context it was created in and its worker re-enters it on
  the lane's pool thread (`bind_item`), so an item's lines carry the request and job that
  asked for it; `item` and `prediction_id` are read from the item itself, as they change.

`install_context()` adds the fields through the log-record factory (process-wide, once);
the redactor (redaction.py) wraps the same factory, so secrets are masked in both formats.
`configure(level, log_format)` writes lines as text or, with LOG_FORMAT=json, one JSON
object per line: time, level, logger, request_id, job_id, item, prediction_id, message
(and exception). gunicorn gets the same formatter through `gunicorn_logconfig`.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

FIELDS = ("request_id", "job_id", "item", "prediction_id")
LOG_FORMATS = ("text", "json")
# A caller's X-Request-ID is used only when it is a plain token: it ends up in log lines
# and headers, so a newline or a 10 KB value must never get that far.
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_EMPTY: MappingProxyType = MappingProxyType({})
_CONTEXT: contextvars.ContextVar[MappingProxyType] = contextvars.ContextVar("gateway_log_context", default=_EMPTY)
_install_lock = threading.Lock()
_installed = False
_HANDLER_MARK = "_gateway_handler"
# Libraries that log every HTTP call at INFO (each poll of each prediction): warnings only.
QUIET = ("httpx", "httpcore", "urllib3")


def request_id_from(presented: str | None) -> str:
    """The caller's id when it is a sane token, else a new one (32 hex characters)."""
    if presented is not None and REQUEST_ID.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


def begin_request(request_id: str) -> None:
    """A new request on this thread: its id, and none of the last request's fields."""
    _CONTEXT.set(MappingProxyType({"request_id": request_id}))


def current(field: str) -> Any:
    """A field of the current context (None when unset)."""
    return _CONTEXT.get().get(field)


def bind(**fields: Any) -> contextvars.Token:
    """Add fields to the current context; `reset` with the token to take them back."""
    return _CONTEXT.set(MappingProxyType({**_CONTEXT.get(), **fields}))


def reset(token: contextvars.Token) -> None:
    _CONTEXT.reset(token)


@contextlib.contextmanager
def log_fields(**fields: Any) -> Iterator[None]:
    """Fields for the body of the `with` only (contexts copied inside keep them)."""
    token = bind(**fields)
    try:
        yield
    finally:
        reset(token)


def bind_item(item: Any) -> None:
    """Lines of this context belong to `item`: its `index` and `prediction_id` are read
    from it at each line (the prediction id is known only once the create answered)."""
    bind(_item=item)


def context_fields() -> dict[str, Any]:
    """The four fields as a record gets them."""
    context = _CONTEXT.get()
    item = context.get("_item")
    return {
        "request_id": context.get("request_id"),
        "job_id": context.get("job_id"),
        "item": getattr(item, "index", context.get("item")),
        "prediction_id": getattr(item, "prediction_id", None) or context.get("prediction_id"),
    }


def install_context() -> None:
    """Add the context fields to every log record of the process (once: the redactor may
    wrap this factory afterwards, so it cannot be recognised on top of the chain)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            record.__dict__.update(context_fields())
            return record

        # The redactor looks for itself on the current factory to share one secret set
        # instead of wrapping again (redaction.py): keep it visible through this layer.
        factory.redactor = getattr(previous, "redactor", None)
        logging.setLogRecordFactory(factory)


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name, None) for name in FIELDS}


class TextFormatter(logging.Formatter):
    """`time level logger: message [request_id=... job_id=... item=... prediction_id=...]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        shown = " ".join(f"{k}={v}" for k, v in _fields_of(record).items() if v is not None)
        if not shown:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{shown}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            **_fields_of(record),
            "message": record.getMessage(),
        }
        if record.exc_info or record.exc_text:
            # exc_text was formatted and redacted when the record was made (redaction.py).
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(level: str = "info", log_format: str = "text") -> None:
    """Write the process's log lines to stderr in `log_format`; replaces an earlier call's
    handler (idempotent), leaves handlers others added alone."""
    install_context()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def gunicorn_logconfig(level: str, log_format: str) -> dict[str, Any]:
    """gunicorn's `logconfig_dict`: its own error and access lines, and the app's, all in
    one format on stderr/stdout, each with the request's fields."""
    fmt = {"()": f"{__name__}.{'JsonFormatter' if log_format == 'json' else 'TextFormatter'}"}
    return {
        "version": 1,
        "disable_existing_loggers": False,  # the service's loggers exist before this runs
        "formatters": {"gateway": fmt},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "gateway", "stream": "ext://sys.stderr"},
            "stdout": {"class": "logging.StreamHandler", "formatter": "gateway", "stream": "ext://sys.stdout"},
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
            **{name: {"level": max("WARNING", level.upper(), key=logging.getLevelName)} for name in QUIET},
        },
    }
