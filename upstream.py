"""Talking to Replicate: one `replicate.Client` per token, errors made precise.

The official client drops what a caller needs to react to an error (`Retry-After`, the body's
`retry_after`, `invalid_fields`) and retries GETs on its own schedule. So the client is given
a transport that turns every error response into an `UpstreamError` carrying those fields
before the client sees it; the service then decides about retries itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import threading
from datetime import datetime
from typing import Any

import httpx
import pydantic
import pydantic.v1
import replicate

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
    def from_response(cls, response: httpx.Response) -> "UpstreamError":
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


def _created_at(prediction: dict) -> float:
    try:
        return datetime.fromisoformat(str(prediction.get("created_at")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")  # unknown: keep looking


def _state(prediction: Any) -> PredictionState:
    if isinstance(prediction, dict):
        return PredictionState(str(prediction.get("id")), str(prediction.get("status")),
                               prediction.get("output"), prediction.get("error"))
    return PredictionState(prediction.id, prediction.status, prediction.output, prediction.error)


SHARD_SIZE = 64  # connections per HTTP pool: httpcore scans its whole pool on every request


class UpstreamSession:
    """One account's client(s). Thread-safe: httpx clients are.

    A prediction holds a connection for as long as `Prefer: wait` holds it, so an account
    with 1000 slots keeps ~1000 connections open. One httpcore pool of 1000 costs O(pool)
    CPU per request; so the session keeps one client per SHARD_SIZE slots and each thread
    sticks to one of them.
    """

    def __init__(self, token: str, base_url: str, keepalive: int, pool_timeout: float) -> None:
        shards = max(1, -(-keepalive // SHARD_SIZE))
        # No cap on connections: the slot pool already bounds how many run at once, and a
        # cap below it would turn a raised concurrency limit into pool timeouts.
        self._shards = [self._build(token, base_url, min(keepalive, SHARD_SIZE), pool_timeout)
                        for _ in range(shards)]
        self._local = threading.local()
        self._next = itertools.count()

    @staticmethod
    def _build(token: str, base_url: str, keepalive: int, pool_timeout: float) -> tuple:
        transport = ErrorTransport(httpx.HTTPTransport(limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=keepalive)))
        client = replicate.Client(
            api_token=token, base_url=base_url,
            timeout=httpx.Timeout(10.0, connect=5.0, read=30.0, write=30.0, pool=pool_timeout),
            transport=transport)
        return client, transport

    @property
    def _client(self) -> replicate.Client:
        return self._shard()[0]

    @property
    def _transport(self) -> ErrorTransport:
        return self._shard()[1]

    def _shard(self) -> tuple:
        shard = getattr(self._local, "shard", None)
        if shard is None:
            shard = self._local.shard = self._shards[next(self._next) % len(self._shards)]
        return shard

    def _call(self, method, *args: Any, **kwargs: Any) -> PredictionState:
        try:
            return _state(method(*args, **kwargs))
        except UNPARSEABLE:
            # replicate 1.0.7's model rejects `aborted`: read the same answer as plain JSON.
            return _state(json.loads(self._transport.last_body()))

    def create(self, model: str, data: dict[str, Any], wait: int) -> PredictionState:
        """Create a prediction; with wait > 0 the upstream holds the answer up to `wait` s."""
        return self._call(self._client.models.predictions.create, model=model, input=data,
                          wait=wait if wait > 0 else False)

    def get(self, prediction_id: str) -> PredictionState:
        return self._call(self._client.predictions.get, prediction_id)

    def cancel(self, prediction_id: str) -> PredictionState:
        return self._call(self._client.predictions.cancel, prediction_id)

    def recent_since(self, since: float, max_pages: int = 100) -> list[dict[str, Any]]:
        """The account's predictions created after `since` (wall time), newest first, read
        from `GET /v1/predictions` page by page."""
        found, cursor = [], "/v1/predictions"
        for _ in range(max_pages):
            page = self._client._request("GET", cursor).json()
            for prediction in page.get("results") or []:
                if _created_at(prediction) < since:
                    return found
                found.append(prediction)
            cursor = page.get("next")
            if not cursor:
                break
        return found

    def find_recent(self, data: dict[str, Any], since: float, exclude: set[str]) -> PredictionState | None:
        """The newest prediction created after `since` whose input equals `data` and whose
        id is not in `exclude` (a create whose answer was lost)."""
        for prediction in self.recent_since(since, max_pages=5):
            if prediction.get("input") == data and prediction.get("id") not in exclude:
                return _state(prediction)
        return None

    def close(self) -> None:
        for client, _ in self._shards:
            client._client.close()


def account_key(token: str) -> str:
    """What identifies an account internally: a hash, so the token itself is not spread."""
    return hashlib.sha256(token.encode()).hexdigest()


class SessionCache:
    """One UpstreamSession per token, created on first use."""

    def __init__(self, base_url: str, keepalive: int, pool_timeout: float) -> None:
        self._base_url, self._keepalive, self._pool_timeout = base_url, keepalive, pool_timeout
        self._sessions: dict[str, UpstreamSession] = {}
        self._lock = threading.Lock()

    def get(self, token: str) -> UpstreamSession:
        key = account_key(token)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = UpstreamSession(token, self._base_url, self._keepalive, self._pool_timeout)
                self._sessions[key] = session
            return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()
