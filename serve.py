"""`make run`: start the service under gunicorn, as in production.

With no REPLICATE_API_TOKEN configured (environment or .env), it runs a DEMO instead: the
bundled Replicate emulator on 127.0.0.1:5099 as the upstream, a demo token, the admin key
`demo-admin-key` unless one is set, a random WEBHOOK_SECRET unless one is set, and the service
on 127.0.0.1 unless FLASK_HOST is set (the admin key is well known). Nothing in demo mode
reaches Replicate or costs money.

Stopping this launcher stops what it started: SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop
gunicorn, then the emulator, and wait for both. On Linux every process here also dies with
its parent (PR_SET_PDEATHSIG), so killing `make`, or the shell that ran it, stops the lot
instead of leaving gunicorn and the emulator holding their ports.
"""
from __future__ import annotations

import base64
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from gateway.config import read_environment

log = logging.getLogger("serve")
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEMO_BANNER = """
==========================================================================
 DEMO MODE: no REPLICATE_API_TOKEN is configured, so the service runs
 against the bundled Replicate EMULATOR at {emulator}. Images are
 synthetic stand-ins. Set REPLICATE_API_TOKEN (see .env.example) to use
 the real Replicate. Listening on {host}:{port}.
   curl -s localhost:{port}/health
   curl -s -X POST localhost:{port}/generate -H 'X-Admin-API-Key: {admin}' \\
        -H 'Content-Type: application/json' \\
        -d '{{"model_name": "flux-dev", "prompt": "A red sports car"}}'
==========================================================================
"""


class Stop(Exception):
    """A stop signal arrived."""


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _libc()


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent exits (Linux only; elsewhere
    nothing happens). `make` does not always pass a SIGTERM on, and a killed parent passes
    nothing on: without this its children would run on, holding their ports."""
    if LIBC is not None and hasattr(LIBC, "prctl") and sys.platform.startswith("linux"):
        LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _child_setup(parent: int) -> Callable[[], None]:
    """Runs in each child between fork and exec: die with `parent`, even if it is already gone."""
    def setup() -> None:
        die_with_parent()
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)
    return setup


def _on_stop_signal(signum: int, frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


class Children:
    """The processes this launcher started, stopped last-started first."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        process = subprocess.Popen(command, env=env, preexec_fn=_child_setup(os.getpid()))
        self.processes.append(process)
        return process

    def kill(self, *_: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    def stop(self, grace: float) -> None:
        """SIGTERM each, newest first (gunicorn finishes its requests while the emulator still
        answers), and wait up to `grace` seconds for each before SIGKILL. A second stop signal
        meanwhile kills them all at once."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.kill)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(url: str, process: subprocess.Popen, seconds: float = 15.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the emulator exited (status {process.returncode}); is its port taken?")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the emulator did not answer at {url}")


def _demo_environment(env: dict[str, str], children: Children) -> dict[str, str]:
    """Start the emulator; return the service's environment for running against it."""
    port = os.environ.get("EMULATOR_PORT", "5099")
    emulator = children.start([sys.executable, "-m", "replicate_emulator", "--port", port,
                               "--set", "latency=uniform", "--set", "latency_min_s=1",
                               "--set", "latency_max_s=3"])
    base = f"http://127.0.0.1:{port}"
    _wait_until_up(f"{base}/_emulator/health", emulator)
    admin = env.get("CONCURRENT_DOCKER_ADMIN_API_KEY") or "demo-admin-key"
    host = env.get("FLASK_HOST", "").strip() or "127.0.0.1"  # the admin key is public: local only
    # Jobs with a webhook need a secret; a demo one is random and never shown.
    webhook_secret = env.get("WEBHOOK_SECRET") or "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    log.warning(DEMO_BANNER.format(emulator=base, host=host, port=env.get("FLASK_PORT") or "5003", admin=admin))
    return {**os.environ, "REPLICATE_BASE_URL": base, "REPLICATE_API_TOKEN": "r8_demo_token_emulator",
            "CONCURRENT_DOCKER_ADMIN_API_KEY": admin, "FLASK_HOST": host, "WEBHOOK_SECRET": webhook_secret}


def _graceful_timeout(env: dict[str, str]) -> float:
    try:
        return float(env.get("GUNICORN_GRACEFUL_TIMEOUT") or 60)
    except ValueError:  # gunicorn itself refuses it at start-up
        return 60.0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    env = read_environment()
    children = Children()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)
    try:
        demo = not env.get("REPLICATE_API_TOKEN", "").strip()
        service_env = _demo_environment(env, children) if demo else None
        return children.start(GUNICORN, env=service_env).wait()
    except Stop as stop:
        log.info("%s: stopping the service%s", stop, " and the emulator" if len(children.processes) > 1 else "")
        return 0
    except RuntimeError as exc:  # the emulator did not come up
        log.error("%s", exc)
        return 1
    finally:
        children.stop(grace=_graceful_timeout(env) + 5)


if __name__ == "__main__":
    sys.exit(main())
