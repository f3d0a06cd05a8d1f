"""Readiness: `GET /ready` answers 503 with the reason while the service cannot do its work
(output folder or journal not writable, a configured Redis down, start-up recovery still
running) and 200 when all is well; `/health` (liveness) stays 200 meanwhile."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from werkzeug.serving import make_server

from gateway.app import create_app, start, stop

from helpers import ADMIN_KEY, ROOT, SERVER_TOKEN, wait_for


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` refuses new files for the body of the `with`. Permission bits do not bind
    root (tests run as root in CI), so there the folder is made immutable (chattr +i)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.fail("cannot make a folder read-only as root here: chattr +i is missing or unsupported "
                    "by this file system (install e2fsprogs; /tmp must not be tmpfs)", pytrace=False)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_ready_when_all_is_well(service):
    r = service.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "checks": {"recovery": "ok", "output_dir": "ok", "journal": "ok"}}


def test_not_ready_while_the_output_folder_is_read_only(make_service, emu, tmp_path):
    service = make_service()
    folder = tmp_path / "output"
    with read_only(folder):
        r = service.get("/ready")
        assert service.get("/health").status_code == 200  # alive, just not ready
    assert r.status_code == 503 and r.headers["Retry-After"]
    body = r.json()
    assert body["status"] == "not ready" and body["checks"]["output_dir"].startswith("OUTPUT_DIR is not writable")
    assert "OUTPUT_DIR is not writable" in body["error"] and body["request_id"] == r.headers["X-Request-ID"]
    assert str(folder) not in r.text  # reasons name the setting, not the path
    assert service.get("/ready").status_code == 200  # writable again: ready again


def test_not_ready_while_the_journal_is_read_only(make_service, emu, tmp_path):
    journal = tmp_path / "journal"
    journal.mkdir()
    service = make_service(JOBS_DB=str(journal / "jobs.sqlite3"))
    with read_only(journal):
        r = service.get("/ready")
    assert r.status_code == 503 and r.json()["checks"]["journal"].startswith("JOBS_DB is not writable")
    assert r.json()["checks"]["output_dir"] == "ok"
    assert service.get("/ready").status_code == 200


def test_not_ready_while_the_configured_redis_is_down(make_service, emu, redis_server, redis_url):
    service = make_service(REDIS_URL=redis_url)
    assert service.get("/ready").json()["checks"]["redis"] == "ok"
    redis_server.stop()
    try:
        r = service.get("/ready")
    finally:
        redis_server.start()
    assert r.status_code == 503 and r.json()["checks"]["redis"] == "Redis (REDIS_URL) does not answer"
    assert str(redis_server.port) not in r.text
    wait_for(lambda: service.get("/ready").status_code == 200, message="ready again once Redis is back")


def test_not_ready_until_start_up_recovery_is_over(emulator_server, emu, tmp_path):
    """Served before `start(app)` has resumed the journal's jobs (as a server that accepted
    connections early would): 503 until it is done."""
    app = create_app({"REPLICATE_BASE_URL": emulator_server.url, "OUTPUT_DIR": str(tmp_path / "out"),
                      "REPLICATE_API_TOKEN": SERVER_TOKEN, "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN_KEY})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/ready"
    try:
        early = requests.get(url, timeout=10)
        start(app)
        late = requests.get(url, timeout=10)
    finally:
        server.shutdown()
        thread.join(10)
        stop(app)
    assert early.status_code == 503 and early.json()["checks"]["recovery"] == "start-up recovery is still running"
    assert late.status_code == 200


def test_the_container_health_checks_ask_for_readiness():
    """Docker's HEALTHCHECK and compose's healthcheck mean "ready for traffic": /ready."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    check = " ".join(compose["services"]["replicate-generation"]["healthcheck"]["test"])
    assert "/ready" in check and "/health" not in check
    healthcheck = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if "urlopen" in line]
    assert healthcheck and all("/ready" in line for line in healthcheck)
