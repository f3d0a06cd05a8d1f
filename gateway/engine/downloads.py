"""Downloading output files: streamed to a temporary file with a deadline, a size cap and
retries on transient faults. Nothing partial is ever left behind."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from gateway.engine.files import PART_PREFIX

log = logging.getLogger(__name__)
CHUNK = 64 * 1024
PERMANENT = {400, 401, 403, 404, 410}
# Magic numbers at the start of a file; RIFF and ISO media (mp4) containers are told apart
# by what follows (see sniff_extension). Images, video, audio, 3D and archives: the kinds of
# file the models teams run answer.
SIGNATURES = [(b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"),
              (b"glTF", "glb"), (b"PK\x03\x04", "zip"), (b"ID3", "mp3"), (b"OggS", "ogg"),
              (b"fLaC", "flac"), (b"%PDF-", "pdf")]
HEAD_BYTES = 64  # enough for every signature, a WebM DocType included
MAX_SUFFIX = 5   # a URL suffix used as the extension: short and plain, or "bin"


class DownloadError(Exception):
    """A file could not be fetched; the message is safe to show a client."""


def sniff_extension(head: bytes, url: str) -> str:
    """The file's real format from its first bytes; the URL's suffix only as a fallback."""
    if head[:4] == b"RIFF":
        riff = {b"WEBP": "webp", b"WAVE": "wav", b"AVI ": "avi"}.get(head[8:12])
        if riff:
            return riff
    if head[4:8] == b"ftyp":  # ISO base media: the brand says which
        brand = head[8:12]
        return "mov" if brand == b"qt  " else "m4a" if brand in (b"M4A ", b"M4B ") else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: WebM or Matroska, by DocType
        return "webm" if b"webm" in head else "mkv"
    for magic, ext in SIGNATURES:
        if head.startswith(magic):
            return ext
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:  # an MPEG audio frame
        return "mp3"
    suffix = os.path.splitext(url.split("?")[0])[1].lower().lstrip(".")
    suffix = {"jpeg": "jpg"}.get(suffix, suffix)
    return suffix if suffix.isascii() and suffix.isalnum() and len(suffix) <= MAX_SUFFIX - 1 else "bin"


def new_session(pool_size: int) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Downloader:
    def __init__(self, session: requests.Session, max_bytes: int, attempts: int,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self._session, self._max_bytes, self._attempts = session, max_bytes, attempts
        self._clock, self._sleep = clock, sleep

    @property
    def max_bytes(self) -> int:
        """The cap of every output, whatever its kind (MAX_DOWNLOAD_BYTES)."""
        return self._max_bytes

    def fetch(self, url: str, folder: Path, deadline: float) -> tuple[Path, str]:
        """Download `url` into a temporary file in `folder`; return (path, extension).

        Raises DownloadError (temporary file removed) when the file is missing, too large,
        cut short on every attempt, or the deadline passes."""
        folder.mkdir(parents=True, exist_ok=True)
        last = "no attempt made"
        for attempt in range(1, self._attempts + 1):
            try:
                return self._once(url, folder, deadline)
            except _Permanent as exc:
                raise DownloadError(str(exc)) from None
            except (requests.RequestException, _Transient) as exc:
                last = _describe(exc)
                log.warning("download attempt %d of %s failed: %s", attempt, url, last)
            backoff = min(0.2 * 2 ** (attempt - 1), 3.0)
            if attempt == self._attempts or self._clock() + backoff >= deadline:
                break
            self._sleep(backoff)
        raise DownloadError(f"download failed after {attempt} attempt(s): {last}")

    def _once(self, url: str, folder: Path, deadline: float) -> tuple[Path, str]:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise _Permanent("download deadline passed")
        handle = tempfile.NamedTemporaryFile(dir=folder, prefix=PART_PREFIX, delete=False)
        path = Path(handle.name)
        try:
            with handle, self._session.get(url, stream=True, timeout=(5, min(30, remaining))) as resp:
                if resp.status_code in PERMANENT:
                    raise _Permanent(f"output file answered HTTP {resp.status_code}")
                if resp.status_code >= 400:
                    raise _Transient(f"output file answered HTTP {resp.status_code}")
                head = self._copy(resp, handle, deadline)
                # No fsync: a complete file in the page cache survives a crash of this
                # process (the journal makes the same choice: WAL, synchronous=NORMAL); only
                # a power loss could lose it, and the upstream keeps outputs for an hour.
            return path, sniff_extension(head, url)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _copy(self, resp: requests.Response, handle, deadline: float) -> bytes:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self._max_bytes:
            raise _Permanent(f"output file is larger than the {self._max_bytes}-byte cap")
        size, head = 0, b""
        for chunk in resp.iter_content(CHUNK):
            size += len(chunk)
            if size > self._max_bytes:
                raise _Permanent(f"output file is larger than the {self._max_bytes}-byte cap")
            if len(head) < HEAD_BYTES:
                head += chunk[:HEAD_BYTES - len(head)]
            handle.write(chunk)
            if self._clock() > deadline:
                raise _Permanent("download deadline passed")
        if declared and declared.isdigit() and size != int(declared):
            raise _Transient(f"output file cut short ({size} of {declared} bytes)")
        if size == 0:
            raise _Transient("output file was empty")
        return head


class _Permanent(Exception):
    pass


class _Transient(Exception):
    pass


def _describe(exc: Exception) -> str:
    if isinstance(exc, _Transient):
        return str(exc)
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection closed before the whole file arrived"
    if isinstance(exc, requests.ConnectionError):
        return "could not connect"
    return type(exc).__name__
