"""Service settings, read from the environment (and `.env`) once, when the app is created.

Every variable is validated at start-up; a bad value stops the service with a message that
names the variable and what it accepts.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping
from urllib.parse import urlparse


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


def _ranged(kind: type, low: float, high: float, noun: str) -> Callable[[str], Any]:
    def parse(text: str):
        value = kind(text)
        if not low <= value <= high:
            raise ValueError
        return value
    parse.accepts = f"{noun} from {low:g} to {high:g}"
    return parse


def _integer(low: int, high: int) -> Callable[[str], int]:
    return _ranged(int, low, high, "a whole number")


def _seconds(low: float, high: float) -> Callable[[str], float]:
    return _ranged(float, low, high, "a number of seconds")


def _text(text: str) -> str:
    return text.strip()
_text.accepts = "any text"


def _folder(text: str) -> str:
    # Absolute once, here: a relative path would otherwise mean the working directory to
    # some callers and the app's root folder to Flask's send_file.
    return os.path.abspath(text.strip())
_folder.accepts = "a folder path (a relative one is taken from the working directory at start-up)"


def _url(text: str) -> str:
    parsed = urlparse(text.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError
    return text.strip().rstrip("/")
_url.accepts = "an http(s) URL such as https://api.replicate.com"


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError
    return lowered in ("1", "true", "yes")
_boolean.accepts = "true or false"


def _unset_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, or None for an empty value (the setting is then derived from others)."""
    def parse_or_none(text: str):
        return None if not text.strip() else parse(text)
    parse_or_none.accepts = parse.accepts
    return parse_or_none


def _sync_request_reserve(threads: int) -> int:
    """Request threads kept free of synchronous generations, so /health, /status, /configure
    and /jobs answer under any load: an eighth of them, at least 2 (16 of 128)."""
    return max(2, threads // 8)


# (attribute, environment variable, default, parser)
TABLE: list[tuple[str, str, str, Callable[[str], Any]]] = [
    ("replicate_api_token", "REPLICATE_API_TOKEN", "", _text),
    ("admin_api_key", "CONCURRENT_DOCKER_ADMIN_API_KEY", "", _text),
    ("host", "FLASK_HOST", "0.0.0.0", _text),
    ("port", "FLASK_PORT", "5003", _integer(1, 65535)),
    ("concurrent_limit", "REPLICATE_CONCURRENT_LIMIT", "60", _integer(1, 5000)),
    ("requests_per_minute", "REPLICATE_REQUESTS_PER_MINUTE", "600", _integer(1, 100000)),
    ("reads_per_minute", "REPLICATE_READS_PER_MINUTE", "3000", _integer(1, 1000000)),
    ("rate_window", "REPLICATE_RATE_WINDOW_SECONDS", "60", _seconds(0.1, 3600)),
    ("base_url", "REPLICATE_BASE_URL", "https://api.replicate.com", _url),
    ("output_dir", "OUTPUT_DIR", "output", _folder),
    ("generation_timeout", "GENERATION_TIMEOUT", "300", _seconds(1, 86400)),
    ("batch_timeout", "BATCH_TIMEOUT", "600", _seconds(1, 86400)),
    ("max_batch_size", "MAX_BATCH_SIZE", "1000", _integer(1, 100000)),
    ("max_content_length", "MAX_CONTENT_LENGTH", str(16 * 1024 * 1024), _integer(1024, 1 << 30)),
    ("max_prompt_length", "MAX_PROMPT_LENGTH", "10000", _integer(1, 1000000)),
    ("prefer_wait", "REPLICATE_PREFER_WAIT_SECONDS", "60", _integer(0, 60)),
    ("create_attempts", "REPLICATE_CREATE_ATTEMPTS", "4", _integer(1, 50)),
    ("throttle_retries", "REPLICATE_THROTTLE_RETRIES", "20", _integer(0, 1000)),
    ("max_download_bytes", "MAX_DOWNLOAD_BYTES", str(100 * 1024 * 1024), _integer(1024, 1 << 34)),
    ("download_attempts", "DOWNLOAD_ATTEMPTS", "3", _integer(1, 20)),
    ("pool_timeout", "REPLICATE_POOL_TIMEOUT", "10", _seconds(0.1, 600)),
    ("session_cache_size", "UPSTREAM_SESSION_CACHE_SIZE", "64", _integer(1, 4096)),
    ("session_idle_seconds", "UPSTREAM_SESSION_IDLE_SECONDS", "600", _seconds(1, 86400)),
    ("jobs_db", "JOBS_DB", "", _text),
    ("job_timeout", "JOB_TIMEOUT", "3600", _seconds(1, 7 * 86400)),
    ("webhook_secret", "WEBHOOK_SECRET", "", _text),
    ("webhook_allow_private", "WEBHOOK_ALLOW_PRIVATE", "false", _boolean),
    ("webhook_attempts", "WEBHOOK_ATTEMPTS", "8", _integer(1, 50)),
    ("gunicorn_threads", "GUNICORN_THREADS", "128", _integer(3, 10000)),
    ("max_sync_requests", "MAX_SYNC_REQUESTS", "", _unset_or(_integer(1, 10000))),
]


@dataclasses.dataclass(frozen=True)
class Settings:
    replicate_api_token: str
    admin_api_key: str
    host: str
    port: int
    concurrent_limit: int
    requests_per_minute: int
    reads_per_minute: int
    rate_window: float
    base_url: str
    output_dir: str
    generation_timeout: float
    batch_timeout: float
    max_batch_size: int
    max_content_length: int
    max_prompt_length: int
    prefer_wait: int
    create_attempts: int
    throttle_retries: int
    max_download_bytes: int
    download_attempts: int
    pool_timeout: float
    session_cache_size: int
    session_idle_seconds: float
    jobs_db: str
    job_timeout: float
    webhook_secret: str
    webhook_allow_private: bool
    webhook_attempts: int
    gunicorn_threads: int
    max_sync_requests: int

    @classmethod
    def from_mapping(cls, source: Mapping[str, str]) -> "Settings":
        """Read every variable of TABLE from `source`; raise ConfigError on the first bad one."""
        values = {}
        for attribute, variable, default, parse in TABLE:
            raw = source.get(variable)
            raw = default if raw is None or str(raw).strip() == "" else str(raw)
            try:
                values[attribute] = parse(raw)
            except ValueError:
                shown = "(hidden)" if any(w in variable for w in ("TOKEN", "KEY", "SECRET")) else repr(raw)
                raise ConfigError(f"{variable}={shown} is not valid: expected {parse.accepts}") from None
        if not values["jobs_db"]:  # beside the files it describes (the same Docker volume)
            values["jobs_db"] = os.path.join(values["output_dir"], ".jobs.sqlite3")
        values["max_sync_requests"] = _max_sync_requests(values["max_sync_requests"], values["gunicorn_threads"])
        return cls(**values)

    @property
    def secrets(self) -> list[str]:
        return [s for s in (self.replicate_api_token, self.admin_api_key, self.webhook_secret) if s]

    def public(self) -> dict[str, Any]:
        """The settings a client may see (no token, no key)."""
        hidden = {"replicate_api_token", "admin_api_key", "webhook_secret"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in hidden}


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
