"""What operators use: request ids, /metrics, /ready, /openapi.json and /docs.

Every request gets an id: the caller's `X-Request-ID` when it is a plain token
(`[A-Za-z0-9._-]{1,128}`), else a new one. It is set in the log context before anything
else runs (see gateway/logs.py), answered in the `X-Request-ID` header, and added to every
error body (`request_id`), whichever code made the error.
"""
from __future__ import annotations

import json
import time

from flask import Blueprint, Response, g, jsonify, request, send_file
from swagger_ui_bundle import swagger_ui_path

from gateway import logs
from gateway.api.auth import require_admin
from gateway.api.openapi import document
from gateway.errors import ServiceError
from gateway.state import gateway_state

bp = Blueprint("operations", __name__)
HEADER = "X-Request-ID"
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
ASSETS = {
    "swagger-ui.css": (swagger_ui_path / "swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": (swagger_ui_path / "swagger-ui-bundle.js", "text/javascript"),
    "favicon-32x32.png": (swagger_ui_path / "favicon-32x32.png", "image/png"),
}
OWN_ASSETS = {"docs.js": "text/javascript"}
# The page loads only what this service serves: no CDN, no inline script.
DOCS_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Replicate Concurrent Generation API</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
</head>
<body>
<noscript>This page needs JavaScript; the document itself is at <a href="openapi.json">/openapi.json</a>.</noscript>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/docs.js"></script>
</body>
</html>
"""


@bp.before_app_request
def begin() -> None:
    g.request_id = logs.request_id_from(request.headers.get(HEADER))
    g.started = time.perf_counter()
    logs.begin_request(g.request_id)


@bp.after_app_request
def finish(response: Response) -> Response:
    request_id = g.get("request_id") or logs.request_id_from(None)
    response.headers[HEADER] = request_id
    if response.status_code >= 400 and response.is_json:
        body = response.get_json(silent=True)
        if isinstance(body, dict) and "error" in body and "request_id" not in body:
            body["request_id"] = request_id
            response.set_data(json.dumps(body, ensure_ascii=False) + "\n")
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method = request.method if request.method in METHODS else "other"
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    gateway_state().metrics.request_answered(endpoint, method, response.status_code, seconds)
    return response


@bp.get("/metrics")
def metrics():
    state = gateway_state()
    if state.settings.metrics_require_key:
        require_admin(request.headers, state.settings)
    body, content_type = state.metrics.render()
    return Response(body, content_type=content_type)


@bp.get("/ready")
def ready():
    ready_now, checks = gateway_state().readiness.report()
    if ready_now:
        return jsonify({"status": "ready", "checks": checks})
    reasons = "; ".join(answer for answer in checks.values() if answer != "ok")
    return jsonify({"status": "not ready", "checks": checks, "error": f"Not ready: {reasons}"}), 503, {
        "Retry-After": "5"}


@bp.get("/openapi.json")
def openapi():
    return jsonify(document(gateway_state().settings))


@bp.get("/docs")
def docs():
    return Response(DOCS_PAGE, content_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": DOCS_POLICY, "X-Content-Type-Options": "nosniff"})


@bp.get("/docs/assets/<name>")
def docs_asset(name: str):
    if name in OWN_ASSETS:
        path, kind = bp.root_path + f"/docs_assets/{name}", OWN_ASSETS[name]
    elif name in ASSETS:
        path, kind = ASSETS[name]
    else:
        raise ServiceError(404, "No such asset")
    response = send_file(path, mimetype=kind, max_age=86400)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
