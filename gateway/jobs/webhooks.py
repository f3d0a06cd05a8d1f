"""Job webhooks: signed the way Replicate signs its own, delivered with retries.

Signature (Standard Webhooks, as Replicate): headers `webhook-id`, `webhook-timestamp` and
`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`. The key is
WEBHOOK_SECRET; a `whsec_<base64>` secret is base64-decoded first, as Replicate's are.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

import requests

from gateway.errors import ServiceError

log = logging.getLogger(__name__)


def secret_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_"):])
    return secret.encode()


def sign(secret: str, message_id: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_target(url: object, allow_private: bool) -> str:
    """An http(s) URL whose host resolves only to public addresses (unless allowed);
    ServiceError 400 otherwise. Checked at submit and again before each delivery."""
    if not isinstance(url, str) or len(url) > 2000:
        raise ServiceError(400, "Invalid value for 'webhook': an http(s) URL is required", field="webhook")
    try:
        parsed = urlparse(url)
        port = parsed.port or 443  # ValueError for a port that is not a number from 0 to 65535
    except ValueError:  # "http://[x", "http://h:xx/": not a URL at all
        parsed, port = None, 0
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.username:
        raise ServiceError(400, "Invalid value for 'webhook': an http(s) URL is required", field="webhook")
    if allow_private:
        return url
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, port)}
    except (socket.gaierror, UnicodeError):
        raise ServiceError(400, f"Invalid value for 'webhook': cannot resolve {parsed.hostname!r}",
                           field="webhook") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise ServiceError(400, "Invalid value for 'webhook': it resolves to a loopback, private or "
                               "link-local address (set WEBHOOK_ALLOW_PRIVATE=true to allow)", field="webhook")
    return url


class WebhookSender:
    """Delivers each finished job's state once, retrying with exponential backoff from 1 s.
    `on_done(job_id, delivered)` is told the outcome (delivered, or given up) in every case,
    so the delivery's claim in the journal is always settled."""

    def __init__(self, secret: str, attempts: int, allow_private: bool,
                 on_done: Callable[[str, bool], None], sleep: Callable[[float], None] = time.sleep) -> None:
        self._secret, self._attempts, self._allow_private = secret, attempts, allow_private
        self._on_done, self._sleep = on_done, sleep
        self._http = requests.Session()

    def send(self, job_id: str, url: str, body: bytes) -> None:
        threading.Thread(target=self._deliver, args=(job_id, url, body), daemon=True,
                         name=f"webhook-{job_id}").start()

    def _deliver(self, job_id: str, url: str, body: bytes) -> None:
        delivered = False
        try:
            delivered = self._attempt_all(job_id, url, body)
        finally:
            self._on_done(job_id, delivered)

    def _attempt_all(self, job_id: str, url: str, body: bytes) -> bool:
        message_id = f"msg_{job_id}"  # the same id on every retry, so receivers can de-duplicate
        for attempt in range(1, self._attempts + 1):
            try:
                check_target(url, self._allow_private)
                timestamp = str(int(time.time()))
                signature = sign(self._secret, message_id, timestamp, body)
                response = self._http.post(url, data=body, timeout=(5, 10), allow_redirects=False, headers={
                    "Content-Type": "application/json", "webhook-id": message_id,
                    "webhook-timestamp": timestamp, "webhook-signature": signature})
                if 200 <= response.status_code < 300:
                    return True
                reason = f"HTTP {response.status_code}"
            except (requests.RequestException, ServiceError) as exc:
                reason = type(exc).__name__
            log.warning("webhook for job %s failed (attempt %d of %d): %s", job_id, attempt, self._attempts, reason)
            if attempt < self._attempts:
                self._sleep(min(2 ** (attempt - 1), 300))
        log.error("webhook for job %s given up after %d attempts", job_id, self._attempts)
        return False
