"""A real `redis-server` for the shared-limits tests, on a free loopback port, with no
persistence, in a temporary directory. Missing binary = a failing fixture naming the install
command (never a silent skip)."""
from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from helpers import end_process, free_port, server_in_temp_dir

INSTALL = "apt-get install -y redis-server"


class RedisServer:
    """One redis-server process; `stop()` then `start()` brings it back on the same port."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(f"redis-server is not installed; install it with: {INSTALL} "
                        f"(or run scripts/system-deps.sh as root)", pytrace=False)
        self.binary, self.directory, self.password = binary, Path(directory), password
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory)]
        if self.password:
            args += ["--requirepass", self.password]
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_until_ready()

    def _wait_until_ready(self, timeout: float = 10.0) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    pytest.fail(f"redis-server did not answer PING on port {self.port}:\n{output}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        end_process(self.process)
        self.process = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with server_in_temp_dir(RedisServer, "redis-test-") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url
