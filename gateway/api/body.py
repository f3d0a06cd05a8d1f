"""The one parser of request bodies: strict JSON with bounds, so malformed input is a 400 that
names the field, never a 500 deeper in (a RecursionError, an OverflowError, a string that
cannot be encoded for the upstream, sqlite or the log).

Refused, with the path of the value (`prompt`, `prompts[2]`, `a.b`):
- bodies that are not UTF-8, not JSON, or not a JSON object;
- nesting deeper than MAX_DEPTH (the API needs 2 levels);
- `NaN`, `Infinity`, `-Infinity` (not JSON, though Python's parser accepts them), and numbers
  beyond the range of a double (`1e309` would silently become infinity);
- strings, keys included, holding a lone surrogate (`"\\ud800"`): not a character, so it
  cannot be encoded as UTF-8. An escaped surrogate *pair* is one real character and is fine.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from gateway.errors import ServiceError

MAX_DEPTH = 32
MAX_DIGITS = 308  # the largest whole number a double can hold has 309 digits
NOT_AN_OBJECT = "Request body must be a JSON object (Content-Type: application/json)"
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Refused:
    """A number the parser will not hand on; the walk over the result names where it was."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _constant(name: str) -> _Refused:
    return _Refused(f"{name} is not a JSON number; allowed: a finite number")


def _float(text: str) -> float | _Refused:
    value = float(text)
    if math.isfinite(value):
        return value
    return _Refused(f"{text[:40]} is beyond the range of a number; allowed: at most about 1.8e308 in magnitude")


def _int(text: str) -> int | _Refused:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:  # also keeps clear of Python's 4300-digit conversion limit
        return _Refused(f"a number of {digits} digits is beyond the range of a number; "
                        f"allowed: at most {MAX_DIGITS} digits")
    return int(text)


def parse_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`; ServiceError 400 saying what is wrong otherwise."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ServiceError(400, f"{NOT_AN_OBJECT}: the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:  # the C parser recurses per level: deep input ends here, not in a 500
        raise ServiceError(400, f"Request body is nested too deeply; allowed: at most {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ServiceError(400, f"{NOT_AN_OBJECT}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ServiceError(400, NOT_AN_OBJECT)
    _check_tree(data)
    return data


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _surrogate_error(field: str, what: str) -> ServiceError:
    return ServiceError(400, f"Invalid {what} '{field}': it contains a lone surrogate (U+D800 to U+DFFF), which "
                        "is not a character and cannot be encoded as UTF-8; allowed: text of valid Unicode "
                        "characters", field=field)


def _check_tree(data: dict[str, Any]) -> None:
    """Walk the parsed body without recursion; raise for the first refused value. Each entry
    carries its path (`prompts[2]`) and its top-level field (`prompts`)."""
    stack: list[tuple[Any, str, str, int]] = [(data, "", "", 1)]
    while stack:
        value, path, field, depth = stack.pop()
        if depth > MAX_DEPTH:  # named by its field: the full path would be 32 levels long
            raise ServiceError(400, f"Invalid value for '{field}': nested too deeply; allowed: at most "
                               f"{MAX_DEPTH} levels of lists and objects", field=field)
        if isinstance(value, dict):
            for key, item in value.items():
                shown = key[:60] if key.isascii() else ascii(key[:60])[1:-1]
                child = f"{path}.{shown}" if path else shown
                if _has_surrogate(key):
                    raise _surrogate_error(child, "field name")
                stack.append((item, child, field or child, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]", field, depth + 1) for index, item in enumerate(value))
        elif isinstance(value, str) and _has_surrogate(value):
            raise _surrogate_error(path, "value for")
        elif isinstance(value, _Refused):
            raise ServiceError(400, f"Invalid value for '{path}': {value.reason}", field=path)
