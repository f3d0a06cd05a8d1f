"""Prompt files (.jsonl, .csv, .txt) and --param values, read into rows."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import usage_error

NAME_KEYS = ("filename", "custom_id")       # a row's file name; `filename` wins when both are given
RESERVED = {"model_name", "prompt", "prompts", "custom_filename", "custom_filenames"}


@dataclasses.dataclass
class Row:
    index: int
    prompt: str
    name: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_value(text: str) -> Any:
    """A CSV cell or --param value: JSON where it parses (numbers, booleans, null, lists), else
    the text itself. NaN, Infinity and numbers too large for a float stay text."""
    try:
        value = json.loads(text, parse_constant=_refuse)
    except ValueError:
        return text
    return text if isinstance(value, float) and not math.isfinite(value) else value


def _refuse(name: str) -> Any:
    raise ValueError(name)


def _make_row(index: int, fields: dict[str, Any], where: str) -> Row:
    fields = dict(fields)
    prompt = fields.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise usage_error(f"{where}: 'prompt' must be a non-empty string")
    name = None
    for key in NAME_KEYS:
        value = fields.pop(key, None)
        if name is None and value not in (None, ""):
            name = value
    if name is not None and (isinstance(name, bool) or not isinstance(name, (str, int))):
        raise usage_error(f"{where}: 'filename' / 'custom_id' must be a string")
    reserved = sorted(RESERVED & fields.keys())
    if reserved:
        raise usage_error(f"{where}: {reserved[0]!r} cannot be a per-row parameter")
    return Row(index, prompt, None if name is None else str(name), fields)


def _jsonl_rows(text: str, where: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is legal inside JSON
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise usage_error(f"{where}:{number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise usage_error(f"{where}:{number}: each line must be a JSON object with a 'prompt'")
        rows.append(_make_row(len(rows), record, f"{where}:{number}"))
    return rows


def _csv_rows(text: str, where: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "prompt" not in columns:
        raise usage_error(f"{where}: needs a 'prompt' column; found: {', '.join(columns) or 'no header'}")
    if len(set(columns)) != len(columns):
        raise usage_error(f"{where}: a column name appears twice")
    rows: list[Row] = []
    for record in reader:
        place = f"{where}:{reader.line_num}"
        if None in record:
            raise usage_error(f"{place}: more cells than there are columns")
        cells = {k.strip(): v for k, v in record.items() if v not in (None, "")}
        if "" in cells:
            raise usage_error(f"{place}: a value under a column with no name")
        fields = {k: v if k == "prompt" or k in NAME_KEYS else parse_value(v) for k, v in cells.items()}
        rows.append(_make_row(len(rows), fields, place))
    return rows


def _txt_rows(text: str, where: str) -> list[Row]:
    lines = (line.strip() for line in text.split("\n"))
    return [Row(i, prompt) for i, prompt in enumerate(line for line in lines if line)]


READERS: dict[str, Callable[[str, str], list[Row]]] = {
    ".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows, ".csv": _csv_rows, ".txt": _txt_rows}


def read_rows(path: Path) -> tuple[list[Row], bytes]:
    """The rows of a prompt file and its bytes (their digest is part of the Idempotency-Key)."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise usage_error(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .jsonl, .csv or .txt")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise usage_error(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise usage_error(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    rows = reader(text, str(path))
    if not rows:
        raise usage_error(f"{path} holds no prompts")
    return rows, data


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """The --param key=value pairs as model parameters; raises a usage error for a bad pair."""
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise usage_error(f"--param takes key=value, got {pair!r}")
        if key.strip() in RESERVED:
            raise usage_error(f"--param {key.strip()} is not a parameter (use the command's own arguments)")
        params[key.strip()] = parse_value(value)
    return params
