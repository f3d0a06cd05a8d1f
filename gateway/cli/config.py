"""Settings from flags and the environment, and the masking of secrets in everything shown."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, urlsplit

from tqdm import tqdm

from .errors import usage_error

VERSION = "0.1.0"
DEFAULT_URL = "http://127.0.0.1:5003"
Credentials = tuple[str | None, str | None, tuple[str, str]]  # admin key, token, the names they came from


@dataclasses.dataclass(frozen=True)
class Config:
    url: str
    headers: dict[str, str] = dataclasses.field(repr=False)
    secrets: tuple[str, ...] = dataclasses.field(repr=False)
    as_json: bool = False
    progress: bool = False

    @property
    def shown_url(self) -> str:
        """The URL without any user:password part."""
        parts = urlsplit(self.url)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        return parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()

    def require_credentials(self) -> None:
        """Raise a usage error unless a key or a token was given."""
        if not self.headers:
            raise usage_error("no credentials: set RCG_ADMIN_KEY (or --admin-key) or RCG_REPLICATE_TOKEN "
                              "(or --token)")


def resolve_config(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    """Flags first, then the environment. A flag of either credential beats both variables."""
    url, parts = _gateway_url(args, environ)
    admin, token, source = _credentials(args, environ)
    headers = {}
    if admin:
        headers["X-Admin-API-Key"] = _header_value(admin, source[0])
    if token:
        headers["X-Replicate-API-Key"] = _header_value(token, source[1])
    hidden = tuple(s for s in (admin, token, parts.password) if s)
    progress = sys.stdout.isatty() and sys.stderr.isatty() and not getattr(args, "quiet", False)
    return Config(url.rstrip("/"), headers, hidden, getattr(args, "json", False), progress)


def _gateway_url(args: argparse.Namespace, environ: dict[str, str]) -> tuple[str, SplitResult]:
    url = getattr(args, "url", None) or environ.get("RCG_URL") or DEFAULT_URL
    parts = urlsplit(url)
    try:
        _ = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage_error("the gateway URL (--url / RCG_URL) must look like http://host:port")
    return url, parts


def _credentials(args: argparse.Namespace, environ: dict[str, str]) -> Credentials:
    """Where they came from is named in errors; their values never are."""
    admin, token = getattr(args, "admin_key", None), getattr(args, "token", None)
    source = ("--admin-key", "--token")
    if not (admin or token):
        admin, token = environ.get("RCG_ADMIN_KEY"), environ.get("RCG_REPLICATE_TOKEN")
        source = ("RCG_ADMIN_KEY", "RCG_REPLICATE_TOKEN")
    if admin and token:
        raise usage_error(f"give {source[0]} or {source[1]}, not both")
    return admin, token, source


def _header_value(value: str, name: str) -> str:
    """Checked here so that requests never quotes a bad value (and so the secret) in an error."""
    if not re.fullmatch(r"[!-~]+", value):
        raise usage_error(f"{name} is not usable as an HTTP header: printable ASCII without spaces only")
    return value


def redact(text: str, hidden: Iterable[str]) -> str:
    """`text` with every secret replaced by `***`."""
    for secret in hidden:
        text = text.replace(secret, "***")
    return text


def emit(config: Config, text: str) -> None:
    """The command's product goes to stdout (diagnostics go to the log, on stderr)."""
    sys.stdout.write(redact(text, config.secrets) + "\n")
    sys.stdout.flush()


def emit_json(config: Config, value: Any) -> None:
    """`value` as one line of JSON on stdout."""
    emit(config, json.dumps(value, ensure_ascii=False))


class RedactingHandler(logging.Handler):
    """Writes log records to stderr (above a progress bar) with every secret masked. `hidden`
    is shared with `main`, which fills it once the secrets are known."""

    def __init__(self, hidden: list[str]) -> None:
        super().__init__()
        self.hidden = hidden
        self.setFormatter(logging.Formatter("rcg: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(redact(self.format(record), self.hidden), file=sys.stderr)
        except Exception:  # a log line must never take the command down
            self.handleError(record)
