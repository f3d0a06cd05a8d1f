"""Talking to Replicate: one `replicate.Client` per token, errors made precise.

The official client drops what a caller needs to react to an error (`Retry-After`, the body's
`retry_after`, `invalid_fields`) and retries GETs on its own schedule. So the client is given
a transport that turns every error response into an `UpstreamError` carrying those fields
before the client sees it; the service then decides about retries itself.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Protocol

import httpcore  # noqa: F401  imported now: httpx imports it on its first transport, a request's (~15 ms)
import httpx
import pydantic
import pydantic.v1
import replicate

from gateway.accounts import account_key
from gateway.engine.references import ModelRef, RunBy, official

FINAL_STATUSES = ("succeeded", "failed", "canceled", "aborted")
UNPARSEABLE = (pydantic.ValidationError, pydantic.v1.ValidationError)


class UpstreamError(Exception):
    """An error answer from the upstream API. `str()` is safe to show a client."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None,
                 invalid_fields: list | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail
        self.retry_after, self.invalid_fields = retry_after, invalid_fields

    @classmethod
    def from_response(cls, response: httpx.Response) -> UpstreamError:
        try:
            body = json.loads(response.content or b"{}")
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        detail = str(body.get("detail") or body.get("title") or f"HTTP {response.status_code}")
        title = body.get("title")
        if title and title not in detail:
            detail = f"{title}: {detail}"
        return cls(response.status_code, detail.strip()[:2000],
                   _retry_after(response.headers.get("Retry-After"), body.get("retry_after")),
                   body.get("invalid_fields") if isinstance(body.get("invalid_fields"), list) else None)


def _retry_after(header: str | None, field: Any) -> float | None:
    for value in (header, field):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            continue
        if 0 <= seconds < 86400:
            return seconds
    return None


class ErrorTransport(httpx.BaseTransport):
    """Raises UpstreamError for any 4xx/5xx answer, so nothing retries behind our back, and
    keeps this thread's last good answer: the client's model cannot parse every status."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner
        self._last = threading.local()

    def last_body(self) -> bytes:
        return getattr(self._last, "body", b"{}")

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if response.status_code < 400:
            self._last.body = response.read()
            return response
        try:
            response.read()
        finally:
            response.close()
        raise UpstreamError.from_response(response)

    def close(self) -> None:
        self._inner.close()


@dataclasses.dataclass
class PredictionState:
    id: str
    status: str
    output: Any = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, prediction: dict[str, Any]) -> PredictionState:
        """From a prediction as the API answers it (a JSON object)."""
        return cls(str(prediction.get("id")), str(prediction.get("status")),
                   prediction.get("output"), prediction.get("error"))


def _created_at(prediction: dict) -> float:
    try:
        return datetime.fromisoformat(str(prediction.get("created_at")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")  # unknown: keep looking


def _state(prediction: Any) -> PredictionState:
    if isinstance(prediction, dict):
        return PredictionState.from_json(prediction)
    return PredictionState(prediction.id, prediction.status, prediction.output, prediction.error)


# Connections per HTTP pool. httpcore (1.0) looks over its whole pool on every request and
# every answer, and for each idle connection counts the pool again: O(n^2) in the pool's
# size. At 64 that scan was 40% of a turnover's CPU in workload 1b; at 16, a few percent.
SHARD_SIZE = 16


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every client of the process: building one loads the whole CA
    bundle (about a megabyte and milliseconds), which a client per token must not repeat."""
    return httpx.create_ssl_context()


class UpstreamSession:
    """One account's client(s). Thread-safe: httpx clients are.

    A prediction holds a connection for as long as `Prefer: wait` holds it, so an account
    with 1000 slots keeps ~1000 connections open. One httpcore pool of 1000 costs O(pool)
    CPU per request; so the session keeps up to one client per SHARD_SIZE slots and each
    thread sticks to one of them. Clients are built on first use, so a token that makes one
    request costs one client, not one per possible shard.
    """

    def __init__(self, token: str, base_url: str, keepalive: int, pool_timeout: float) -> None:
        self._token, self._base_url = token, base_url
        self.timeout = httpx.Timeout(10.0, connect=5.0, read=30.0, write=30.0, pool=pool_timeout)
        self._keepalive = min(keepalive, SHARD_SIZE)
        self._shards: list[tuple | None] = [None] * max(1, -(-keepalive // SHARD_SIZE))
        self._shards_lock = threading.Lock()
        self._closed = False
        self._local = threading.local()
        self._next = itertools.count()
        self.users = 0          # holders of the session; maintained by SessionCache
        self.last_used = 0.0    # when it was last acquired or released (SessionCache's clock)

    def __repr__(self) -> str:  # never the token
        return f"<UpstreamSession {account_key(self._token)[:12]} shards={self.built_shards}>"

    @property
    def token(self) -> str:
        return self._token

    @property
    def built_shards(self) -> int:
        return sum(shard is not None for shard in self._shards)

    def _build(self) -> tuple:
        # No cap on connections: the slot pool already bounds how many run at once, and a
        # cap below it would turn a raised concurrency limit into pool timeouts.
        transport = ErrorTransport(httpx.HTTPTransport(verify=_ssl_context(), limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=self._keepalive)))
        client = replicate.Client(api_token=self._token, base_url=self._base_url, timeout=self.timeout,
                                  transport=transport)
        return client, transport

    @property
    def client(self) -> replicate.Client:
        """This thread's client (built on first use)."""
        return self._shard()[0]

    @property
    def _transport(self) -> ErrorTransport:
        return self._shard()[1]

    def _shard(self) -> tuple:
        index = getattr(self._local, "index", None)
        if index is None:
            index = self._local.index = next(self._next) % len(self._shards)
        shard = self._shards[index]
        if shard is None:
            with self._shards_lock:
                if self._closed:
                    raise RuntimeError("this upstream session was closed")
                shard = self._shards[index]
                if shard is None:
                    shard = self._shards[index] = self._build()
        return shard

    def _call(self, method, *args: Any, **kwargs: Any) -> PredictionState:
        try:
            return _state(method(*args, **kwargs))
        except UNPARSEABLE:
            # replicate 1.0.7's model rejects `aborted`: read the same answer as plain JSON.
            return _state(json.loads(self._transport.last_body()))

    def create(self, target: str | ModelRef, data: dict[str, Any], wait: int) -> PredictionState:
        """Create a prediction of `target` (an official model's `owner/name`, or a ModelRef
        naming a model, a version or a deployment); with wait > 0 the upstream holds the
        answer up to `wait` s. Each kind has its own route upstream (see references.py)."""
        held = wait if wait > 0 else False
        if isinstance(target, str):
            target = official(target)
        if target.run_by is RunBy.VERSION:
            # `predictions.create(version=...)` keeps `wait` (with `model=` it drops it).
            return self._call(self.client.predictions.create, version=target.version, input=data, wait=held)
        if target.run_by is RunBy.DEPLOYMENT:
            return self._call(self.client.deployments.predictions.create, deployment=target.model,
                              input=data, wait=held)
        return self._call(self.client.models.predictions.create, model=target.model, input=data, wait=held)

    def read_json(self, path: str) -> Any:
        """One GET of the API (`/v1/models/...`), as plain JSON: the client's models keep
        only some fields of a model or deployment, and the schema is in the raw document.
        Error answers raise UpstreamError (see ErrorTransport)."""
        return self.client._request("GET", path).json()

    def get(self, prediction_id: str) -> PredictionState:
        return self._call(self.client.predictions.get, prediction_id)

    def cancel(self, prediction_id: str) -> PredictionState:
        return self._call(self.client.predictions.cancel, prediction_id)

    def recent_since(self, since: float, max_pages: int = 100) -> list[dict[str, Any]]:
        """The account's predictions created after `since` (wall time), newest first, read
        from `GET /v1/predictions` page by page."""
        found, cursor = [], "/v1/predictions"
        for _ in range(max_pages):
            # The public `predictions.list` parses each prediction into the client's model,
            # which rejects `aborted`; the client's request method reads the raw page.
            page = self.client._request("GET", cursor).json()
            for prediction in page.get("results") or []:
                if _created_at(prediction) < since:
                    return found
                found.append(prediction)
            cursor = page.get("next")
            if not cursor:
                break
        return found

    def close(self) -> None:
        """Close every built client (their connections); the session is unusable after."""
        with self._shards_lock:
            self._closed = True
            built = [shard for shard in self._shards if shard is not None]
            self._shards = [None] * len(self._shards)
        for client, _ in built:
            # replicate.Client has no public close; its httpx client closes the transport
            # chain down to the sockets.
            client._client.close()


class TokenTracker(Protocol):
    """Told which tokens the cache holds (the log redactor masks exactly those)."""

    def track(self, token: str) -> None: ...

    def untrack(self, token: str) -> None: ...


class SessionCache:
    """Upstream sessions by token: an LRU of at most `capacity`, each closed after
    `idle_seconds` unused, so made-up tokens cannot pile up clients, pools and sockets.

    Work holds a session with `acquire`/`release` (or `using`). A session evicted while held
    leaves the cache at once but is closed only when its last holder releases it; asked for
    again before that, it comes back instead of a second one being built. `tracker` hears of
    every session's token from creation to close.
    """

    def __init__(self, base_url: str, keepalive: int, pool_timeout: float, capacity: int = 64,
                 idle_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 tracker: TokenTracker | None = None) -> None:
        self._base_url, self._keepalive, self._pool_timeout = base_url, keepalive, pool_timeout
        self._capacity, self._idle_seconds, self._clock = max(1, capacity), idle_seconds, clock
        self._tracker = tracker
        self._sessions: collections.OrderedDict[str, UpstreamSession] = collections.OrderedDict()
        self._retired: dict[str, UpstreamSession] = {}  # evicted while held: closed on last release
        self._lock = threading.Lock()
        _ssl_context()  # built at start-up, not by a first request's creates (~20 ms)

    def __len__(self) -> int:
        return len(self._sessions)

    def acquire(self, token: str, uses: int = 1) -> UpstreamSession:
        """The token's session, held `uses` times: call `release` once per use."""
        if uses < 1:
            raise ValueError("a session is acquired for at least one use")
        key = account_key(token)
        with self._lock:
            now = self._clock()
            session = self._sessions.get(key) or self._retired.pop(key, None)
            if session is None:
                session = UpstreamSession(token, self._base_url, self._keepalive, self._pool_timeout)
                if self._tracker is not None:
                    self._tracker.track(token)
            self._sessions[key] = session
            self._sessions.move_to_end(key)
            session.users += uses
            session.last_used = now
            doomed = self._expire(now) + self._trim()
        self._close(doomed)
        return session

    def release(self, session: UpstreamSession, uses: int = 1) -> None:
        key = account_key(session.token)
        with self._lock:
            session.users -= uses
            session.last_used = now = self._clock()
            doomed = self._expire(now)
            if session.users <= 0 and self._retired.get(key) is session:
                doomed.append(self._retired.pop(key))
            elif self._sessions.get(key) is session:
                self._sessions.move_to_end(key)  # recently used: the last to be evicted
        self._close(doomed)

    @contextlib.contextmanager
    def using(self, token: str) -> Iterator[UpstreamSession]:
        session = self.acquire(token)
        try:
            yield session
        finally:
            self.release(session)

    def hold(self, session: UpstreamSession) -> bool:
        """One more use of a session someone already holds (for work it hands to another
        thread); False if it has been closed meanwhile. Release it like any other use."""
        with self._lock:
            key = account_key(session.token)
            if session.users <= 0 and self._sessions.get(key) is not session:
                return False
            session.users += 1
            return True

    def releasing(self, session: UpstreamSession, work: Callable[..., Any]) -> Callable[..., Any]:
        """`work` followed by the release of one use of `session`, however it ends: a lane
        job, or a thread's target. What `work` returns is passed on (a lane job's rest,
        which needs no session)."""
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return work(*args, **kwargs)
            finally:
                self.release(session)
        return run

    def get(self, token: str) -> UpstreamSession:
        """The token's session without holding it, for a look. Work must hold its session
        (`acquire`, `using`): an unheld one is closed when evicted."""
        session = self.acquire(token)
        self.release(session)
        return session

    def _expire(self, now: float) -> list[UpstreamSession]:
        """Unheld sessions idle for `idle_seconds` (under the lock). The dict runs from least
        to most recently used, so the walk stops at the first unheld session still fresh."""
        stale = []
        for key, session in self._sessions.items():
            if session.users > 0:
                continue
            if now - session.last_used < self._idle_seconds:
                break
            stale.append(key)
        return [self._sessions.pop(key) for key in stale]

    def _trim(self) -> list[UpstreamSession]:
        """Evict down to capacity, unheld sessions first (under the lock)."""
        doomed = []
        while len(self._sessions) > self._capacity:
            key = next((k for k, s in self._sessions.items() if s.users <= 0), None)
            if key is None:  # every one is held: the oldest leaves, closed on its last release
                key, session = self._sessions.popitem(last=False)
                self._retired[key] = session
            else:
                doomed.append(self._sessions.pop(key))
        return doomed

    def _close(self, sessions: list[UpstreamSession]) -> None:
        for session in sessions:
            session.close()
            if self._tracker is not None:
                self._tracker.untrack(session.token)

    def close(self) -> None:
        """Close every session, held or not (the process is stopping)."""
        with self._lock:
            doomed = [*self._sessions.values(), *self._retired.values()]
            self._sessions.clear()
            self._retired.clear()
        self._close(doomed)
