"""The gateway's HTTP API as the command line uses it: one session per thread, retries with
backoff, and errors that name the request but never a secret."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any
from urllib.parse import quote

import requests

from .config import VERSION, Config
from .errors import EXIT_SERVICE, EXIT_USAGE, CliError

log = logging.getLogger("rcg")  # not __name__: main installs its redacting handler on "rcg"

TRANSIENT = {408, 429, 502, 503, 504}       # answers worth asking again
TIMEOUT = (5, 60)                           # connect, read (seconds)
ATTEMPTS = 4                                # per request, on connection errors and TRANSIENT answers


class Client:
    """The gateway over HTTP, one requests session per thread. Errors become CliError: a 4xx
    is the caller's (exit 2), a 5xx or a network failure the service's (exit 3). Connection
    errors and TRANSIENT answers are retried with backoff; the messages never hold a secret."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.config.headers)
            session.headers["User-Agent"] = f"rcg/{VERSION}"
        return session

    def request(self, method: str, path: str, retry: bool = True, **kwargs: Any) -> requests.Response:
        """The answer to `method path`; raises CliError for a 4xx/5xx or a network failure."""
        tries = ATTEMPTS if retry else 1
        for attempt in range(1, tries + 1):
            try:
                response = self._session().request(method, self.config.url + path, timeout=TIMEOUT, **kwargs)
            except requests.RequestException as exc:
                if attempt == tries:
                    raise CliError(self._network_message(exc), EXIT_SERVICE) from None
                log.debug("%s %s: %s; trying again", method, path, type(exc).__name__)
                time.sleep(_backoff(attempt))
                continue
            if response.status_code in TRANSIENT and attempt < tries:
                _pause(response, method, path, attempt)
                continue
            if response.status_code >= 400:
                raise self._answer_error(response, method, path)
            return response
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON answer to `method path`; raises CliError as `request` does."""
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise CliError(f"the gateway answered {method} {path} with something that is not JSON",
                           EXIT_SERVICE) from None

    def _network_message(self, exc: requests.RequestException) -> str:
        what = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
        return f"cannot reach the gateway at {self.config.shown_url}: {what} ({type(exc).__name__})"

    def _answer_error(self, response: requests.Response, method: str, path: str) -> CliError:
        try:
            body = response.json()
            detail = str(body.get("error") or body)
        except (ValueError, AttributeError):
            detail = response.reason or "no detail"
        status = response.status_code
        if status in (401, 403):
            detail += " (check --admin-key / RCG_ADMIN_KEY or --token / RCG_REPLICATE_TOKEN)"
        code = EXIT_USAGE if 400 <= status < 500 and status not in TRANSIENT else EXIT_SERVICE
        return CliError(f"the gateway answered {status} to {method} {path}: {detail[:1000]}", code)


def _backoff(attempt: int) -> float:
    return min(8.0, 0.5 * 2 ** (attempt - 1))


def _pause(response: requests.Response, method: str, path: str, attempt: int) -> None:
    """Wait before asking again after a TRANSIENT answer, as long as the service asks (capped)."""
    wait = _retry_after(response) or _backoff(attempt)
    response.close()
    log.debug("%s %s answered %s; trying again in %.1f s", method, path, response.status_code, wait)
    time.sleep(wait)


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return min(30.0, float(value)) if value.isdigit() else None


def content_length(response: requests.Response) -> int | None:
    """The Content-Length header as a number, or None when absent or not a number."""
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def job_path(job_id: str) -> str:
    """The API path of a job, with the id quoted so it cannot reach another path."""
    return "/jobs/" + quote(job_id, safe="")
