"""What a prediction outputs, read from its version's `Output` schema: a list of file URLs,
one URL, an object of named URLs, or text; and what each file is (type, stamp)."""
from __future__ import annotations

from typing import Any

from .catalog import Version

OutputFiles = list[tuple[str, str, dict[str, Any]]]  # (name, extension, stamp)


def shape(version: Version) -> str:
    """`list`, `uri`, `object` or `text`, from the version's Output schema."""
    output = version.openapi_schema["components"]["schemas"]["Output"]
    if output.get("type") == "array":
        return "list"
    if output.get("type") == "object":
        return "object"
    return "uri" if output.get("format") == "uri" else "text"


def _aspect_ratio(version: Version, data: dict) -> str:
    if "aspect_ratio" in version.properties:
        return data.get("aspect_ratio") or version.default("aspect_ratio")
    if "width" in version.properties:
        return f"{data.get('width') or version.default('width')}:{data.get('height') or version.default('height')}"
    return "1:1"


def plan(version: Version, data: dict, seed: int) -> tuple[str, OutputFiles]:
    """The output's shape and the files (or, for text, the one answer) to make for `data`."""
    kind = shape(version)
    fmt = (data.get("output_format") or version.default("output_format")
           if "output_format" in version.properties else version.ext)
    base = {"model": version.model, "version": version.id, "prompt": data.get(version.main_input),
            "seed": seed, "format": fmt, "aspect_ratio": _aspect_ratio(version, data)}
    for extra in ("duration", "fps"):  # what a video's container reports
        if extra in version.properties:
            base[extra] = data.get(extra) or version.default(extra)
    if kind == "object":
        names = version.openapi_schema["components"]["schemas"]["Output"]["properties"]
        return kind, [(name, fmt, {**base, "key": name}) for name in names]
    count = (data.get("num_outputs") or version.default("num_outputs") or 1) if kind == "list" else 1
    return kind, [(f"out-{index}", fmt, {**base, "index": index}) for index in range(count)]
