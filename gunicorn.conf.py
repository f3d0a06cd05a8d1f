"""Production server settings: `gunicorn -c gunicorn.conf.py app:app`.

Without REDIS_URL: one worker process, many threads. The slot pools and rate windows then
live in the process's memory: N worker processes would each enforce the full limit,
multiplying the real concurrency and request rate by N, and `/configure` would change one
worker of N. So more than one worker is refused at start-up.
With REDIS_URL every limit of an account is held in Redis, shared by every worker and
replica, and `GUNICORN_WORKERS` (default 1) workers may run.
Threads are cheap here: a synchronous batch request mostly waits, and generations run on the
service's own thread pool, not on these request threads.

The app's start-up work (resume jobs, ...) runs in the worker once it has loaded the app
(`post_worker_init`), and its stop in `worker_exit`: see gateway/app.py.
"""
import shutil
import sys

from gateway.app import start, stop
from gateway.config import ConfigError, Settings, read_environment
from gateway.logs import gunicorn_logconfig
from gateway.metrics import mark_process_dead, prepare_multiprocess_dir

_env = read_environment()
try:
    _settings = Settings.from_mapping(_env)
except ConfigError as exc:  # the same check the app makes, before any worker starts
    sys.stderr.write(f"{exc}\n")
    sys.exit(2)

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.gunicorn_workers
worker_class = "gthread"
# Validated with the other settings: MAX_SYNC_REQUESTS stays below it, so a flood of
# synchronous generations always leaves threads for /health, /status and /configure.
threads = _settings.gunicorn_threads
# A gthread worker heartbeats from its main loop, so long batch requests are not "silent".
timeout = 60
graceful_timeout = int(_env.get("GUNICORN_GRACEFUL_TIMEOUT", "60"))
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = _env.get("LOG_LEVEL", "info").lower()
# gunicorn's control socket sits at one path per user: several instances on one machine
# (tests, benchmarks, replicas) would share it. The service does not use it.
control_socket_disable = True
# One format (LOG_FORMAT: text or json) for gunicorn's lines and the app's, each with the
# fields of its request (request_id, job_id, item, prediction_id): see gateway/logs.py.
logconfig_dict = gunicorn_logconfig(_settings.log_level, _settings.log_format)
_metrics_dir: dict[str, tuple[str, bool]] = {}


def on_starting(server):
    if server.cfg.workers != 1 and not _settings.redis_url:
        server.log.error(
            "Refusing to start with %d workers: without REDIS_URL the rate and concurrency "
            "limits are per process, so more workers would multiply them. Run one worker (use "
            "GUNICORN_THREADS for more request threads), or set REDIS_URL to share the limits.",
            server.cfg.workers)
        sys.exit(3)
    # Prometheus multiprocess mode: every worker writes its metrics there and a scrape sums them
    # (a fresh, empty directory per start; see gateway/metrics.py).
    _metrics_dir["path"] = prepare_multiprocess_dir()


def post_worker_init(worker):
    start(worker.wsgi)


def worker_exit(server, worker):
    if getattr(worker, "wsgi", None) is not None:
        stop(worker.wsgi)


def child_exit(server, worker):
    mark_process_dead(worker.pid)  # its live gauges go; its counters stay counted


def on_exit(server):
    path, created = _metrics_dir.get("path", ("", False))
    if created:
        shutil.rmtree(path, ignore_errors=True)
