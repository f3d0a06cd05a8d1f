"""Signed file URLs: a link to a saved file that downloads without a key until it expires.

A signed URL is `/files/<folder>/<name>?expires=<unix time>&signature=<hex>`, where the
signature is an HMAC-SHA256, keyed by `FILE_URL_SECRET`, of the path and the expiry. The
path signed is the decoded one (as the router sees it), so quoting cannot change what a
signature covers. A link whose signature does not match, or whose time has passed, is a 403.

The secret must outlive the process (a link handed out yesterday must work after a
restart): when `FILE_URL_SECRET` is unset, one is generated when the first link is signed
(or checked) and kept beside the files in `OUTPUT_DIR/.file-url-secret` (mode 0600), which
the download route can never serve (it refuses names that start with a dot). A service
that never hands out a link never writes one.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from gateway.config import Settings
from gateway.errors import ServiceError

log = logging.getLogger(__name__)
SECRET_FILE = ".file-url-secret"
MIN_SECRET = 16
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
INVALID = "Invalid file link: the signature does not match; ask for a new link"


class StoredSecret:
    """The secret kept in a file: read, or made, on first use; then kept in memory.

    One per file in a process (`stored_secret`), so every signer of an app agrees, and
    whoever must know the value (the log redactor) is told once it exists."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._value: str | None = None
        self._watchers: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if self._value is None:
                self._value = _read_or_make(self.path)
                for watcher in self._watchers:
                    watcher(self._value)
            return self._value

    def when_known(self, watcher: Callable[[str], None]) -> None:
        """Call `watcher` with the secret now if it is loaded, else once it is."""
        with self._lock:
            if self._value is None:
                self._watchers.append(watcher)
                return
        watcher(self._value)


_STORED: dict[Path, StoredSecret] = {}
_STORED_LOCK = threading.Lock()


def stored_secret(path: Path) -> StoredSecret:
    with _STORED_LOCK:
        return _STORED.setdefault(path, StoredSecret(path))


class FileSigner:
    """Signs `/files/...` paths and checks signed requests. `secret` is the key, or a function
    giving it (read when first needed); `clock` is the wall clock."""

    def __init__(self, secret: str | Callable[[], str], ttl: float, clock: Callable[[], float] = time.time) -> None:
        if isinstance(secret, str) and len(secret) < MIN_SECRET:
            raise ValueError("the file URL secret is too short")
        self._secret = secret
        self._ttl = ttl
        self._clock = clock

    def _digest(self, path: str, expires: int) -> str:
        secret = self._secret if isinstance(self._secret, str) else self._secret()
        return hmac.new(secret.encode(), f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, base: str = "") -> str:
        """`base` + `path` (quoted) + `?expires=...&signature=...`, valid for the TTL."""
        expires = int(self._clock() + self._ttl)
        return f"{base}{quote(path, safe='/')}?expires={expires}&signature={self._digest(path, expires)}"

    def sign_all(self, paths: Sequence[str], base: str = "") -> list[str]:
        return [self.sign(path, base) for path in paths]

    def verify(self, path: str, expires: str | None, signature: str | None) -> None:
        """Return if `signature` signs `path` and `expires` has not passed; ServiceError 403 otherwise."""
        if not (expires and signature and _EXPIRES.fullmatch(expires) and _SIGNATURE.fullmatch(signature)):
            raise ServiceError(403, INVALID)
        if not hmac.compare_digest(self._digest(path, int(expires)), signature):
            raise ServiceError(403, INVALID)
        if int(expires) < self._clock():
            when = datetime.fromtimestamp(int(expires), UTC).isoformat(timespec="seconds")
            raise ServiceError(403, f"This file link expired at {when}; ask for a new link (FILE_URL_TTL)")


def file_signer(settings: Settings, on_secret: Callable[[str], None] | None = None) -> FileSigner:
    """The signer of these settings: FILE_URL_SECRET, else the secret kept in the output
    folder. `on_secret` is told a kept secret once it is read (to mask it in logs)."""
    if settings.file_url_secret:
        return FileSigner(settings.file_url_secret, settings.file_url_ttl)
    kept = stored_secret(Path(settings.output_dir) / SECRET_FILE)
    if on_secret is not None:
        kept.when_known(on_secret)
    return FileSigner(kept, settings.file_url_ttl)


def _read_or_make(path: Path) -> str:
    if not path.exists():
        _make(path)
    if path.stat().st_mode & 0o077:  # someone widened it: only the service may read it
        log.warning("%s was readable by others; its mode is now 0600", path)
        os.chmod(path, 0o600)
    secret = path.read_text(encoding="utf-8", errors="replace").strip()
    if len(secret) < MIN_SECRET:  # a fixed message: the file's text is never shown
        raise ValueError(f"{path} holds no usable secret (at least {MIN_SECRET} characters); "
                         "remove it to have a new one made, or set FILE_URL_SECRET")
    return secret


def _make(path: Path) -> None:
    """Write a new secret under a temporary name and link it into place, so two processes
    starting at once agree on one secret and none ever reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{SECRET_FILE}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temp, path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    except OSError:  # a filesystem without hard links
        if not path.exists():
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
