"""Production packaging and start-up: gunicorn, python app.py, Docker files, settings, and
house rules (logging not print, one model table, pinned dependencies, port 5003)."""
from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import dockerfile
import pytest
import requests
import yaml

import model_functions
from gateway.config import ConfigError, Settings
from gateway.engine import models as registry
from model_functions import MODELS, ModelSpec, Param

from helpers import ADMIN, GUNICORN, ROOT, SERVER_TOKEN, free_port, service_env, start, stop, wait_healthy

SHIPPED = sorted([*ROOT.glob("*.py"), *(ROOT / "gateway").rglob("*.py")])


def test_gunicorn_reads_the_environment_and_serves(emulator_server, emu, tmp_path):
    """The environment's limits apply under gunicorn, not only under __main__."""
    port = free_port()
    proc = start([sys.executable, *GUNICORN],
                 service_env(emulator_server, tmp_path, port, REPLICATE_CONCURRENT_LIMIT="7",
                             REPLICATE_REQUESTS_PER_MINUTE="70"), tmp_path)
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert health["concurrency_status"]["concurrent_limit"] == 7
        assert health["concurrency_status"]["requests_per_minute"] == 70
        r = requests.post(f"http://127.0.0.1:{port}/generate", json={"model_name": "flux-dev", "prompt": "g"},
                          headers=ADMIN, timeout=30)
        assert r.status_code == 200 and Path(r.json()["files"][0]).is_file()
    finally:
        stop(proc)


def test_gunicorn_refuses_more_than_one_worker(emulator_server, tmp_path):
    port = free_port()
    proc = start([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "-w", "3", "app:app"],
                 service_env(emulator_server, tmp_path, port), tmp_path)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "Refusing to start with 3 workers" in out


def test_python_app_py_uses_the_same_settings(emulator_server, emu, tmp_path):
    port = free_port()
    proc = start([sys.executable, str(ROOT / "app.py")],
                 service_env(emulator_server, tmp_path, port, REPLICATE_CONCURRENT_LIMIT="9"), tmp_path)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", proc)["concurrency_status"]["concurrent_limit"] == 9
    finally:
        stop(proc)


@pytest.mark.parametrize("command", [["app.py"], ["-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]])
def test_a_bad_setting_stops_start_up_naming_the_variable(emulator_server, tmp_path, command):
    command = [sys.executable] + [str(ROOT / c) if c.endswith(".py") else c for c in command]
    env = service_env(emulator_server, tmp_path, free_port(), REPLICATE_CONCURRENT_LIMIT="sixty")
    proc = start(command, env, tmp_path)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "REPLICATE_CONCURRENT_LIMIT='sixty'" in out
    assert SERVER_TOKEN not in out


@pytest.mark.parametrize("variable,value", [
    ("FLASK_PORT", "0"), ("FLASK_PORT", "http"), ("GENERATION_TIMEOUT", "-1"), ("REPLICATE_BASE_URL", "ftp://x"),
    ("REPLICATE_REQUESTS_PER_MINUTE", "0"), ("MAX_BATCH_SIZE", "1.5"),
])
def test_settings_validation(variable, value):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_mapping({variable: value})


def test_secret_settings_are_never_echoed():
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"REPLICATE_API_TOKEN": "x", "FLASK_PORT": "99999"})
    assert "FLASK_PORT" in str(info.value)
    assert "secret" not in repr(Settings.from_mapping({"REPLICATE_API_TOKEN": "secret"}))


def test_defaults_match_the_spec():
    """Port 5003 in code, config and Docker alike (the code once said 5000)."""
    settings = Settings.from_mapping({})
    assert (settings.port, settings.host, settings.concurrent_limit, settings.requests_per_minute) == (
        5003, "0.0.0.0", 60, 600)
    assert (settings.output_dir, settings.generation_timeout, settings.batch_timeout) == (
        os.path.abspath("output"), 300, 600)
    assert settings.base_url == "https://api.replicate.com" and settings.max_batch_size == 1000


def _dockerfile() -> dict[str, list]:
    commands: dict[str, list] = {}
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        commands.setdefault(command.cmd.upper(), []).append(command)
    return commands


def test_dockerfile():
    """Slim base, pinned requirements, non-root, gunicorn, health check, volume."""
    commands = _dockerfile()
    assert commands["FROM"][0].value[0] == "python:3.11-slim"
    assert any("-r requirements.txt" in c.value[0] for c in commands["RUN"])
    user = commands["USER"][-1].value[0]
    assert user not in ("root", "0")
    assert any("useradd" in c.value[0] and user in c.value[0] for c in commands["RUN"])
    assert commands["CMD"][-1].value[:3] == ("gunicorn", "-c", "gunicorn.conf.py")
    assert "/ready" in commands["HEALTHCHECK"][0].value[1]  # healthy means ready for traffic
    assert commands["VOLUME"][0].value == ("/app/output",) and commands["EXPOSE"][0].value == ("5003",)
    copied = {name.rstrip("/") for c in commands["COPY"] for name in c.value[:-1]}
    shipped = {p.relative_to(ROOT).parts[0] for p in SHIPPED if p.name != "serve.py"}
    assert shipped <= copied, shipped - copied  # the package and every root module are in the image


def test_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["replicate-generation"]
    assert service["ports"] == ["5003:5003"] and "./output:/app/output" in service["volumes"]
    assert service["restart"] == "unless-stopped" and service["build"] == "."
    names = {entry.split("=")[0] for entry in service["environment"]}
    assert {"REPLICATE_API_TOKEN", "CONCURRENT_DOCKER_ADMIN_API_KEY", "FLASK_PORT"} <= names
    assert "r8_" not in (ROOT / "docker-compose.yml").read_text()
    redis = compose["services"]["redis"]  # the shared limits' store, used by the gateway
    assert redis["image"].startswith("redis:") and "redis-cli" in redis["healthcheck"]["test"]
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in redis["volumes"])
    assert "REDIS_URL=${REDIS_URL:-redis://redis:6379/0}" in service["environment"]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_every_dependency_is_pinned(name):
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("-r ")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][\w.]*", line) for line in lines), lines


def test_env_example_lists_every_documented_variable():
    text = (ROOT / ".env.example").read_text()
    for variable in ("REPLICATE_API_TOKEN", "CONCURRENT_DOCKER_ADMIN_API_KEY", "FLASK_PORT", "FLASK_HOST",
                     "REPLICATE_CONCURRENT_LIMIT", "REPLICATE_REQUESTS_PER_MINUTE", "REPLICATE_BASE_URL",
                     "OUTPUT_DIR", "GENERATION_TIMEOUT", "BATCH_TIMEOUT"):
        assert f"{variable}=" in text


@pytest.mark.parametrize("path", SHIPPED + sorted((ROOT / "replicate_emulator").glob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_print_in_shipped_code(path):
    """Logging, not print."""
    tree = ast.parse(path.read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print"]


def test_adding_a_model_is_adding_an_entry(service, emu, monkeypatch):
    """No per-model functions; a new table entry is a working model."""
    spec = ModelSpec("flux-dev-small", "black-forest-labs/flux-dev", "Small flux", "list",
                     {"megapixels": Param("string", "0.25", choices=("0.25",))})
    monkeypatch.setitem(model_functions.MODELS, spec.id, spec)
    monkeypatch.setitem(model_functions.BY_NAME, spec.id, spec)
    r = service.post("/generate", {"model_name": "flux-dev-small", "prompt": "tiny", "megapixels": "0.25"}, ADMIN)
    assert r.status_code == 200 and r.json()["files"][0].endswith("flux_dev_small.webp")
    assert emu.predictions()[0]["model"] == "black-forest-labs/flux-dev"
    functions = [n.name for n in ast.walk(ast.parse(Path(registry.__file__).read_text()))
                 if isinstance(n, ast.FunctionDef)]
    assert not [f for f in functions if any(m.replace("-", "_") in f for m in MODELS)]
