"""Auth, hostile input and secrets."""
from __future__ import annotations

import logging

import pytest

from gateway.api import auth
from gateway.engine.upstream import SessionCache
from gateway.redaction import MASK, Redactor
from gateway.state import gateway_state

from helpers import ADMIN, ADMIN_KEY, SERVER_TOKEN, USER_TOKEN

BODY = {"model_name": "flux-dev", "prompt": "x"}


@pytest.mark.parametrize("configured", [None, ""])
def test_unset_admin_key_disables_admin_access(make_service, emu, configured):
    """A missing header and a missing key must never match (`None == None` once made everyone admin)."""
    service = make_service(CONCURRENT_DOCKER_ADMIN_API_KEY=configured)
    assert service.post("/generate", BODY).status_code == 401
    assert service.post("/generate", BODY, {"X-Admin-API-Key": ""}).status_code == 401
    assert service.post("/generate", BODY, {"X-Admin-API-Key": "None"}).status_code == 401
    assert service.post("/configure", {"concurrent_limit": 1}).status_code == 401
    assert service.post("/configure", {"concurrent_limit": 1}, {"X-Admin-API-Key": ""}).status_code == 401
    assert service.get("/health").json()["concurrency_status"]["concurrent_limit"] == 60
    assert emu.stats()["counters"].get("create_attempts", 0) == 0


def test_keys_are_compared_in_constant_time(service, monkeypatch):
    """The comparison goes through hmac.compare_digest, not `==`."""
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert service.post("/configure", {"concurrent_limit": 7}, ADMIN).status_code == 200
    assert service.post("/configure", {"concurrent_limit": 7}, {"X-Admin-API-Key": "nope"}).status_code == 401
    assert len(calls) == 2


def test_admin_without_server_token_is_refused(make_service, emu):
    service = make_service(REPLICATE_API_TOKEN=None)
    r = service.post("/generate", BODY, ADMIN)
    assert r.status_code == 503 and "REPLICATE_API_TOKEN" in r.json()["error"]
    assert service.post("/generate", BODY, {"X-Replicate-API-Key": USER_TOKEN}).status_code == 200


def test_each_request_runs_on_its_own_token(service, emu):
    """A user's request, then an admin's, then another user's: no caching of the
    first caller's client, no os.environ."""
    service.post("/generate", {**BODY, "prompt": "u1"}, {"X-Replicate-API-Key": USER_TOKEN})
    service.post("/generate", {**BODY, "prompt": "admin"}, ADMIN)
    service.post("/generate", {**BODY, "prompt": "u2"}, {"X-Replicate-API-Key": "r8_third0000000000000004"})
    assert [(p["input"]["prompt"], p["token"]) for p in emu.predictions()] == [
        ("u1", USER_TOKEN), ("admin", SERVER_TOKEN), ("u2", "r8_third0000000000000004")]


def test_session_cache_keeps_one_client_per_token():
    cache = SessionCache("http://127.0.0.1:9", keepalive=4, pool_timeout=1)
    a, b = cache.get("token-a"), cache.get("token-b")
    assert a is cache.get("token-a") and a is not b
    assert "token-a" not in repr(cache._sessions)   # keyed by a hash
    cache.close()


def test_upstream_401_and_402_reach_the_caller(service, emu):
    emu.set_token("r8_revoked00000000000000005", "invalid")
    emu.set_token("r8_broke0000000000000000006", "no_credit")
    revoked = service.post("/generate", BODY, {"X-Replicate-API-Key": "r8_revoked00000000000000005"})
    assert revoked.status_code == 401 and "valid authentication token" in revoked.json()["error"]
    broke = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": ["a", "b"]},
                         {"X-Replicate-API-Key": "r8_broke0000000000000000006"})
    assert broke.status_code == 402 and "insufficient credit" in broke.json()["error"]
    assert emu.stats()["by_token"]["r8_broke0000000000000000006"]["create_attempts"] == 2  # no retries


HOSTILE_NAMES = ["../evil", "../../etc/cron.d/x", "/etc/evil", "a/b", "a\\b", "..", ".hidden", "con", "NUL.txt",
                 "lpt1", "a\x00b", "a\nb", "x\u202egpj.exe", "ａｂｃ", "zero\u200bwidth", "x" * 129, " lead",
                 "trail ", "", "a..b", "\u2024\u2024"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_custom_filenames_are_refused(service, emu, tmp_path, name):
    """A name is never a path."""
    r = service.post("/generate", {**BODY, "custom_filename": name}, ADMIN)
    assert r.status_code == 400 and "custom_filename" in r.json()["error"]
    batch = service.post("/generate-batch", {"model_name": "flux-dev", "prompts": ["a", "b"],
                                             "custom_filenames": ["fine", name]}, ADMIN)
    assert batch.status_code == 400 and "custom_filenames[1]" in batch.json()["error"]
    assert emu.stats()["counters"].get("create_attempts", 0) == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".jobs.sqlite3")] == []


@pytest.mark.parametrize("value", ["/proc/self/environ", "file:///etc/passwd", "~/secret.png",
                                   "gopher://x/y", "javascript:alert(1)", "http://user:pw@host/x.png"])
def test_input_image_is_never_read_from_the_server(service, emu, value):
    """Only http(s) URLs and data URIs; nothing on the server is opened or uploaded."""
    r = service.post("/generate", {"model_name": "flux-kontext-max", "prompt": "x", "input_image": value}, ADMIN)
    assert r.status_code == 400 and r.json()["field"] == "input_image"
    assert emu.stats()["counters"] == {}


def test_unexpected_errors_leak_nothing(service, monkeypatch, caplog):
    """A crash answers a fixed message; the log has the traceback, redacted."""
    def explode(*args, **kwargs):
        raise RuntimeError(f"internal detail with {SERVER_TOKEN} and {ADMIN_KEY}")
    monkeypatch.setattr(gateway_state(service.app).jobs, "run_sync", explode)
    with caplog.at_level(logging.ERROR):
        r = service.post("/generate", BODY, ADMIN)
    assert r.status_code == 500
    assert r.json() == {"error": "Internal server error", "request_id": r.headers["X-Request-ID"]}
    assert "internal detail" in caplog.text
    assert SERVER_TOKEN not in caplog.text and ADMIN_KEY not in caplog.text


def test_secrets_never_reach_logs_or_responses(service, emu, caplog):
    emu.set_token("r8_revoked00000000000000005", "invalid")
    emu.set_faults(create_5xx_rate=0.3)
    responses = []
    with caplog.at_level(logging.DEBUG):
        responses.append(service.post("/generate-batch", {"model_name": "flux-dev", "prompts": [
            "ok", "bad [[fail]]", "gone [[404]]", "cut [[truncate]]", "ok 2"]}, ADMIN))
        responses.append(service.post("/generate", BODY, {"X-Replicate-API-Key": USER_TOKEN}))
        responses.append(service.post("/generate", BODY, {"X-Replicate-API-Key": "r8_revoked00000000000000005"}))
        responses.append(service.post("/generate", BODY, {"X-Admin-API-Key": "wrong-key"}))
        responses += [service.get(p) for p in ("/status", "/health", "/models")]
        logging.getLogger("anything").info("a stray %s and %s", SERVER_TOKEN, "r8_neverregistered12345")
    text = caplog.text + "".join(r.text for r in responses)
    for secret in (SERVER_TOKEN, ADMIN_KEY, USER_TOKEN, "r8_revoked00000000000000005", "r8_neverregistered12345"):
        assert secret not in text
    assert MASK in caplog.text


def test_redactor_masks_registered_and_token_shaped_secrets():
    redactor = Redactor()
    redactor.add("plain-secret-value")
    assert redactor.redact("x plain-secret-value r8_abcdefghijkl y") == f"x {MASK} {MASK} y"
