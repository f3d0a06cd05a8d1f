"""One error type, answered as `{"error": "..."}` JSON in one place.

    ServiceError            an answer for the client: status, message, extra fields, headers
    werkzeug HTTPException  404/405/413/415 from routing and body limits, answered the same way
    anything else           logged with its traceback (secrets redacted), answered a fixed 500
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error a client should see: an HTTP status, a message, and optional extra fields."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError):
        return jsonify(error.body()), error.status, error.headers

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        message = error.description or error.name
        if error.code == 413:
            message = f"Request body too large: the limit is {app.config['MAX_CONTENT_LENGTH']} bytes"
        response = jsonify({"error": message})
        if error.code == 405 and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response, error.code

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        # The traceback goes to the log (secrets redacted there); the client gets a fixed text.
        log.exception("unhandled error")
        return jsonify({"error": "Internal server error"}), 500
