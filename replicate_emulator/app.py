"""Builds the emulator's aiohttp application and runs it, in this thread or another."""
from __future__ import annotations

import asyncio
import logging
import threading

from aiohttp import web

from . import api, catalog_api, control
from .emulator import EMULATOR_KEY, Emulator

log = logging.getLogger(__name__)


def create_app(emulator: Emulator) -> web.Application:
    app = web.Application(middlewares=[api.auth_and_limits], client_max_size=110 * 1024 * 1024)
    app[EMULATOR_KEY] = emulator
    app.add_routes(api.routes)
    app.add_routes(catalog_api.routes)
    app.add_routes(control.routes)
    return app


async def _start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    # No access log: at a thousand requests a second it would cost more than the emulation.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # A deep backlog so a thousand clients can connect at once.
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class EmulatorServer:
    """The emulator on its own event loop in a background thread (for tests and demos).

    `with EmulatorServer() as emu:` starts it on a free loopback port; `emu.url` is the base
    URL to give the service or the `replicate` client.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, emulator: Emulator | None = None) -> None:
        self.host, self.port = host, port
        self.emulator = emulator or Emulator()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulator", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmulatorServer:
        self._thread.start()

        async def build():
            return await _start_site(create_app(self.emulator), self.host, self.port)

        self._runner, self.port = asyncio.run_coroutine_threadsafe(build(), self._loop).result(10)
        return self

    def call(self, fn, *args):
        """Run `fn(*args)` on the emulator's loop and return its result (for tests)."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(emulator: Emulator, host: str, port: int) -> None:
    """Serve in the foreground until interrupted."""
    async def main():
        runner, bound = await _start_site(create_app(emulator), host, port)
        log.info("Replicate emulator listening on http://%s:%d", host, bound)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
