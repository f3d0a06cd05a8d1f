"""Output files other than images (a minimal mp4, a short silent wav, text) and reading back
the stamp of any output.

Images carry their stamp in EXIF (see images.py). Other files carry it as bytes after their
header: `STAMP_MARKER` followed by the JSON, so `read_stamp` finds it by searching.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

from . import images

STAMP_MARKER = b"EMULATOR-STAMP:"
CONTENT_TYPES = {"webp": "image/webp", "jpg": "image/jpeg", "png": "image/png",
                 "mp4": "video/mp4", "wav": "audio/wav"}
WAV_RATE = 16000
WAV_SECONDS = 0.25


def stamp_bytes(stamp: dict[str, Any]) -> bytes:
    return STAMP_MARKER + json.dumps(stamp, sort_keys=True, ensure_ascii=True).encode()


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def mp4(stamp: dict[str, Any]) -> bytes:
    """`ftyp`, a `moov` holding only `mvhd` (timescale 1000, the asked duration) and an `mdat`
    holding the stamp. It does not play, but it sniffs as MP4 and parses as ISO BMFF."""
    duration_ms = int(stamp.get("duration") or 1) * 1000
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41")
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = _box(b"mvhd", struct.pack(">B3xIIII", 0, 0, 0, 1000, duration_ms)
                + struct.pack(">IH10x", 0x10000, 0x100) + matrix + bytes(24) + struct.pack(">I", 2))
    return ftyp + _box(b"moov", mvhd) + _box(b"mdat", stamp_bytes(stamp))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) % 2 else b"")


def wav(stamp: dict[str, Any]) -> bytes:
    """A quarter second of 16 kHz mono 16-bit silence; the stamp in a chunk of its own
    between `fmt ` and `data`, which WAV readers skip."""
    frames = int(WAV_RATE * WAV_SECONDS)
    fmt = struct.pack("<HHIIHH", 1, 1, WAV_RATE, WAV_RATE * 2, 2, 16)
    body = b"WAVE" + _chunk(b"fmt ", fmt) + _chunk(b"emus", stamp_bytes(stamp)) + _chunk(b"data", bytes(frames * 2))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def text(stamp: dict[str, Any]) -> str:
    """A text model's answer: a deterministic reply, then the stamp on its last line."""
    return f"An emulated reply to: {stamp.get('prompt')}\n{stamp_bytes(stamp).decode()}"


def render_file(stamp: dict[str, Any], fmt: str, aspect_ratio: str) -> bytes:
    """The bytes of one output file of type `fmt` (an extension in CONTENT_TYPES)."""
    if fmt in images.PIL_FORMATS:
        return images.render(stamp, fmt, aspect_ratio)
    return {"mp4": mp4, "wav": wav}[fmt](stamp)


def read_stamp(source: str | os.PathLike | bytes) -> dict[str, Any]:
    """The stamp of any emulator output (a file path, or bytes; for a text output pass
    `text.encode()`); raises ValueError for an image without a stamp."""
    if isinstance(source, bytes):
        data = source
    else:
        with open(source, "rb") as handle:
            data = handle.read()
    at = data.find(STAMP_MARKER)
    if at >= 0:
        tail = data[at + len(STAMP_MARKER):].decode("utf-8", "replace")
        return json.JSONDecoder().raw_decode(tail)[0]
    return images.read_stamp(data)  # PIL raises OSError for bytes that are no image
