"""Replicate's HTTP API as the emulator serves it (`/v1/...`) and the output files."""
from __future__ import annotations

import asyncio
import time

from aiohttp import web

from . import catalog, media, schemas
from .emulator import (
    UPLOAD_LIMIT,
    base_url,
    emulator_of,
    ok_json,
    parse_duration,
    parse_wait,
    problem,
    read_json_body,
    throttled,
)
from .faults import decide, markers
from .state import new_id, now_iso

routes = web.RouteTableDef()
TOKEN = web.RequestKey("token", str)
NOT_FOUND = "The requested resource could not be found."
NO_SUCH_VERSION = "The specified version does not exist (or perhaps you don't have permission to use it?)"


@web.middleware
async def auth_and_limits(request: web.Request, handler):
    """Bearer auth and the non-create rate window for every `/v1/` call."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    emu = emulator_of(request)
    header = request.headers.get("Authorization", "")
    token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
    if not token or emu.token_state(token) == "invalid":
        return problem(401, "You did not pass a valid authentication token", title="Unauthenticated")
    request[TOKEN] = token
    is_create = request.method == "POST" and request.path.endswith("/predictions")
    if not is_create:
        wait = emu.windows.admit(("other", token), emu.faults.other_limit, emu.faults.window_s)
        if wait is not None:
            emu.stats.count("throttled_other", token)
            return throttled(wait, with_header=True)
    return await handler(request)


def _attempt(request: web.Request) -> None:
    """Every create that gets past auth counts, whatever its fate, so a test can prove that
    the service refused bad input without calling upstream at all."""
    emu, token = emulator_of(request), request[TOKEN]
    emu.stats.count("create_attempts", token)
    emu.stats.stamp(emu.stats.attempt_times, token)


def _ref(request: web.Request) -> str:
    return f"{request.match_info['owner']}/{request.match_info['name']}"


@routes.post("/v1/models/{owner}/{name}/predictions")
async def create_for_model(request: web.Request) -> web.StreamResponse:
    """Official models only; a community model must be run by version."""
    _attempt(request)
    model = catalog.MODELS.get(_ref(request))
    if model is None:
        return problem(404, NOT_FOUND)
    if not model.official:
        return problem(404, NO_SUCH_VERSION)
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    return await _create(request, model.latest, body)


@routes.post("/v1/predictions")
async def create_for_version(request: web.Request) -> web.StreamResponse:
    _attempt(request)
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    ref = body.get("version")
    if not isinstance(ref, str) or not ref:
        return problem(422, "- version: version is required\n", title="Input validation failed",
                       invalid_fields=[{"type": "required", "field": "version",
                                        "description": "version is required"}])
    try:
        version = catalog.version_for_ref(ref)
    except catalog.InvalidVersion:
        return problem(422, NO_SUCH_VERSION, title="Invalid version or not permitted")
    if version is None:
        return problem(404, NOT_FOUND)
    return await _create(request, version, body)


@routes.post("/v1/deployments/{owner}/{name}/predictions")
async def create_for_deployment(request: web.Request) -> web.StreamResponse:
    """Runs the version of the deployment's current release."""
    _attempt(request)
    deployment = catalog.DEPLOYMENTS.get(_ref(request))
    if deployment is None:
        return problem(404, NOT_FOUND)
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    return await _create(request, deployment.version, body, deployment=_ref(request))


def _throttle_create(request: web.Request, marks: dict) -> web.Response | None:
    emu, token = emulator_of(request), request[TOKEN]
    faults = emu.faults
    if decide(emu.rng, faults.create_429_rate, marks, "429"):
        return throttled(faults.storm_retry_after_s, with_header=True)
    if emu.token_state(token) == "low_credit":
        # Replicate's low-credit mode: 6 a minute, a burst of 1, retry_after in the body only.
        wait = emu.windows.admit(("create", token), 6, faults.window_s, spacing=faults.window_s / 6)
        return None if wait is None else throttled(wait, with_header=False)
    wait = emu.windows.admit(("create", token), faults.create_limit, faults.window_s)
    return None if wait is None else throttled(wait, with_header=True)


async def _create(request: web.Request, version: catalog.Version, body: dict,
                  deployment: str | None = None) -> web.StreamResponse:
    emu, token = emulator_of(request), request[TOKEN]
    if emu.token_state(token) == "no_credit":
        return problem(402, "You have insufficient credit to run this model. Go to "
                       "https://replicate.com/account/billing to purchase credit.",
                       title="Insufficient credit")
    data = body.get("input")
    marks = markers(data.get(version.main_input)) if isinstance(data, dict) else {}
    refused = _throttle_create(request, marks)
    if refused is not None:
        emu.stats.count("throttled", token)
        return refused
    if decide(emu.rng, emu.faults.create_5xx_rate, marks, "5xx"):
        emu.stats.count("errors_5xx", token)
        status = emu.rng.choice([500, 502, 503])
        return problem(status, "Internal server error", title="Server error")
    errors = schemas.validate(version.openapi_schema, version.properties, data, version.model)
    if errors:
        emu.stats.count("invalid", token)
        return problem(422, schemas.problem_detail(errors), title="Input validation failed",
                       invalid_fields=errors)
    cancel_after = None
    if "Cancel-After" in request.headers:
        cancel_after = parse_duration(request.headers["Cancel-After"])
        if cancel_after is None or cancel_after < emu.faults.cancel_after_min_s:
            return problem(400, "Cancel-After must be a duration of at least 5s, like 30s or 1h30m")
    p = emu.start(version, token, data, base_url(request), deployment)
    emu.stats.count("creates", token)
    emu.stats.stamp(emu.stats.create_times, token)
    if cancel_after is not None:
        p.tasks.append(asyncio.ensure_future(_abort_after(emu, p, cancel_after)))
    if decide(emu.rng, emu.faults.drop_rate, marks, "drop"):
        emu.stats.count("dropped", token)
        request.transport.abort()
        raise asyncio.CancelledError  # nothing may be written on the aborted connection
    return await _answer_with_wait(request, p)


async def _abort_after(emu, p, seconds: float) -> None:
    await asyncio.sleep(seconds)
    emu.cancel(p, "aborted" if p.status == "starting" else "canceled")


async def _answer_with_wait(request: web.Request, p) -> web.Response:
    wait = parse_wait(request.headers.get("Prefer", ""))
    headers = {}
    if wait is not None:
        headers["Preference-Applied"] = "wait" if wait == 60 else f"wait={wait}"
        try:
            await asyncio.wait_for(asyncio.shield(p.done.wait()), wait)
        except TimeoutError:
            pass
    return ok_json(p.to_json(base_url(request)), status=201, headers=headers)


def _owned(request: web.Request):
    p = emulator_of(request).predictions.get(request.match_info["id"])
    return p if p is not None and p.token == request[TOKEN] else None


@routes.get("/v1/predictions/{id}")
async def get_prediction(request: web.Request) -> web.Response:
    emu, p = emulator_of(request), _owned(request)
    emu.stats.count("polls", request[TOKEN])
    if p is None:
        return problem(404, "The requested resource could not be found.")
    emu.expire(p)
    return ok_json(p.to_json(base_url(request)))


@routes.post("/v1/predictions/{id}/cancel")
async def cancel_prediction(request: web.Request) -> web.Response:
    emu, p = emulator_of(request), _owned(request)
    emu.stats.count("cancels", request[TOKEN])
    if p is None:
        return problem(404, "The requested resource could not be found.")
    emu.cancel(p)
    return ok_json(p.to_json(base_url(request)))


@routes.get("/v1/predictions")
async def list_predictions(request: web.Request) -> web.Response:
    """The caller's predictions, newest first, 100 a page, paged with `next`."""
    emu, token = emulator_of(request), request[TOKEN]
    mine = [p for p in reversed(emu.predictions.values()) if p.token == token]
    try:
        start = max(0, int(request.query.get("cursor", "0")))
    except ValueError:
        return problem(400, "cursor must be an integer")
    page, base = mine[start:start + 100], base_url(request)
    for p in page:
        emu.expire(p)
    more = start + 100 < len(mine)
    return ok_json({"previous": None, "next": f"{base}/v1/predictions?cursor={start + 100}" if more else None,
                    "results": [p.to_json(base) for p in page]})


@routes.post("/v1/files")
async def upload_file(request: web.Request) -> web.Response:
    if (request.content_length or 0) > UPLOAD_LIMIT:
        return problem(413, "File is larger than 100 MB")
    try:
        form = await request.post()
    except ValueError:
        return problem(413, "File is larger than 100 MB")
    content = form.get("content")
    if content is None or not hasattr(content, "file"):
        return problem(422, "content is required")
    data = content.file.read()
    file_id = new_id()
    meta = {"id": file_id, "name": str(form.get("filename") or content.filename or "file"),
            "content_type": str(form.get("type") or content.content_type or "application/octet-stream"),
            "size": len(data), "etag": file_id[:16], "checksums": {}, "metadata": {},
            "created_at": now_iso(), "expires_at": None,
            "urls": {"get": f"{base_url(request)}/v1/files/{file_id}/download"}}
    emulator_of(request).uploads[file_id] = (data, meta)
    return ok_json(meta, status=201)


@routes.get("/v1/files/{id}/download")
async def download_upload(request: web.Request) -> web.Response:
    found = emulator_of(request).uploads.get(request.match_info["id"])
    if found is None:
        return problem(404, "The requested resource could not be found.")
    return web.Response(body=found[0], content_type=found[1]["content_type"])


@routes.get("/delivery/{pid}/{name}")
async def delivery(request: web.Request) -> web.StreamResponse:
    emu = emulator_of(request)
    key = f"{request.match_info['pid']}/{request.match_info['name']}"
    f = emu.files.get(key)
    if f is None or f.missing or time.monotonic() - f.created > emu.faults.output_ttl_s:
        emu.stats.count("downloads_404")
        return web.Response(status=404, text="Not Found")
    if f.data is None:  # not made while it ran (see Emulator._made_outputs)
        f.data = await asyncio.get_running_loop().run_in_executor(
            None, media.render_file, f.stamp, f.fmt, f.aspect_ratio)
        emu.stats.count("rendered_on_download")
    emu.stats.count("downloads")
    truncate = f.truncate or decide(emu.rng, emu.faults.truncate_rate, {}, "truncate")
    return await _send(request, f.data, truncate, emu.faults.download_bytes_per_s)


async def _send(request: web.Request, data: bytes, truncate: bool, rate: float) -> web.StreamResponse:
    content_type = media.CONTENT_TYPES[request.match_info["name"].rsplit(".", 1)[-1]]
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.content_length = len(data)
    await response.prepare(request)
    body = data[: len(data) // 2] if truncate else data
    chunk = max(1, int(rate / 10)) if rate else len(body) or 1
    for offset in range(0, len(body), chunk):
        await response.write(body[offset:offset + chunk])
        if rate:
            await asyncio.sleep(chunk / rate)
    if truncate:
        emulator_of(request).stats.count("truncated")
        request.transport.abort()
        raise asyncio.CancelledError
    await response.write_eof()
    return response
