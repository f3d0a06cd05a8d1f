"""Shared test helpers: constants, polling, and real service processes (gunicorn, python
app.py) on free loopback ports."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import requests

ROOT = Path(__file__).resolve().parent.parent
SERVER_TOKEN = "r8_servertoken000000000001"
ADMIN_KEY = "admin-key-for-tests-0001"
USER_TOKEN = "r8_usertoken00000000000002"
ADMIN = {"X-Admin-API-Key": ADMIN_KEY}
UNFINISHED = ("queued", "running")
T = TypeVar("T")


def wait_for(condition: Callable[[], T], seconds: float = 20.0, step: float = 0.02,
             message: str | Callable[[], str] = "condition not reached") -> T:
    """Poll `condition` until it returns something truthy (returned); AssertionError after `seconds`.
    `message` may be a function, called only on failure, to describe the state at that moment."""
    end = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"{message() if callable(message) else message} within {seconds:g} s")
        time.sleep(step)


def finished_job(get: Callable[[str], requests.Response], job_id: str, headers: dict | None = None,
                 seconds: float = 60.0) -> dict[str, Any]:
    """Poll `GET /jobs/<id>` (through `get(path, headers=...)`) until the job is final."""
    def final() -> dict | None:
        job = get(f"/jobs/{job_id}", headers=headers or ADMIN).json()
        return job if job["status"] not in UNFINISHED else None
    return wait_for(final, seconds, step=0.1, message=f"job {job_id} not finished")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 30) -> dict:
    """`GET /health`'s answer once the process serves it; AssertionError if it exits first."""
    def health() -> dict | None:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stdout.read()}")
        try:
            return requests.get(url + "/health", timeout=1).json()
        except requests.ConnectionError:
            return None
    return wait_for(health, seconds, step=0.1, message="never became healthy")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def end_process(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5) -> None:
    """Signal a server process to stop; kill it if it has not within `grace` seconds."""
    process.send_signal(sig)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class Server(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


S = TypeVar("S", bound=Server)


@contextlib.contextmanager
def server_in_temp_dir(make: Callable[[Path], S], prefix: str) -> Iterator[S]:
    """A test server (redis-server, PostgreSQL) started in a fresh temporary directory,
    stopped and its directory removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        server = make(Path(directory))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def children(pid: int) -> list[int]:
    """The child processes of `pid` (a gunicorn master's workers)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def service_env(emulator_server, tmp_path, port: int, **extra: str) -> dict:
    return {"FLASK_HOST": "127.0.0.1", "FLASK_PORT": str(port), "REPLICATE_BASE_URL": emulator_server.url,
            "OUTPUT_DIR": str(tmp_path / "out"), "REPLICATE_API_TOKEN": SERVER_TOKEN,
            "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN_KEY, **extra}


GUNICORN = ["-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "app:app"]
