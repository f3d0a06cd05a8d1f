"""The application factory, and the explicit start and stop of an app's background work.

`create_app` only reads the settings and wires the parts together: it starts no thread and
touches no job. `start(app)` does the start-up work (remove partial downloads, resume
unfinished jobs, resend undelivered webhooks); `stop(app)` tells unfinished synchronous
items to stop, closes the journal and the upstream clients. gunicorn calls them from its
worker hooks (gunicorn.conf.py), `python app.py` around `app.run`, tests around each server.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from urllib.parse import unquote, urlparse

from flask import Flask

from gateway import logs
from gateway.api import BLUEPRINTS
from gateway.config import Settings, read_environment
from gateway.engine.registry import Alias, ModelCatalog, load_aliases
from gateway.engine.schemas import SchemaCache
from gateway.engine.service import GenerationService
from gateway.errors import register_error_handlers
from gateway.jobs.journal import Journal, open_journal
from gateway.jobs.manager import JobManager
from gateway.metrics import Metrics
from gateway.readiness import Readiness, folder_problem, sqlite_problem
from gateway.redaction import Redactor
from gateway.signing import file_signer
from gateway.state import EXTENSION, GatewayState, gateway_state
from gateway.sync_gate import SyncRequestGate

log = logging.getLogger(__name__)


def create_app(config: Mapping[str, str] | None = None) -> Flask:
    """Build the service. `config` (variable name -> value) replaces the environment
    entirely, so tests never pick up a developer's `.env`. Raises ConfigError."""
    settings = Settings.from_mapping(read_environment() if config is None else config)
    aliases = load_aliases(settings.models_file)  # a bad MODELS_FILE stops start-up here
    logs.install_context()  # every log line gets its request's id (before the redactor wraps it)
    redactor = Redactor()
    redactor.install()
    for secret in settings.secrets:
        redactor.add(secret)
    if settings.redis_url and urlparse(settings.redis_url).password:  # masked on its own too
        redactor.add(unquote(urlparse(settings.redis_url).password))
    metrics = Metrics(settings.model_prices, settings.rate_window)
    service = GenerationService(settings, tracker=redactor, metrics=metrics)
    metrics.watch(service.lanes.readings, service.status)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False
    journal = open_journal(settings.database_url, settings.jobs_db)  # PostgreSQL if set, else SQLite
    models = _model_catalog(settings, service, journal, aliases)
    app.extensions[EXTENSION] = GatewayState(settings, redactor, service,
                                             JobManager(settings, service, journal, specs=models.stored_spec),
                                             SyncRequestGate(settings.max_sync_requests, service.ensure_admitting),
                                             file_signer(settings, on_secret=redactor.add),
                                             models=models, metrics=metrics,
                                             readiness=_readiness(settings, service, journal))
    register_error_handlers(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    return app


def _model_catalog(settings: Settings, service: GenerationService, journal: Journal,
                   aliases: dict[str, Alias]) -> ModelCatalog:
    """Names, allowlist and schemas: schemas are read with the caller's token through its
    account's read budget, and kept in the journal's database across restarts."""
    return ModelCatalog(SchemaCache(journal, settings.model_schema_ttl), service.sessions,
                        lambda account: service.lanes.lane(account).reads.reserve(),
                        settings.allowed_models, aliases)


def _readiness(settings: Settings, service: GenerationService, journal: Journal) -> Readiness:
    """What `/ready` checks: the output folder, the journal, Redis (when configured)."""
    readiness = Readiness()
    readiness.add("output_dir", lambda: folder_problem(settings.output_dir, "OUTPUT_DIR"))
    if settings.database_url:
        readiness.add("journal", journal.problem)  # its own connection, a short timeout
    else:
        readiness.add("journal", lambda: sqlite_problem(settings.jobs_db, "JOBS_DB"))
    if settings.redis_url:
        readiness.add("redis", lambda: _answers(service.ensure_admitting, "Redis (REDIS_URL)"))
    return readiness


def _answers(call: Callable[[], object], what: str) -> str | None:
    try:
        call()
    except Exception as exc:  # the detail may name a host: logged, not answered
        log.warning("readiness: %s failed: %s", what, exc)
        return f"{what} does not answer"
    return None


def start(app: Flask) -> None:
    """Start-up work, once per process, before requests are served."""
    state = gateway_state(app)
    _warn_about_access(state.settings)
    state.service.remove_partials()
    state.service.start_background()  # shared limits (REDIS_URL): lease renewals, settings
    state.models.prime(job["model"] for job in state.jobs.journal.unfinished_jobs())  # their kept schemas
    state.jobs.resume()  # finish what a previous process (or a dead replica) started
    state.jobs.start()  # heartbeat: claims, cancels from other replicas, adoption, webhooks, retention
    state.metrics.start()  # under gunicorn: this worker's gauges, for scrapes another worker answers
    state.readiness.recovered()


def stop(app: Flask) -> None:
    """Stop cleanly: synchronous items are told to stop; jobs stay journaled for the next
    process; the journal and the upstream clients are closed."""
    state = gateway_state(app)
    state.metrics.stop()
    state.jobs.stop()
    state.service.shutdown()


def _warn_about_access(settings: Settings) -> None:
    if not settings.admin_api_key:
        log.warning("CONCURRENT_DOCKER_ADMIN_API_KEY is not set: admin access is disabled")
    if not settings.replicate_api_token:
        log.warning("REPLICATE_API_TOKEN is not set: only callers with X-Replicate-API-Key can generate")
