"""State that grows with what callers send must stay bounded: upstream sessions (clients,
pools, sockets) per token, and the log redactor's set of tokens. Made-up tokens need no
credentials, so an unbounded cache is a memory and file-descriptor exhaustion for anyone."""
from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gateway.engine.upstream import SessionCache, UpstreamSession
from gateway.redaction import MASK, MIN_TRACKED, Redactor
from replicate_emulator import Emulator, EmulatorServer

from helpers import GUNICORN, SERVER_TOKEN, children, free_port, service_env, start, wait_for, wait_healthy

URL = "http://127.0.0.1:9"  # nothing is sent in the unit tests: clients are built, not used
BODY = {"model_name": "flux-dev", "prompt": "x"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache(**kwargs) -> SessionCache:
    return SessionCache(URL, keepalive=4, pool_timeout=1, **kwargs)


def closed(session: UpstreamSession) -> bool:
    try:
        _ = session.client   # an open session builds or returns a client; a closed one refuses
    except RuntimeError:
        return True
    return False


# -- the session cache -----------------------------------------------------------------------
def test_the_cache_never_holds_more_than_its_cap_and_closes_what_it_evicts():
    sessions = cache(capacity=3)
    seen = []
    for i in range(20):
        with sessions.using(f"token-{i:02d}-made-up") as session:
            _ = session.client   # build its client, as a request would
            seen.append(session)
        assert len(sessions) <= 3
    assert [closed(s) for s in seen] == [True] * 17 + [False] * 3
    sessions.close()
    assert all(closed(s) for s in seen)


def test_the_least_recently_used_session_is_the_one_evicted():
    sessions = cache(capacity=2)
    a, b = sessions.get("token-a"), sessions.get("token-b")
    assert sessions.get("token-a") is a   # a is now the most recently used
    sessions.get("token-c")
    assert closed(b) and not closed(a)
    sessions.close()


def test_idle_sessions_expire():
    clock = FakeClock()
    sessions = cache(idle_seconds=600, clock=clock)
    a = sessions.get("token-a")
    clock.now += 599
    b = sessions.get("token-b")
    assert not closed(a) and len(sessions) == 2
    clock.now += 2   # a has been idle 601 s, b 2 s
    sessions.get("token-c")
    assert closed(a) and not closed(b) and len(sessions) == 2
    assert sessions.get("token-a") is not a   # built again when asked for again
    sessions.close()


def test_a_held_session_does_not_expire():
    clock = FakeClock()
    sessions = cache(idle_seconds=10, clock=clock)
    held = sessions.acquire("token-a")
    clock.now += 1000
    sessions.get("token-b")
    assert not closed(held)
    sessions.release(held)
    clock.now += 11
    sessions.get("token-c")
    assert closed(held)
    sessions.close()


def test_an_evicted_session_in_use_is_closed_only_on_its_last_release():
    sessions = cache(capacity=1)
    running = sessions.acquire("token-running", uses=2)   # e.g. a batch of two items
    http = running.client._client
    for i in range(5):
        sessions.get(f"token-other-{i}")   # evicts it from the cache
    assert len(sessions) == 1 and not http.is_closed and not closed(running)
    sessions.release(running)
    assert not http.is_closed   # one item still runs on it
    sessions.release(running)
    assert http.is_closed and closed(running)


def test_an_evicted_session_still_in_use_is_reused_not_duplicated():
    sessions = cache(capacity=1)
    running = sessions.acquire("token-running")
    sessions.get("token-other")
    again = sessions.acquire("token-running")
    assert again is running
    sessions.release(running)
    sessions.release(again)
    assert not closed(running)   # back in the cache
    sessions.close()


def test_a_lane_job_releases_its_session_however_it_ends():
    sessions = cache(capacity=1)
    session = sessions.acquire("token-a", uses=2)
    sessions.get("token-b")   # evicted while held

    def crash(release_slot):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        sessions.releasing(session, crash)(lambda: None)
    assert not closed(session)
    sessions.releasing(session, lambda release_slot: None)(lambda: None)
    assert closed(session)


def test_a_session_builds_its_clients_on_demand():
    session = UpstreamSession("token-one-request", URL, keepalive=1000, pool_timeout=1)
    assert session.built_shards == 0   # 63 possible shards (of SHARD_SIZE 16), none built yet
    _ = session.client
    assert session.built_shards == 1
    session.close()


# -- the redactor ----------------------------------------------------------------------------
LINE = '127.0.0.1 - - [01/Jan/2026:10:00:00 +0000] "POST /generate HTTP/1.1" 401 93 "-" "curl/8.5"'


def test_the_redactor_never_masks_short_or_common_words():
    redactor = Redactor()
    for word in ("POST", "2026", "generate", "HTTP/1.1", "x" * (MIN_TRACKED - 1)):
        redactor.track(word)
    assert redactor.redact(LINE) == LINE
    assert redactor.redact("x" * (MIN_TRACKED - 1)) == "x" * (MIN_TRACKED - 1)
    assert redactor.tracked == 0


def test_the_redactor_masks_configured_secrets_tracked_tokens_and_the_token_shape():
    redactor = Redactor()
    redactor.add("configured-admin-key")
    redactor.track("a-caller-token-not-r8-shaped")
    text = "configured-admin-key a-caller-token-not-r8-shaped r8_abcdefgh1234 POST 2026"
    assert redactor.redact(text) == f"{MASK} {MASK} {MASK} POST 2026"


def test_an_untracked_token_is_forgotten_with_its_last_session():
    redactor = Redactor()
    token = "a-caller-token-not-r8-shaped"
    redactor.track(token)
    redactor.track(token)   # two sessions of it (one evicted but still running)
    redactor.untrack(token)
    assert redactor.redact(token) == MASK
    redactor.untrack(token)
    assert redactor.redact(token) == token and redactor.tracked == 0


def test_the_redactor_tracks_only_the_tokens_of_cached_sessions():
    redactor = Redactor()
    sessions = cache(capacity=4, tracker=redactor)
    tokens = [f"made-up-caller-token-{i:04d}" for i in range(100)]
    for token in tokens:
        sessions.get(token)
        assert redactor.tracked <= 4
    assert redactor.redact(tokens[0]) == tokens[0]   # evicted long ago: no longer tracked
    assert redactor.redact(tokens[-1]) == MASK       # cached: tracked
    sessions.close()
    assert redactor.tracked == 0


def test_a_caller_cannot_erase_words_from_the_logs(make_service, emu, caplog):
    """Tokens such as `POST` used to be masked in every later line, for everyone."""
    service = make_service()
    for token in ("POST", "2026", "generate"):
        service.post("/generate", BODY, {"X-Replicate-API-Key": token})
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("%s", LINE)
    assert LINE in caplog.text


def test_the_service_masks_the_tokens_of_its_sessions(make_service, emu, caplog):
    """A caller token not shaped like `r8_...` is masked while its session is cached."""
    service = make_service()
    token = "caller-token-of-another-shape-0001"
    service.post("/generate", BODY, {"X-Replicate-API-Key": token})
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("carrying %s", token)
    assert token not in caplog.text and MASK in caplog.text


# -- the real process ------------------------------------------------------------------------
def _worker(master: int, seconds: float = 20) -> int:
    return wait_for(lambda: children(master), seconds, step=0.1, message="gunicorn started no worker")[0]


def _footprint(pid: int) -> tuple[int, int]:
    """(resident memory in kB, open file descriptors) of a process."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _send(base: str, tokens: list[str], pool: ThreadPoolExecutor) -> set[int]:
    def one(token: str) -> int:
        return requests.post(f"{base}/generate", json=BODY, headers={"X-Replicate-API-Key": token},
                             timeout=30).status_code
    return set(pool.map(one, tokens))


def test_made_up_tokens_do_not_grow_the_worker(tmp_path):
    """1000 requests with 1000 made-up tokens grow the gunicorn worker by under 20 MB and 20
    descriptors (each used to keep a client, a TLS context, a pool and a socket for good:
    ~0.85 MB and a descriptor per token)."""
    upstream = Emulator(accept_any_token=False)   # any token not configured is answered 401
    upstream.token_states[SERVER_TOKEN] = "valid"
    with EmulatorServer(emulator=upstream) as emulator:
        port = free_port()
        proc = start([sys.executable, *GUNICORN],
                     service_env(emulator, tmp_path, port, REPLICATE_PREFER_WAIT_SECONDS="0"), tmp_path)
        log: list[str] = []
        drain = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)  # access log
        drain.start()
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, proc)
            worker = _worker(proc.pid)
            tokens = ["r8_" + secrets.token_hex(20) for _ in range(1150)]   # made up: answered 401
            with ThreadPoolExecutor(8) as pool:
                assert _send(base, tokens[:150], pool) == {401}   # warm-up: threads, caches, a full LRU
                before = _footprint(worker)
                assert _send(base, tokens[150:], pool) == {401}
                after = _footprint(worker)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            drain.join(10)
    grown_kb, grown_fds = after[0] - before[0], after[1] - before[1]
    assert grown_kb < 20 * 1024, f"worker grew {grown_kb} kB over 1000 made-up tokens ({before} -> {after})"
    assert grown_fds < 20, f"worker opened {grown_fds} more descriptors ({before} -> {after})"
    text = "".join(log)
    assert "POST /generate" in text and not any(token in text for token in tokens)
