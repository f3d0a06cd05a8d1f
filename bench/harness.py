"""Processes for the benchmarks: the emulator and the service (gunicorn, as in production),
each its own process on a free loopback port, plus readings of the service's resources."""
from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bench-admin-key"
SERVER_TOKEN = "r8_benchserver000000000001"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def _wait(url: str, proc: subprocess.Popen, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


class Proc:
    def __init__(self, args: list[str], env: dict, health: str, log: Path) -> None:
        self._log = open(log, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        _wait(health, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def start_emulator(workdir: Path, **faults) -> tuple[Proc, str]:
    port = free_port()
    args = [sys.executable, "-m", "replicate_emulator", "--port", str(port), "--seed", "1"]
    for name, value in faults.items():
        args += ["--set", f"{name}={value}"]
    url = f"http://127.0.0.1:{port}"
    return Proc(args, {}, f"{url}/_emulator/health", workdir / "emulator.log"), url


def start_service(workdir: Path, upstream: str, **settings) -> tuple[Proc, str]:
    port = free_port()
    env = {"FLASK_HOST": "127.0.0.1", "FLASK_PORT": str(port), "REPLICATE_BASE_URL": upstream,
           "REPLICATE_API_TOKEN": SERVER_TOKEN, "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN_KEY,
           "OUTPUT_DIR": str(workdir / "output"), "LOG_LEVEL": "warning",
           **{k: str(v) for k, v in settings.items()}}
    url = f"http://127.0.0.1:{port}"
    proc = Proc([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], env,
                f"{url}/health", workdir / "service.log")
    return proc, url


def worker_pid(master: int) -> int:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return int(out.split()[0])


class Usage:
    """CPU seconds, peak RSS and threads of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_threads = 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def sample(self) -> None:
        self.peak_threads = max(self.peak_threads, self.status("Threads"))

    def peak_rss_mb(self) -> float:
        return self.status("VmHWM") / 1024


class RedisProc:
    """A redis-server on a free loopback port, without persistence, in `workdir` (the shared
    limits' store of the multi-instance workload)."""

    def __init__(self, workdir: Path) -> None:
        import redis  # only this workload needs it

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self._log = open(workdir / "redis.log", "w")
        self.proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        end = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("redis-server did not answer") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


def worker_pids(master: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


class UsageGroup:
    """Several processes read as one: CPU summed, peak RSS and threads of the largest."""

    def __init__(self, pids: list[int]) -> None:
        self.members = [Usage(pid) for pid in pids]

    @property
    def peak_threads(self) -> int:
        return max(member.peak_threads for member in self.members)

    def cpu_seconds(self) -> float:
        return sum(member.cpu_seconds() for member in self.members)

    def sample(self) -> None:
        for member in self.members:
            member.sample()

    def peak_rss_mb(self) -> float:
        return max(member.peak_rss_mb() for member in self.members)
