"""Deterministic stand-in images: a colour from the prompt and seed, the prompt drawn on it,
and a JSON stamp in the EXIF ImageDescription so a test can tell which prompt made a file."""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

from PIL import Image, ImageDraw

LONG_SIDE = 256
PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
DESCRIPTION_TAG = 0x010E


def dimensions(aspect_ratio: str) -> tuple[int, int]:
    """Width and height with the longer side LONG_SIDE; `match_input_image` is square."""
    try:
        w, h = (int(x) for x in aspect_ratio.split(":"))
    except ValueError:
        w, h = 1, 1
    if w >= h:
        return LONG_SIDE, max(1, round(LONG_SIDE * h / w))
    return max(1, round(LONG_SIDE * w / h)), LONG_SIDE


def render(stamp: dict[str, Any], fmt: str, aspect_ratio: str) -> bytes:
    """Encode one image in `fmt` (webp, jpg or png) carrying `stamp` (JSON-serialisable)."""
    text = json.dumps(stamp, sort_keys=True, ensure_ascii=True)
    digest = hashlib.sha256(text.encode()).digest()
    image = Image.new("RGB", dimensions(aspect_ratio), tuple(digest[:3]))
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), str(stamp.get("prompt", ""))[:60].encode("ascii", "replace").decode(),
              fill=(255 - digest[0], 255 - digest[1], 255 - digest[2]))
    exif = Image.Exif()
    exif[DESCRIPTION_TAG] = text
    buffer = io.BytesIO()
    image.save(buffer, PIL_FORMATS[fmt], exif=exif.tobytes())
    return buffer.getvalue()


def read_stamp(source: str | os.PathLike | bytes) -> dict[str, Any]:
    """Read back the stamp of a file made by `render`; raises ValueError if it has none."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with handle, Image.open(handle) as image:
        text = image.getexif().get(DESCRIPTION_TAG)
    if not text:
        raise ValueError("image carries no emulator stamp")
    return json.loads(text)
