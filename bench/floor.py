"""The framework's floor: what a bare Tornado process spends per message of s1's shape, no IM server.

A child process serves POST /send: parse the JSON body, write it as a WebSocket frame to the
recipient's open socket, answer 200 with a small JSON body. No database, auth, audit or webhooks.
The load is s1's: one aiohttp keep-alive pool, C requests in flight, R recipients connected by
WebSocket, M messages. The figure to compare with s1's server µs per message is `server_us_per_msg`:
whatever the IM server spends beyond it is ours to cut; below it is Tornado and asyncio.

    .venv/bin/python -m bench.floor --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp
import psutil

from bench.harness import free_port, latency_figures


def serve(port: int) -> None:
    """The child: a Tornado app as bare as the shape of a send allows."""
    import tornado.ioloop
    import tornado.web
    import tornado.websocket

    sockets: dict[str, tornado.websocket.WebSocketHandler] = {}

    class Socket(tornado.websocket.WebSocketHandler):
        def open(self, user: str) -> None:
            self.user = user
            sockets[user] = self

        def on_close(self) -> None:
            sockets.pop(self.user, None)

    class Send(tornado.web.RequestHandler):
        def post(self) -> None:
            body = json.loads(self.request.body)
            sockets[body["to"]].write_message(json.dumps({"type": "message", "data": body}))
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"ok": True, "to": body["to"]}))

    tornado.web.Application([(r"/send", Send), (r"/ws/(\w+)", Socket)]).listen(port, "127.0.0.1")
    tornado.ioloop.IOLoop.current().start()


async def one_run(
    port: int, server: psutil.Process, messages: int, recipients: int, concurrency: int
) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    # The sockets get a session of their own: each holds its connection, the pool is for the POSTs.
    async with (
        aiohttp.ClientSession() as ws_session,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http,
    ):
        sockets = [await ws_session.ws_connect(f"{base}/ws/p{i}") for i in range(recipients)]
        received = 0

        # Latency as s1 measures it: from the POST's start to the frame's arrival at the recipient.
        latencies: list[float] = []

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            nonlocal received
            async for frame in ws:
                received += 1
                latencies.append(time.perf_counter() - json.loads(frame.data)["data"]["sentAt"])

        readers = [asyncio.create_task(read(ws)) for ws in sockets]
        next_index = iter(range(messages))

        async def sender() -> None:
            for i in next_index:
                body = {"to": f"p{i % recipients}", "contentType": 1, "content": f"floor {i}"}
                body["sentAt"] = time.perf_counter()
                async with http.post(f"{base}/send", json=body) as answer:
                    await answer.read()

        cpu0 = sum(server.cpu_times()[:2])
        wall0 = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        while received < messages and time.perf_counter() - wall0 < 30:
            await asyncio.sleep(0.005)
        wall = time.perf_counter() - wall0
        cpu = sum(server.cpu_times()[:2]) - cpu0
        for ws in sockets:
            await ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
    return {
        "delivered": received,
        "msgs_per_s": round(received / wall, 1),
        **latency_figures(latencies),
        "cpu_server_s": round(cpu, 2),
        "server_us_per_msg": round(1e6 * cpu / messages),
    }


def wait_listening(port: int, child: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bare Tornado process did not start listening") from None
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child's own entry
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--recipients", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "bench.floor", "--serve", str(port)])
    try:
        wait_listening(port, child)
        runs = []
        for n in range(args.repeats):
            run = asyncio.run(
                one_run(port, psutil.Process(child.pid), args.messages, args.recipients, args.concurrency)
            )
            print(f"  floor run {n + 1}: {json.dumps(run)}")
            runs.append(run)
        print(f"floor median server µs per message: {statistics.median(r['server_us_per_msg'] for r in runs)}")
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    main()
