"""The application factory, and the explicit start and stop of an app's background work.

`create_app` only reads the settings and wires the parts together: it starts no thread and
touches no job. `start(app)` does the start-up work (remove partial downloads, resume
unfinished jobs, resend undelivered webhooks); `stop(app)` tells unfinished synchronous
items to stop, closes the journal and the upstream clients. gunicorn calls them from its
worker hooks (gunicorn.conf.py), `python app.py` around `app.run`, tests around each server.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from flask import Flask

from gateway.api import BLUEPRINTS
from gateway.config import Settings, read_environment
from gateway.engine.service import GenerationService
from gateway.errors import register_error_handlers
from gateway.jobs.journal import Journal
from gateway.jobs.manager import JobManager
from gateway.redaction import Redactor
from gateway.state import EXTENSION, GatewayState, gateway_state
from gateway.sync_gate import SyncRequestGate

log = logging.getLogger(__name__)


def create_app(config: Mapping[str, str] | None = None) -> Flask:
    """Build the service. `config` (variable name -> value) replaces the environment
    entirely, so tests never pick up a developer's `.env`. Raises ConfigError."""
    settings = Settings.from_mapping(read_environment() if config is None else config)
    redactor = Redactor()
    redactor.install()
    for secret in settings.secrets:
        redactor.add(secret)
    service = GenerationService(settings, tracker=redactor)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False
    app.extensions[EXTENSION] = GatewayState(settings, redactor, service,
                                             JobManager(settings, service, Journal(settings.jobs_db)),
                                             SyncRequestGate(settings.max_sync_requests))
    register_error_handlers(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    return app


def start(app: Flask) -> None:
    """Start-up work, once per process, before requests are served."""
    state = gateway_state(app)
    _warn_about_access(state.settings)
    state.service.remove_partials()
    state.jobs.resume()  # finish what a previous process started


def stop(app: Flask) -> None:
    """Stop cleanly: synchronous items are told to stop; jobs stay journaled for the next
    process; the journal and the upstream clients are closed."""
    state = gateway_state(app)
    state.jobs.stop()
    state.service.shutdown()


def _warn_about_access(settings: Settings) -> None:
    if not settings.admin_api_key:
        log.warning("CONCURRENT_DOCKER_ADMIN_API_KEY is not set: admin access is disabled")
    if not settings.replicate_api_token:
        log.warning("REPLICATE_API_TOKEN is not set: only callers with X-Replicate-API-Key can generate")
