"""The emulator's HTTP API: Replicate's endpoints under /v1, output files under /delivery,
and the control API under /_emulator."""
from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from typing import Any

from aiohttp import web

from . import catalog, media, outputs
from .faults import Faults, decide, markers
from .state import OutputFile, Prediction, Stats, Windows, new_id, now_iso

JSON_TYPE = "application/json"
TOKEN_STATES = ("valid", "invalid", "no_credit", "low_credit")
CANCEL_AFTER = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")
UPLOAD_LIMIT = 100 * 1024 * 1024


def problem(status: int, detail: str, title: str | None = None, headers: dict | None = None,
            **extra: Any) -> web.Response:
    body = {"detail": detail, "status": status, **extra}
    if title:
        body["title"] = title
    return web.Response(status=status, text=json.dumps(body), headers=headers,
                        content_type="application/problem+json")


def ok_json(body: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), headers=headers,
                        content_type=JSON_TYPE, charset="UTF-8")


def throttled(seconds: float, with_header: bool) -> web.Response:
    wait = max(1, math.ceil(seconds))
    headers = {"Retry-After": str(wait)} if with_header else None
    return problem(429, f"Request was throttled. Your rate limit resets in ~{wait}s.",
                   headers=headers, retry_after=wait)


def parse_wait(header: str) -> int | None:
    for part in header.split(","):
        part = part.strip()
        if part == "wait":
            return 60
        match = re.fullmatch(r"wait=(\d+)", part)
        if match:
            return min(60, max(1, int(match.group(1))))
    return None


def parse_duration(text: str) -> float | None:
    match = CANCEL_AFTER.fullmatch(text.strip())
    if not text.strip() or not match:
        return None
    h, m, s = match.groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0)


class Emulator:
    """All state of one emulator; lives on one event loop."""

    def __init__(self, faults: Faults | None = None, seed: int | None = None,
                 accept_any_token: bool = True) -> None:
        self.initial_faults = faults or Faults()
        self.faults = Faults(**self.initial_faults.as_dict())
        self.rng = random.Random(seed)
        self.accept_any_token = accept_any_token
        self.token_states: dict[str, str] = {}
        self.predictions: dict[str, Prediction] = {}
        self.files: dict[str, OutputFile] = {}
        self.uploads: dict[str, tuple[bytes, dict]] = {}
        self.windows = Windows()
        self.stats = Stats()

    def token_state(self, token: str) -> str:
        return self.token_states.get(token, "valid" if self.accept_any_token else "invalid")

    def reset(self, faults: bool = True) -> None:
        for p in self.predictions.values():
            for task in p.tasks:
                task.cancel()
        self.predictions.clear()
        self.files.clear()
        self.uploads.clear()
        self.windows = Windows()
        self.stats = Stats()
        if faults:
            self.faults = Faults(**self.initial_faults.as_dict())

    # -- lifecycle -------------------------------------------------------------
    def start(self, version: catalog.Version, token: str, data: dict, base: str,
              deployment: str | None = None) -> Prediction:
        marks = markers(data.get(version.main_input))
        p = Prediction(id=new_id(), model=version.model, token=token, input=data, version=version,
                       official=catalog.MODELS[version.model].official, deployment=deployment)
        p.base = base
        p.seed = data.get("seed") if data.get("seed") is not None else self.rng.randrange(2**31)
        latency = float(marks["latency"]) if marks.get("latency") else self.faults.sample_latency(self.rng)
        hang = decide(self.rng, self.faults.hang_rate, marks, "hang")
        fail = decide(self.rng, self.faults.fail_rate, marks, "fail")
        self.predictions[p.id] = p
        self.stats.started(token)
        p.tasks.append(asyncio.ensure_future(self._run(p, latency, hang, fail, marks)))
        return p

    async def _run(self, p: Prediction, latency: float, hang: bool, fail: bool, marks: dict) -> None:
        """starting -> processing -> final. Markers `[[abort]]`, `[[cancel]]`, `[[empty]]`
        and `[[early_output]]` produce the odd endings a real upstream can show."""
        try:
            start_delay = min(self.faults.start_delay_s, latency)
            await asyncio.sleep(start_delay)
            if "abort" in marks:
                return self.finish(p, "aborted")
            p.status, p.started_at, p.started_t = "processing", now_iso(), time.monotonic()
            p.logs = f"Using seed: {p.seed}\n"
            if "early_output" in marks:  # output visible while still processing
                p.output = self._outputs(p, marks)
            if hang:
                await asyncio.Event().wait()
            processing, made, files = max(0.0, latency - start_delay), None, []
            if not (fail or p.output is not None or {"cancel", "empty"} & marks.keys()):
                # Its files are made while it runs, as a model makes them: when Replicate says
                # `succeeded` the files are on its CDN, and a download is a plain read. Made
                # halfway through, away from a wave's bursts of creates and endings; the run
                # takes its latency either way (or the rendering's time, if that is longer).
                began = time.monotonic()
                await asyncio.sleep(processing / 2)
                made, files = await self._made_outputs(p, marks)  # shown once it has succeeded
                processing -= time.monotonic() - began
            await asyncio.sleep(max(0.0, processing))
            if fail:
                self.finish(p, "failed", error="Prediction failed: injected failure")
            elif "cancel" in marks:
                self.finish(p, "canceled")
            elif "empty" in marks:
                self.finish(p, "succeeded", output=[] if outputs.shape(p.version) == "list" else None)
            else:
                output = p.output or made
                for f in files:  # their time to live runs from the end, as for any output
                    f.created = time.monotonic()
                self.finish(p, "succeeded", output=output if output is not None else self._outputs(p, marks))
        except asyncio.CancelledError:
            pass

    def finish(self, p: Prediction, status: str, output: Any = None, error: str | None = None) -> None:
        if p.final:
            return
        p.status, p.output, p.error = status, output if status == "succeeded" else None, error
        p.completed_at, p.completed_t = now_iso(), time.monotonic()
        if p.started_t is not None:
            p.predict_time = round(p.completed_t - p.started_t, 6)
        p.logs += f"Prediction {status}\n"
        self.stats.finished(p.token)
        p.done.set()
        current = asyncio.current_task()
        for task in p.tasks:
            if task is not current:
                task.cancel()

    async def _made_outputs(self, p: Prediction, marks: dict) -> tuple[Any, list[OutputFile]]:
        """The output and its files, rendered now (in a worker thread)."""
        output, files = self._planned_outputs(p, marks)
        loop = asyncio.get_running_loop()
        for f in files:
            if not f.missing:
                f.data = await loop.run_in_executor(None, media.render_file, f.stamp, f.fmt, f.aspect_ratio)
                self.stats.count("rendered_while_running")
        return output, files

    def _outputs(self, p: Prediction, marks: dict) -> Any:
        """The output, its files registered and rendered on first download (an output seen
        before the prediction ends, or one no run made: `[[early_output]]`, an ending forced
        from outside)."""
        return self._planned_outputs(p, marks)[0]

    def _planned_outputs(self, p: Prediction, marks: dict) -> tuple[Any, list[OutputFile]]:
        """The output the version's Output schema describes, and its files (registered here)."""
        kind, planned = outputs.plan(p.version, p.input, p.seed)
        if kind == "text":
            return media.text(planned[0][2]), []
        urls, files = {}, []
        for name, fmt, stamp in planned:
            key = f"{p.id}/{name}.{fmt}"
            files.append(OutputFile(
                stamp=stamp, fmt=fmt, aspect_ratio=stamp["aspect_ratio"], created=time.monotonic(),
                missing=decide(self.rng, self.faults.output_404_rate, marks, "404"),
                truncate="truncate" in marks))
            self.files[key] = files[-1]
            urls[name] = f"{p.base}/delivery/{key}"
        if kind == "object":
            return urls, files
        return (list(urls.values()) if kind == "list" else urls["out-0"]), files

    def expire(self, p: Prediction) -> None:
        if p.completed_t and time.monotonic() - p.completed_t > self.faults.output_ttl_s:
            p.data_removed = True

    def cancel(self, p: Prediction, status: str = "canceled") -> None:
        if not p.final:
            self.stats.canceled_ids.append(p.id)
            self.finish(p, status)


EMULATOR_KEY = web.AppKey("emulator", Emulator)


def emulator_of(request: web.Request) -> Emulator:
    return request.app[EMULATOR_KEY]


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


async def read_json_body(request: web.Request) -> dict | web.Response:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return problem(400, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return problem(400, "The request body must be a JSON object.")
    return body
