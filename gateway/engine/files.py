"""Output names and folders: client-chosen names are checked, never trusted as paths.

Each request writes into a folder of its own, so concurrent requests never share a name.
A file is written to a temporary name in that folder and linked into place only when it is
complete, and never over an existing file.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.errors import ServiceError

MAX_NAME = 128
NAME_MAX_BYTES = 255  # NAME_MAX of Linux filesystems: a file name's length in bytes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
# Every extension an output can be saved with (the downloader sniffs the real one).
OUTPUT_EXTENSIONS = (*IMAGE_EXTENSIONS, ".mp4", ".mov", ".m4a", ".webm", ".mkv", ".wav", ".avi", ".mp3",
                     ".ogg", ".flac", ".glb", ".zip", ".pdf", ".bin")
# The longest extension a saved file can get: an output's (".webp", ".flac") or its
# provenance record (".json"). A name must fit NAME_MAX with any of them.
LONGEST_EXTENSION = max(len(e) for e in (*OUTPUT_EXTENSIONS, ".json"))
RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)
ALLOWED_PUNCTUATION = "._- "
NAME_RULE = ("letters, digits, '_', '-', '.' and spaces; at most 128 characters, and at most "
             f"{NAME_MAX_BYTES} bytes in UTF-8 once the output number and extension are added; "
             "no leading dot or space, no '..', no path separators, no control or invisible "
             "characters, no reserved device names")
PART_PREFIX = ".part-"


def _name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if unicodedata.normalize("NFKC", name) != name:
        return "contains characters that change under Unicode normalisation"
    if name[0] in ". " or name.endswith(" ") or ".." in name:
        return "starts with a dot or space, ends with a space, or contains '..'"
    for ch in name:
        if not (ch.isalnum() or ch in ALLOWED_PUNCTUATION):
            return f"contains the character {ch!r}"
    if RESERVED.match(name):
        return "is a reserved device name"
    return None


def _length_problem(stem: str, outputs_each: int) -> str | None:
    """The longest file this stem makes must fit NAME_MAX: counted in bytes, not characters
    (84 CJK characters are 252 bytes, 257 with '.webp'), and checked before anything is paid for."""
    longest = final_stems(stem, outputs_each)[-1]
    size = len(longest.encode("utf-8")) + LONGEST_EXTENSION
    if size <= NAME_MAX_BYTES:
        return None
    added = f"'{longest[len(stem):]}' and " if outputs_each > 1 else ""
    return (f"makes a file name of {size} bytes in UTF-8 ({added}a {LONGEST_EXTENSION}-byte "
            f"extension included); the limit is {NAME_MAX_BYTES} bytes")


def stem_of(name: str) -> str:
    """Drop an output extension the client wrote; the real one is added from the file itself."""
    root, ext = os.path.splitext(name)
    return root if ext.lower() in OUTPUT_EXTENSIONS and root else name


def check_names(names: Sequence[Any], field: str, outputs_each: int) -> list[str]:
    """Validate custom names; return their stems. 400 names the index and the rule.

    Names collide when equal ignoring case and image extension, or when one equals another's
    numbered output (`car` with 2 outputs makes `car_1`, `car_2`)."""
    stems, seen = [], {}
    for index, name in enumerate(names):
        problem = _name_problem(name) or _length_problem(stem_of(name), outputs_each)
        where = f"{field}[{index}]" if field.endswith("s") else field
        if problem:
            raise ServiceError(400, f"Invalid {where}: {str(name)[:80]!r} {problem}; allowed: {NAME_RULE}",
                               field=where, index=index)
        stem = stem_of(name)
        for produced in final_stems(stem, outputs_each):
            key = produced.casefold()
            if key in seen:
                raise ServiceError(400, f"Invalid {where}: {name!r} would produce the same file "
                                   f"name as {field}[{seen[key]}]; names must be unique",
                                   field=where, index=index)
            seen[key] = index
        stems.append(stem)
    return stems


def final_stems(stem: str, count: int) -> list[str]:
    return [stem] if count == 1 else [f"{stem}_{n}" for n in range(1, count + 1)]


def default_stems(model_id: str, count: int, batch: bool) -> list[str]:
    base = model_id.replace("-", "_")
    if not batch:
        return [base]
    width = len(str(count - 1))
    return [f"{base}_{index:0{width}d}" for index in range(count)]


def download_urls(folder: str, paths: Sequence[str]) -> list[str]:
    """Where a client downloads saved files: `/files/<folder>/<name>` (GET, with its key)."""
    return [f"/files/{folder}/{os.path.basename(path)}" for path in paths]


def describe_data_uri(value: Any) -> Any:
    """A `data:` URI as a short record (media type, size, SHA-256) instead of its payload,
    so a provenance file does not copy a whole input image; any other value as it is.

    The digest is of the decoded bytes when the URI is base64 (so it matches the image
    file), else of the text after the comma."""
    if not isinstance(value, str) or not value.startswith("data:"):
        return value
    head, _, payload = value[5:].partition(",")
    media_type, *flags = head.split(";")
    raw = payload.encode("utf-8")
    if "base64" in flags:
        try:
            raw = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            pass  # not valid base64: describe the text as sent
    return {"data_uri": True, "media_type": media_type or "text/plain", "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest()}


def new_request_folder(output_dir: str) -> Path:
    """A fresh folder name for one request (created on first write)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(output_dir) / f"{stamp}-{secrets.token_hex(4)}"


def place(temp: Path, final: Path) -> None:
    """Move a complete file into place without ever replacing an existing one."""
    try:
        os.link(temp, final)  # fails with FileExistsError instead of overwriting
    except FileExistsError:
        os.unlink(temp)
        raise
    except OSError:  # a filesystem without hard links: the folder is ours alone
        if final.exists():
            os.unlink(temp)
            raise FileExistsError(str(final)) from None
        os.replace(temp, final)
        return
    os.unlink(temp)


# A temporary file untouched this long belongs to no live download: a download writes each
# chunk as it comes and gives up after 30 s without one (its read timeout), removing its
# file; a provenance record's temporary file is renamed as soon as it is written.
STALE_PARTIAL_SECONDS = 300.0


def remove_partials(output_dir: str, older_than: float = STALE_PARTIAL_SECONDS,
                    now: Callable[[], float] = time.time) -> int:
    """Delete temporary download files left by a crash; return how many. Only stale ones:
    the other workers (and replicas) sharing OUTPUT_DIR may be writing theirs right now."""
    removed, cutoff = 0, now() - older_than
    for path in Path(output_dir).glob(f"*/{PART_PREFIX}*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # finished, or removed by another process, meanwhile
            continue
    return removed
