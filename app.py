"""The Flask application: `gunicorn app:app` (production) or `python app.py` (development).

The service lives in the `gateway` package (see README, "How it works"); this module is
where a user looks for it. `app` is built on first access, so importing this module builds
nothing; gunicorn starts and stops it from its worker hooks (gunicorn.conf.py).
"""
from __future__ import annotations

import atexit
import logging
import sys

from flask import Flask

from gateway.app import create_app, start, stop
from gateway.config import ConfigError
from gateway.logs import configure as configure_logging

__all__ = ["create_app", "start", "stop"]


def build_or_exit() -> Flask:
    """The app from the environment, or exit 2 with a message naming the bad setting."""
    try:
        return create_app()
    except ConfigError as exc:
        logging.getLogger("startup").error("%s", exc)
        sys.exit(2)


def __getattr__(name: str) -> Flask:
    """`app.app` is built on first access (PEP 562), so `gunicorn app:app` gets an app while
    importing this module (as tests do) builds nothing."""
    if name != "app":
        raise AttributeError(name)
    built = globals()["app"] = build_or_exit()
    return built


if __name__ == "__main__":
    configure_logging()  # text until the settings are read (a bad one is reported here)
    application = build_or_exit()
    settings = application.extensions["gateway"].settings
    configure_logging(settings.log_level, settings.log_format)
    start(application)
    atexit.register(stop, application)
    application.run(host=settings.host, port=settings.port, threaded=True)
