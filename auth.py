"""Who is calling, and on whose Replicate token the work runs.

- `X-Admin-API-Key` equal to the configured admin key (constant-time) runs on the server's
  token. An unset or empty admin key disables admin access; it never grants it.
- Otherwise `X-Replicate-API-Key` runs on the caller's own token, for that request only.
- A wrong admin key is 401 even when a user token is sent too.
"""
from __future__ import annotations

import dataclasses
import hmac
from typing import Mapping

from errors import ServiceError
from settings import Settings
from upstream import account_key

NO_KEY = "No valid API key provided. Either provide X-Admin-API-Key or X-Replicate-API-Key header"
BAD_ADMIN = "Invalid admin API key"


@dataclasses.dataclass(frozen=True)
class Caller:
    token: str = dataclasses.field(repr=False)
    is_admin: bool

    @property
    def account(self) -> str:
        return account_key(self.token)


def is_admin_key(presented: str | None, settings: Settings) -> bool:
    if not settings.admin_api_key or not presented:
        return False
    return hmac.compare_digest(presented.encode(), settings.admin_api_key.encode())


def authenticate(headers: Mapping[str, str], settings: Settings) -> Caller:
    """The caller of a generation request; ServiceError 401 (or 503) otherwise."""
    admin = headers.get("X-Admin-API-Key")
    if admin is not None:
        if not is_admin_key(admin, settings):
            raise ServiceError(401, BAD_ADMIN)
        if not settings.replicate_api_token:
            raise ServiceError(503, "Admin access needs REPLICATE_API_TOKEN to be configured on the server")
        return Caller(settings.replicate_api_token, True)
    user = (headers.get("X-Replicate-API-Key") or "").strip()
    if user:
        return Caller(user, False)
    raise ServiceError(401, NO_KEY)


def require_admin(headers: Mapping[str, str], settings: Settings) -> None:
    if not is_admin_key(headers.get("X-Admin-API-Key"), settings):
        raise ServiceError(401, BAD_ADMIN if headers.get("X-Admin-API-Key") is not None
                           else "This endpoint needs the X-Admin-API-Key header")
