"""Request ids: taken from a sane X-Request-ID (else generated), answered in the header and
in every error body, and carried by every log line of the request and of its items, in both
log formats (text and LOG_FORMAT=json)."""
from __future__ import annotations

import json
import logging
import re
import socket
import sys

import pytest
import requests

from helpers import ADMIN, GUNICORN, SERVER_TOKEN, free_port, service_env, start, stop, wait_healthy

GENERATED = re.compile(r"[0-9a-f]{32}")
# A prompt whose file download is cut short on every attempt: the item's worker thread logs
# each failed attempt, the item fails, and /generate answers an error.
TRUNCATED = {"model_name": "flux-dev", "prompt": "a cut file [[truncate]]"}


def test_a_sane_id_is_answered_in_the_header_and_every_error_body(service):
    headers = {**ADMIN, "X-Request-ID": "abc-123"}
    assert service.get("/health", headers=headers).headers["X-Request-ID"] == "abc-123"
    refused = service.post("/generate", {"model_name": "no-such-model", "prompt": "x"}, headers)
    missing = service.get("/no/such/page", headers={"X-Request-ID": "abc-123"})
    unauthorized = service.post("/generate", {"model_name": "flux-dev", "prompt": "x"}, {"X-Request-ID": "abc-123"})
    for answer, status in ((refused, 400), (missing, 404), (unauthorized, 401)):
        assert answer.status_code == status
        assert answer.headers["X-Request-ID"] == "abc-123" and answer.json()["request_id"] == "abc-123"


def test_without_an_id_each_request_gets_a_new_one(service):
    first, second = service.get("/health"), service.get("/nowhere")
    assert GENERATED.fullmatch(first.headers["X-Request-ID"])
    assert GENERATED.fullmatch(second.headers["X-Request-ID"])
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    assert second.json()["request_id"] == second.headers["X-Request-ID"]


HOSTILE = ["x" * 10 * 1024, "a" * 129, "abc 123", "<script>", "a;b", "é".encode().decode("latin-1")]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_a_hostile_id_is_replaced(service, hostile):
    r = service.get("/nowhere", headers={"X-Request-ID": hostile})
    assert GENERATED.fullmatch(r.headers["X-Request-ID"]) and r.json()["request_id"] == r.headers["X-Request-ID"]


def test_an_id_with_a_newline_is_replaced(service):
    """A folded header line (the only way a newline reaches a header value) is not an id."""
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc\r\n injected: yes\r\n"
                     b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    shown = re.search(r"(?im)^X-Request-ID: (.*)$", head).group(1).strip()
    assert GENERATED.fullmatch(shown) and json.loads(body)["request_id"] == shown


def test_the_log_lines_of_a_request_and_of_its_items_carry_its_fields(service, caplog):
    with caplog.at_level(logging.INFO):
        r = service.post("/generate", TRUNCATED, {**ADMIN, "X-Request-ID": "abc-123"})
    assert r.status_code == 500 and r.json()["request_id"] == "abc-123"
    job_id = service.get("/jobs", headers=ADMIN).json()["jobs"][0]["job_id"]
    from_items = [rec for rec in caplog.records if rec.name.startswith("gateway.engine")]
    assert any("download attempt" in rec.getMessage() for rec in from_items)  # logged on the item's thread
    assert from_items and all(rec.threadName != "MainThread" for rec in from_items)
    for record in from_items:
        assert (record.request_id, record.job_id, record.item) == ("abc-123", job_id, 0), record.getMessage()
        assert record.prediction_id and record.prediction_id in service.get(f"/jobs/{job_id}", headers=ADMIN).text


def _request_lines(lines: list[str], marker: str) -> list[str]:
    """Every line from the first to the last one mentioning `marker`: the server is idle but
    for this request, so all of them are its lines."""
    marked = [i for i, line in enumerate(lines) if marker in line]
    assert marked, lines
    return lines[marked[0]:marked[-1] + 1]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_both_log_formats_carry_the_id_on_every_line_of_the_request(emulator_server, emu, tmp_path, log_format):
    port = free_port()
    proc = start([sys.executable, *GUNICORN], service_env(emulator_server, tmp_path, port, LOG_FORMAT=log_format),
                 tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        r = requests.post(f"{url}/generate", json=TRUNCATED, headers={**ADMIN, "X-Request-ID": "abc-123"}, timeout=60)
        assert r.status_code == 500 and r.json()["request_id"] == "abc-123"
    finally:
        out = stop(proc)
    lines = [line for line in out.splitlines() if line.strip()]
    assert SERVER_TOKEN not in out
    ours = _request_lines(lines, "abc-123")
    assert len(ours) >= 4, ours  # three failed download attempts, the item's end, the access line
    if log_format == "json":
        entries = [json.loads(line) for line in lines]  # every line of the process is one JSON object
        # gunicorn's own lines (the arbiter's) and the jobs upkeep thread are no request's lines,
        # and on a loaded machine one of them can fall between this request's lines.
        ours = [e for e in map(json.loads, ours) if e["logger"] not in ("gunicorn.error", "gateway.jobs.upkeep")]
        assert all(e["request_id"] == "abc-123" for e in ours), ours
        items = [e for e in ours if e["logger"].startswith("gateway.engine")]
        assert items and all(e["job_id"] and e["item"] == 0 and e["prediction_id"] for e in items), items
        fields = {"time", "level", "logger", "request_id", "job_id", "item", "prediction_id", "message"}
        assert all(fields <= set(entry) for entry in entries)
    else:
        assert all("request_id=abc-123" in line for line in ours), ours
        items = [line for line in ours if "gateway.engine" in line]
        assert items and all("job_id=job_" in line and "item=0" in line and "prediction_id=" in line
                             for line in items), items
