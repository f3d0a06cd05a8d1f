"""Files into the output folder: each one complete or absent (a temp file renamed into place),
and a file already there with the service's size is not fetched again."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import requests

from .client import Client, content_length
from .errors import EXIT_SERVICE, CliError, usage_error

DOWNLOAD_ATTEMPTS = 3                       # per file, on a body cut short
CHUNK = 64 * 1024
PART = ".rcg-part"                          # temp files are `.<name>.<pid><PART>`


class _Stopped(Exception):
    """The run was interrupted: a download in progress gives up (and removes its temp file)."""


class Downloader:
    """Saves the files of finished items into `out`; safe to use from several threads. Counts
    the files it `fetched` and those already `present`."""

    def __init__(self, client: Client, out: str) -> None:
        self.client, self.out = client, out
        self.fetched = self.present = 0
        self._stop = threading.Event()
        self._count_lock = threading.Lock()

    def stop(self) -> None:
        """Make every download in progress give up at its next chunk."""
        self._stop.set()

    def save_item(self, item: dict[str, Any]) -> list[str]:
        """The local paths of the item's files, downloading those not already here. Raises
        CliError when a download keeps failing, OSError when the folder cannot be written."""
        paths = []
        for url in item.get("urls") or []:
            name = _safe_name(url)
            self._fetch(url, Path(self.out) / name)
            paths.append(os.path.join(self.out, name))
        return paths

    def _fetch(self, url: str, dest: Path) -> None:
        """Skip a file already here with the service's size; else stream it to a temp file
        and rename it into place, so a file in the folder is always complete."""
        if dest.is_file():
            if content_length(self.client.request("HEAD", url)) == dest.stat().st_size:
                self._count("present")
                return
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                self._stream(url, dest)
                self._count("fetched")
                return
            except (requests.RequestException, EOFError) as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise CliError(f"download of {dest.name} failed: {type(exc).__name__}", EXIT_SERVICE) from None

    def _stream(self, url: str, dest: Path) -> None:
        response = self.client.request("GET", url, stream=True)
        temp = dest.with_name(f".{dest.name}.{os.getpid()}{PART}")
        try:
            with response, open(temp, "wb") as handle:
                for chunk in response.iter_content(CHUNK):
                    if self._stop.is_set():
                        raise _Stopped()
                    handle.write(chunk)
            expected = content_length(response)
            if expected is not None and temp.stat().st_size != expected:
                raise EOFError("short read")
            os.replace(temp, dest)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _count(self, what: str) -> None:
        with self._count_lock:
            setattr(self, what, getattr(self, what) + 1)


def _safe_name(url: str) -> str:
    """The file name of a `/files/<folder>/<name>` URL, refused if it could leave the folder."""
    name = url.rsplit("/", 1)[-1]
    if not url.startswith("/files/") or not name or name.startswith(".") or "\\" in name or "\0" in name:
        raise CliError(f"the gateway gave an unexpected file URL: {url[:200]!r}", EXIT_SERVICE)
    return name


def prepare_out(out: str) -> Path:
    """Create the folder and remove temp files left by a run that was killed outright."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise usage_error(f"cannot create {out}: {exc.strerror}") from None
    if not folder.is_dir():
        raise usage_error(f"{out} is not a folder")
    for temp in folder.glob(f".*{PART}"):
        pid = temp.name[: -len(PART)].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            temp.unlink(missing_ok=True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path` and rename it into place: a reader sees the
    old file or the whole new one (and prepare_out removes a temp file a killed run left)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}{PART}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)
