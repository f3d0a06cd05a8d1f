"""Sealed tokens: with TOKEN_ENCRYPTION_KEY, the token of an unfinished user job is kept in
the journal encrypted (Fernet: AES-128-CBC with an HMAC-SHA256, from `cryptography`), so any
replica can finish the job without its owner; the journal erases it when the job ends.
Without the key nothing is stored, and the job waits for its owner's next call."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class TokenBox:
    def __init__(self, key: str | None) -> None:
        self._fernet = None
        if key:
            from cryptography.fernet import Fernet
            self._fernet = Fernet(key.encode())

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def seal(self, token: str) -> str | None:
        """The token encrypted (None without a key)."""
        return self._fernet.encrypt(token.encode()).decode() if self._fernet else None

    def open(self, sealed: str | None) -> str | None:
        """The token, or None (no key, nothing sealed, or sealed with another key)."""
        if not sealed or not self._fernet:
            return None
        from cryptography.fernet import InvalidToken
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            log.warning("a sealed job token does not open with TOKEN_ENCRYPTION_KEY (was the key changed?)")
            return None
