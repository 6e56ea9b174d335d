"""A webhook receiver for the benches (SPEC §11): an aiohttp app on its own thread and loop."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from bench.harness import free_port

SLOW_ANSWER_SECS = 5.0
SECRET = "bench-webhook-secret-0123456789"


class Receiver:
    """An HTTP receiver on its own thread and loop (so it never competes with the load's loop)."""

    def __init__(self, mode: str):
        """mode: "fast" (answers at once), "slow" (after SLOW_ANSWER_SECS) or "dead" (never)."""
        self.mode = mode
        self.port = free_port()
        self.received = 0
        self.ids: set[str] = set()  # X-IM-Event-Id of every POST (a redelivery counts once here)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()

    async def _serve(self) -> None:
        if self.mode == "dead":
            await asyncio.start_server(self._never_answer, "127.0.0.1", self.port)
            return
        app = web.Application()
        app.router.add_post("/hook", self._answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        self.ids.add(request.headers.get("X-IM-Event-Id", ""))
        if self.mode == "slow":
            await asyncio.sleep(SLOW_ANSWER_SECS)
        return web.Response(text="ok")

    async def _never_answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(3600)

    def start(self) -> str:
        self._thread.start()
        return f"http://127.0.0.1:{self.port}/hook"
