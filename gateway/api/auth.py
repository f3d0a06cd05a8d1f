"""Who is calling, and on whose Replicate token the work runs.

- `X-Admin-API-Key` equal to the configured admin key (constant-time) runs on the server's
  token. An unset or empty admin key disables admin access; it never grants it.
- Otherwise `X-Replicate-API-Key` runs on the caller's own token, for that request only.
- A wrong admin key is 401 even when a user token is sent too.
- The OpenAI-compatible API (`/v1/...`) also takes `Authorization: Bearer <key>`: the admin
  key runs on the server's token, any other key is taken as the caller's Replicate token.
- A key is printable ASCII without spaces (`check_token`): anything else is refused with a
  clear message before it can reach a comparison, the upstream's headers, sqlite or the log.
"""
from __future__ import annotations

import hmac
import re
from collections.abc import Mapping

from flask import request

from gateway.accounts import Caller
from gateway.config import Settings
from gateway.errors import ServiceError
from gateway.state import gateway_state

NO_KEY = "No valid API key provided. Either provide X-Admin-API-Key or X-Replicate-API-Key header"
BAD_ADMIN = "Invalid admin API key"
NO_BEARER_KEY = ("No API key provided: send 'Authorization: Bearer <key>', the key being the gateway's admin key "
                 "or your own Replicate API token")
NO_BEARER = ("Invalid Authorization header; allowed: 'Bearer <key>', the key being the gateway's admin key "
             "or your own Replicate API token")
MAX_TOKEN = 512
_PRINTABLE = re.compile(r"[!-~]+")  # printable ASCII, no space


def _token_problem(value: str, longest: int) -> str | None:
    if not value:
        return "it is empty"
    if len(value) > longest:
        return f"it is longer than {longest} characters"
    if not value.isascii():
        return "it contains a non-ASCII character"
    return None if _PRINTABLE.fullmatch(value) else "it contains a space or a control character"


def check_token(value: str, header: str, status: int, longest: int = MAX_TOKEN) -> str:
    """`value` if it is 1 to `longest` printable ASCII characters without spaces; ServiceError
    `status` naming the header otherwise. Header values arrive decoded as latin-1, so a
    UTF-8 `é` is two characters here, and both are refused."""
    problem = _token_problem(value, longest)
    if problem:
        raise ServiceError(status, f"Invalid {header} header: {problem}; allowed: 1 to {longest} printable "
                           "ASCII characters without spaces", field=header)
    return value


def is_admin_key(presented: str | None, settings: Settings) -> bool:
    if not settings.admin_api_key or not presented:
        return False
    return hmac.compare_digest(presented.encode(), settings.admin_api_key.encode())


def authenticate(headers: Mapping[str, str], settings: Settings) -> Caller:
    """The caller of a generation request; ServiceError 401 (or 503) otherwise."""
    admin = headers.get("X-Admin-API-Key")
    if admin is not None:
        if not is_admin_key(check_token(admin, "X-Admin-API-Key", 401), settings):
            raise ServiceError(401, BAD_ADMIN)
        return _admin(settings)
    user = (headers.get("X-Replicate-API-Key") or "").strip()
    if user:
        return Caller(check_token(user, "X-Replicate-API-Key", 401), False)
    raise ServiceError(401, NO_KEY)


def _admin(settings: Settings) -> Caller:
    if not settings.replicate_api_token:
        raise ServiceError(503, "Admin access needs REPLICATE_API_TOKEN to be configured on the server")
    return Caller(settings.replicate_api_token, True)


def authenticate_bearer(headers: Mapping[str, str], settings: Settings) -> Caller:
    """The caller of an OpenAI-style request: `Authorization: Bearer <key>`, where the admin
    key runs on the server token and any other key is the caller's own Replicate token
    (the same checks as the spec headers). Without that header, the spec headers."""
    value = headers.get("Authorization")
    if value is None:
        if headers.get("X-Admin-API-Key") is None and not (headers.get("X-Replicate-API-Key") or "").strip():
            raise ServiceError(401, NO_BEARER_KEY)
        return authenticate(headers, settings)
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ServiceError(401, NO_BEARER, field="Authorization")
    key = check_token(key.strip(), "Authorization", 401)
    return _admin(settings) if is_admin_key(key, settings) else Caller(key, False)


def require_admin(headers: Mapping[str, str], settings: Settings) -> None:
    presented = headers.get("X-Admin-API-Key")
    if presented is None:
        raise ServiceError(401, "This endpoint needs the X-Admin-API-Key header")
    if not is_admin_key(check_token(presented, "X-Admin-API-Key", 401), settings):
        raise ServiceError(401, BAD_ADMIN)


def current_caller() -> Caller:
    """The authenticated caller; resumes their unfinished jobs, now that the token is here.

    The caller's token is not added to the log redactor here (that set grew with every token
    ever sent): the session cache tracks the tokens it holds (see redaction.py)."""
    state = gateway_state()
    caller = authenticate(request.headers, state.settings)
    state.jobs.adopt(caller)
    return caller


def current_bearer_caller() -> Caller:
    """As `current_caller`, for the OpenAI-compatible API (`authenticate_bearer`)."""
    state = gateway_state()
    caller = authenticate_bearer(request.headers, state.settings)
    state.jobs.adopt(caller)
    return caller
