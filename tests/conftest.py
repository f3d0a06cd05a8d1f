"""Fixtures: the emulator (one per session, reset for every test), the service started for
real on a free loopback port, and a real redis-server. Shared helpers are in helpers.py."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from gateway.app import create_app, start, stop
from replicate_emulator import EmulatorServer
from replicate_emulator.control_client import EmulatorControl

from helpers import ADMIN_KEY, SERVER_TOKEN
from postgres_fixture import own_postgres_server, postgres_server, postgres_url  # noqa: F401  (fixtures)
from redis_fixture import redis_server, redis_url  # noqa: F401  (fixtures)

logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    with EmulatorServer() as server:
        yield server


@pytest.fixture
def emu(emulator_server: EmulatorServer) -> EmulatorControl:
    control = EmulatorControl(emulator_server.url)
    control.reset()
    control.set_faults(latency_s=0.05)
    return control


class Service:
    """The service on a real HTTP server thread, started and stopped as gunicorn does."""

    def __init__(self, app) -> None:
        self.app = app
        start(app)
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self.http = requests.Session()

    def post(self, path: str, body: Any = None, headers: dict | None = None, **kwargs) -> requests.Response:
        return self.http.post(self.url + path, json=body, headers=headers, timeout=120, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.http.get(self.url + path, timeout=30, **kwargs)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)
        stop(self.app)


@pytest.fixture
def make_service(emulator_server: EmulatorServer, tmp_path):
    started: list[Service] = []

    def make(**overrides: Any) -> Service:
        config = {"REPLICATE_BASE_URL": emulator_server.url, "OUTPUT_DIR": str(tmp_path / "output"),
                  "REPLICATE_API_TOKEN": SERVER_TOKEN, "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN_KEY}
        config.update({k: str(v) for k, v in overrides.items() if v is not None})
        for key in [k for k, v in overrides.items() if v is None]:
            config.pop(key, None)
        service = Service(create_app(config))
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture
def service(make_service, emu) -> Service:
    return make_service()
