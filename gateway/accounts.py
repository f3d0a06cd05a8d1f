"""Who pays: a caller runs on a Replicate token, and an account is known by its token's hash."""
from __future__ import annotations

import dataclasses
import hashlib


def account_key(token: str) -> str:
    """What identifies an account internally: a hash, so the token itself is not spread."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Caller:
    """The token a request runs on, and whether it came with the admin key."""

    token: str = dataclasses.field(repr=False)
    is_admin: bool

    @property
    def account(self) -> str:
        return account_key(self.token)

    @property
    def owner(self) -> str:
        """Who owns the jobs this caller makes: "admin", or the account's hash."""
        return "admin" if self.is_admin else f"user:{self.account}"
