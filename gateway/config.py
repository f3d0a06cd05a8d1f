"""Service settings: read from the environment (and `.env`) once, when the app is created.

Each setting is declared once, as a field of `Settings` with its variable, default and
parser. Every variable is validated at start-up; a bad value stops the service with a
message that names the variable and what it accepts (secret values are never echoed).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlparse

from dotenv import dotenv_values


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


def read_environment() -> dict[str, str]:
    """`.env` values, overridden by the real environment."""
    return {**{k: v for k, v in dotenv_values(".env").items() if v is not None}, **os.environ}


@dataclasses.dataclass(frozen=True)
class Parser:
    """Turns a variable's text into a value; `accepts` says what it takes, for errors."""

    parse: Callable[[str], Any]
    accepts: str

    def __call__(self, text: str) -> Any:
        return self.parse(text)


def _ranged(kind: type, low: float, high: float, noun: str) -> Parser:
    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise ValueError
        return value
    return Parser(parse, f"{noun} from {low:g} to {high:g}")


def integer(low: int, high: int) -> Parser:
    return _ranged(int, low, high, "a whole number")


def seconds(low: float, high: float) -> Parser:
    return _ranged(float, low, high, "a number of seconds")


def _checked_url(text: str) -> str:
    parsed = urlparse(text.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError
    return text.strip().rstrip("/")


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError
    return lowered in ("1", "true", "yes")


def unset_or(parser: Parser) -> Parser:
    """`parser`, or None for an empty value (the setting is then derived from others)."""
    return Parser(lambda text: None if not text.strip() else parser(text), parser.accepts)


TEXT = Parser(str.strip, "any text")
# Absolute once, here: a relative path would otherwise mean the working directory to some
# callers and the app's root folder to Flask's send_file.
FOLDER = Parser(lambda text: os.path.abspath(text.strip()),
                "a folder path (a relative one is taken from the working directory at start-up)")
URL = Parser(_checked_url, "an http(s) URL such as https://api.replicate.com")
BOOLEAN = Parser(_boolean, "true or false")


def choice(*values: str) -> Parser:
    def parse(text: str) -> str:
        if text.strip().lower() not in values:
            raise ValueError
        return text.strip().lower()
    return Parser(parse, "one of " + ", ".join(values))


def _prices(text: str) -> dict[str, dict[str, float]]:
    """`{"flux-dev": {"per_output": 0.025}, "x/y": {"per_second": 0.001}}`: per model, any of
    per_run, per_output, per_second, each a finite number from 0."""
    if not text.strip():
        return {}
    prices = json.loads(text)  # a JSONDecodeError is a ValueError
    if not isinstance(prices, dict):
        raise ValueError
    for price in prices.values():
        if not isinstance(price, dict) or not price or set(price) - {"per_run", "per_output", "per_second"}:
            raise ValueError
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf
               for v in price.values()):
            raise ValueError
    return prices


PRICES = Parser(_prices, 'a JSON object of model -> prices, such as {"flux-dev": {"per_output": 0.025}} '
                "(per_run, per_output and per_second, in dollars)")


def _redis_url(text: str) -> str:
    parsed = urlparse(text.strip())
    if parsed.scheme not in ("redis", "rediss", "unix") or (parsed.scheme != "unix" and not parsed.hostname):
        raise ValueError
    return text.strip()


def _key_prefix(text: str) -> str:
    if not text.strip() or any(c in text.strip() for c in "{}: \t\r\n"):
        raise ValueError
    return text.strip()


REDIS_URL = Parser(_redis_url, "a redis://, rediss:// or unix:// URL such as redis://127.0.0.1:6379/0")
KEY_PREFIX = Parser(_key_prefix, "a non-empty name without spaces, colons or braces")


def _long_secret(text: str) -> str:
    if len(text.strip()) < 16:  # a short key is guessable
        raise ValueError
    return text.strip()


def _globs(text: str) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise ValueError
    return patterns


SECRET = Parser(_long_secret, "a secret of at least 16 characters")
GLOBS = Parser(_globs, "comma-separated patterns over Replicate names, such as black-forest-labs/*,qwen/qwen-image")


def _postgres_url(text: str) -> str:
    parsed = urlparse(text.strip())
    if parsed.scheme not in ("postgresql", "postgres") or not parsed.hostname or not parsed.path.strip("/"):
        raise ValueError
    return text.strip()


def _fernet_key(text: str) -> str:
    try:  # what Fernet.generate_key() makes: 32 bytes in URL-safe base64
        if len(base64.urlsafe_b64decode(text.strip().encode())) != 32:
            raise ValueError
    except binascii.Error:
        raise ValueError from None
    return text.strip()


POSTGRES_URL = Parser(_postgres_url, "a postgresql://user:password@host:5432/database URL")
FERNET_KEY = Parser(_fernet_key, "a Fernet key (32 bytes in URL-safe base64, as Fernet.generate_key() makes)")


def setting(variable: str, default: str, parser: Parser, secret: bool = False) -> Any:
    """Declare a setting: the dataclass field carries its variable, default and parser."""
    return dataclasses.field(repr=not secret,  # a logged Settings never shows a secret
                             metadata={"variable": variable, "default": default, "parser": parser, "secret": secret})


@dataclasses.dataclass(frozen=True)
class Settings:
    replicate_api_token: str = setting("REPLICATE_API_TOKEN", "", TEXT, secret=True)
    admin_api_key: str = setting("CONCURRENT_DOCKER_ADMIN_API_KEY", "", TEXT, secret=True)
    host: str = setting("FLASK_HOST", "0.0.0.0", TEXT)
    port: int = setting("FLASK_PORT", "5003", integer(1, 65535))
    concurrent_limit: int = setting("REPLICATE_CONCURRENT_LIMIT", "60", integer(1, 5000))
    requests_per_minute: int = setting("REPLICATE_REQUESTS_PER_MINUTE", "600", integer(1, 100000))
    reads_per_minute: int = setting("REPLICATE_READS_PER_MINUTE", "3000", integer(1, 1000000))
    rate_window: float = setting("REPLICATE_RATE_WINDOW_SECONDS", "60", seconds(0.1, 3600))
    base_url: str = setting("REPLICATE_BASE_URL", "https://api.replicate.com", URL)
    output_dir: str = setting("OUTPUT_DIR", "output", FOLDER)
    generation_timeout: float = setting("GENERATION_TIMEOUT", "300", seconds(1, 86400))
    batch_timeout: float = setting("BATCH_TIMEOUT", "600", seconds(1, 86400))
    max_batch_size: int = setting("MAX_BATCH_SIZE", "1000", integer(1, 100000))
    max_content_length: int = setting("MAX_CONTENT_LENGTH", str(16 * 1024 * 1024), integer(1024, 1 << 30))
    max_prompt_length: int = setting("MAX_PROMPT_LENGTH", "10000", integer(1, 1000000))
    log_level: str = setting("LOG_LEVEL", "info", choice("debug", "info", "warning", "error", "critical"))
    log_format: str = setting("LOG_FORMAT", "text", choice("text", "json"))
    metrics_require_key: bool = setting("METRICS_REQUIRE_KEY", "false", BOOLEAN)
    model_prices: dict = setting("MODEL_PRICES", "", PRICES)
    prefer_wait: int = setting("REPLICATE_PREFER_WAIT_SECONDS", "60", integer(0, 60))
    create_attempts: int = setting("REPLICATE_CREATE_ATTEMPTS", "4", integer(1, 50))
    throttle_retries: int = setting("REPLICATE_THROTTLE_RETRIES", "20", integer(0, 1000))
    max_download_bytes: int = setting("MAX_DOWNLOAD_BYTES", str(100 * 1024 * 1024), integer(1024, 1 << 34))
    download_attempts: int = setting("DOWNLOAD_ATTEMPTS", "3", integer(1, 20))
    pool_timeout: float = setting("REPLICATE_POOL_TIMEOUT", "10", seconds(0.1, 600))
    session_cache_size: int = setting("UPSTREAM_SESSION_CACHE_SIZE", "64", integer(1, 4096))
    session_idle_seconds: float = setting("UPSTREAM_SESSION_IDLE_SECONDS", "600", seconds(1, 86400))
    jobs_db: str = setting("JOBS_DB", "", TEXT)
    job_timeout: float = setting("JOB_TIMEOUT", "3600", seconds(1, 7 * 86400))
    database_url: str | None = setting("DATABASE_URL", "", unset_or(POSTGRES_URL), secret=True)
    claim_lease_seconds: float = setting("CLAIM_LEASE_SECONDS", "30", seconds(1, 3600))
    token_encryption_key: str | None = setting("TOKEN_ENCRYPTION_KEY", "", unset_or(FERNET_KEY), secret=True)
    job_retention_days: float = setting("JOB_RETENTION_DAYS", "30", _ranged(float, 0, 36500, "a number of days"))
    delete_files_with_jobs: bool = setting("DELETE_FILES_WITH_JOBS", "false", BOOLEAN)
    webhook_secret: str = setting("WEBHOOK_SECRET", "", TEXT, secret=True)
    webhook_allow_private: bool = setting("WEBHOOK_ALLOW_PRIVATE", "false", BOOLEAN)
    webhook_attempts: int = setting("WEBHOOK_ATTEMPTS", "8", integer(1, 50))
    file_url_secret: str | None = setting("FILE_URL_SECRET", "", unset_or(SECRET), secret=True)
    file_url_ttl: int = setting("FILE_URL_TTL", "86400", integer(1, 366 * 86400))
    public_base_url: str | None = setting("PUBLIC_BASE_URL", "", unset_or(URL))
    allowed_models: tuple[str, ...] = setting("ALLOWED_MODELS", "*", GLOBS)
    # Shared limits: unset, every limit lives in this process (one gunicorn worker only).
    redis_url: str | None = setting("REDIS_URL", "", unset_or(REDIS_URL), secret=True)
    redis_prefix: str = setting("REDIS_PREFIX", "rcg", KEY_PREFIX)
    lease_seconds: float = setting("LEASE_SECONDS", "30", seconds(1, 3600))
    gunicorn_workers: int = setting("GUNICORN_WORKERS", "1", integer(1, 64))
    gunicorn_threads: int = setting("GUNICORN_THREADS", "128", integer(3, 10000))
    max_sync_requests: int = setting("MAX_SYNC_REQUESTS", "", unset_or(integer(1, 10000)))
    models_file: str = setting("MODELS_FILE", "", TEXT)
    model_schema_ttl: float = setting("MODEL_SCHEMA_TTL", "3600", seconds(0, 30 * 86400))

    @classmethod
    def from_mapping(cls, source: Mapping[str, str]) -> Settings:
        """Read every declared variable from `source`; raise ConfigError on the first bad one."""
        values = {field.name: _read(field, source) for field in dataclasses.fields(cls)}
        if not values["jobs_db"]:  # beside the files it describes (the same Docker volume)
            values["jobs_db"] = os.path.join(values["output_dir"], ".jobs.sqlite3")
        values["max_sync_requests"] = _max_sync_requests(values["max_sync_requests"], values["gunicorn_threads"])
        return cls(**values)

    @property
    def secrets(self) -> list[str]:
        """The configured secret values (for the log redactor), and DATABASE_URL's password
        on its own (as written and percent-decoded), since a driver may quote it alone."""
        values = [getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.metadata["secret"] and getattr(self, f.name)]
        password = urlparse(self.database_url).password if self.database_url else None
        return values + ([password, unquote(password)] if password else [])


def _read(field: dataclasses.Field, source: Mapping[str, str]) -> Any:
    meta = field.metadata
    raw = source.get(meta["variable"])
    raw = meta["default"] if raw is None or str(raw).strip() == "" else str(raw)
    try:
        return meta["parser"](raw)
    except ValueError:
        shown = "(hidden)" if meta["secret"] else repr(raw)
        raise ConfigError(f"{meta['variable']}={shown} is not valid: expected {meta['parser'].accepts}") from None


def _sync_request_reserve(threads: int) -> int:
    """Request threads kept free of synchronous generations, so /health, /status, /configure
    and /jobs answer under any load: an eighth of them, at least 2 (16 of 128)."""
    return max(2, threads // 8)


def _max_sync_requests(configured: int | None, threads: int) -> int:
    """Synchronous generations hold a request thread for up to their timeout: fewer of them
    than threads, or a flood of them leaves none for /health and /configure."""
    if configured is None:
        return threads - _sync_request_reserve(threads)
    if configured >= threads:
        raise ConfigError(f"MAX_SYNC_REQUESTS={configured} is not valid: expected fewer than "
                          f"GUNICORN_THREADS ({threads}), so that /health, /status and /configure "
                          "keep a request thread")
    return configured
