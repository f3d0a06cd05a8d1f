"""Production server settings: `gunicorn -c gunicorn.conf.py app:app`.

One worker process, many threads. The slot pools and rate windows live in the process's
memory: N worker processes would each enforce the full limit, multiplying the real
concurrency and request rate by N, and `/configure` would change one worker of N. So more
than one worker is refused at start-up until the limits are shared across processes.
Threads are cheap here: a synchronous batch request mostly waits, and generations run on the
service's own thread pool, not on these request threads.

The app's start-up work (resume jobs, ...) runs in the worker once it has loaded the app
(`post_worker_init`), and its stop in `worker_exit`: see gateway/app.py.
"""
import sys

from gateway.app import start, stop
from gateway.config import ConfigError, Settings, read_environment

_env = read_environment()
try:
    _settings = Settings.from_mapping(_env)
except ConfigError as exc:  # the same check the app makes, before any worker starts
    sys.stderr.write(f"{exc}\n")
    sys.exit(2)

bind = f"{_settings.host}:{_settings.port}"
workers = 1
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


def on_starting(server):
    if server.cfg.workers != 1:
        server.log.error(
            "Refusing to start with %d workers: rate and concurrency limits are per process, "
            "so more workers would multiply them. Run one worker (use GUNICORN_THREADS for "
            "more request threads).", server.cfg.workers)
        sys.exit(3)


def post_worker_init(worker):
    start(worker.wsgi)


def worker_exit(server, worker):
    if getattr(worker, "wsgi", None) is not None:
        stop(worker.wsgi)
