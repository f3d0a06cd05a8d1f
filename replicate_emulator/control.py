"""The control API under `/_emulator/`: faults, token states, statistics, reset."""
from __future__ import annotations

import time

from aiohttp import web

from .emulator import TOKEN_STATES, emulator_of, ok_json, problem, read_json_body

routes = web.RouteTableDef()


@routes.get("/_emulator/health")
async def health(request: web.Request) -> web.Response:
    return ok_json({"status": "ok"})


@routes.get("/_emulator/faults")
async def get_faults(request: web.Request) -> web.Response:
    return ok_json(emulator_of(request).faults.as_dict())


@routes.patch("/_emulator/faults")
async def patch_faults(request: web.Request) -> web.Response:
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        emulator_of(request).faults.update(body)
    except ValueError as exc:
        return problem(400, str(exc))
    return ok_json(emulator_of(request).faults.as_dict())


@routes.put("/_emulator/tokens/{token}")
async def set_token(request: web.Request) -> web.Response:
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    state = body.get("state")
    if state not in TOKEN_STATES:
        return problem(400, f"state must be one of {list(TOKEN_STATES)}")
    emulator_of(request).token_states[request.match_info["token"]] = state
    return ok_json({"token": request.match_info["token"], "state": state})


@routes.get("/_emulator/stats")
async def stats(request: web.Request) -> web.Response:
    emu = emulator_of(request)
    return ok_json({**emu.stats.as_dict(), "now": round(time.monotonic() - emu.stats.epoch, 6)})


@routes.get("/_emulator/predictions")
async def predictions(request: web.Request) -> web.Response:
    emu = emulator_of(request)
    return ok_json([{"id": p.id, "token": p.token, "model": p.model, "status": p.status,
                     "version": p.version.id if p.version else None, "deployment": p.deployment,
                     "input": p.input, "created_t": round(p.created_t - emu.stats.epoch, 6),
                     "completed_t": None if p.completed_t is None else round(p.completed_t - emu.stats.epoch, 6)}
                    for p in emu.predictions.values()])


@routes.post("/_emulator/reset")
async def reset(request: web.Request) -> web.Response:
    """Forget every prediction, file, window and counter; faults back to start-up values
    unless the body says `{"faults": false}`."""
    body = await read_json_body(request) if request.can_read_body else {}
    if isinstance(body, web.Response):
        return body
    emu = emulator_of(request)
    emu.reset(faults=body.get("faults", True) is not False)
    emu.token_states.clear()
    return ok_json({"status": "reset"})
