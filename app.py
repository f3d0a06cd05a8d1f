"""The Flask application: `create_app()` for tests and gunicorn, `python app.py` to serve.

Settings are read here, when the app is created, so `gunicorn app:app` and `python app.py`
run with the same configuration (environment, then `.env`).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from typing import Iterator, Mapping

from dotenv import dotenv_values
from flask import Flask, jsonify

from errors import ServiceError, register_error_handlers
from redaction import Redactor
from jobs import JobManager
from journal import Journal
from routes import bp
from routes_jobs import bp as jobs_bp
from service import GenerationService
from settings import ConfigError, Settings

log = logging.getLogger(__name__)


def read_environment() -> dict[str, str]:
    """`.env` values, overridden by the real environment."""
    return {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}


class TooManySyncRequests(ServiceError):
    """503: every synchronous generation slot is taken; answered with Retry-After."""

    RETRY_AFTER_SECONDS = 5

    def __init__(self, limit: int) -> None:
        super().__init__(503, f"Too many synchronous requests in progress ({limit}, MAX_SYNC_REQUESTS); "
                              "submit a job with POST /jobs or retry later")


class SyncRequestGate:
    """At most `limit` synchronous generation requests at once (MAX_SYNC_REQUESTS).

    Each one holds a request thread for up to its timeout; without this bound a flood of
    them took every gunicorn thread, and /health, /status and /configure waited behind them.
    Past the bound a request is refused at once rather than queued.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def in_progress(self) -> int:
        return self._held

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold one place for the body of the `with`; raise TooManySyncRequests if none is free."""
        with self._lock:
            if self._held >= self.limit:
                raise TooManySyncRequests(self.limit)
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1


def _too_many_sync_requests(error: TooManySyncRequests):
    response = jsonify(error.body())
    response.headers["Retry-After"] = str(error.RETRY_AFTER_SECONDS)
    return response, error.status


def create_app(config: Mapping[str, str] | None = None) -> Flask:
    """Build the service. `config` (variable name -> value) replaces the environment
    entirely, so tests never pick up a developer's `.env`. Raises ConfigError."""
    settings = Settings.from_mapping(read_environment() if config is None else config)
    redactor = Redactor()
    redactor.install()
    for secret in settings.secrets:
        redactor.add(secret)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False
    app.extensions["settings"] = settings
    app.extensions["redactor"] = redactor
    service = GenerationService(settings, tracker=redactor)
    app.extensions["generation"] = service
    app.extensions["jobs"] = JobManager(settings, service, Journal(settings.jobs_db))
    app.extensions["sync_requests"] = SyncRequestGate(settings.max_sync_requests)
    register_error_handlers(app)
    app.register_error_handler(TooManySyncRequests, _too_many_sync_requests)
    app.register_blueprint(bp)
    app.register_blueprint(jobs_bp)
    _warn_about_access(settings)
    app.extensions["jobs"].resume()  # finish what a previous process started
    return app


def _warn_about_access(settings: Settings) -> None:
    if not settings.admin_api_key:
        log.warning("CONCURRENT_DOCKER_ADMIN_API_KEY is not set: admin access is disabled")
    if not settings.replicate_api_token:
        log.warning("REPLICATE_API_TOKEN is not set: only callers with X-Replicate-API-Key can generate")


def _build_or_exit() -> Flask:
    try:
        return create_app()
    except ConfigError as exc:
        logging.getLogger("startup").error("%s", exc)
        sys.exit(2)


def __getattr__(name: str) -> Flask:
    """`app.app` is built on first access (PEP 562), so `gunicorn app:app` gets an app while
    importing this module (as tests do) builds nothing."""
    if name != "app":
        raise AttributeError(name)
    built = globals()["app"] = _build_or_exit()
    return built


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = _build_or_exit()
    atexit.register(app.extensions["generation"].shutdown)
    settings = app.extensions["settings"]
    app.run(host=settings.host, port=settings.port, threaded=True)
