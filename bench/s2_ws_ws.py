"""Scenario 2, WebSocket → WebSocket: patients chat in pairs over their sockets.

Each of P patients (P/2 pairs) sends `messages/P` pm frames to its partner, keeping at most `window`
sends waiting for their ack. Figures: delivered messages per second (first send → last receipt),
latency from the send to the partner's receipt (p50/p95/p99), lost (acked but never received),
duplicates, and CPU per process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from websockets.asyncio.client import connect

from bench.harness import CpuMeter, Stack, latency_figures, token, ws_connect_kwargs


class Patient:
    def __init__(self, user: str, partner: str, state: Run):
        self.user = user
        self.partner = partner
        self.state = state
        self.conn: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.acks: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def open(self, ws_url: str) -> None:
        self.conn = await connect(f"{ws_url}?token={token(self.user, 'patient')}", **ws_connect_kwargs())
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.conn:
                now = time.perf_counter()
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    self.state.on_message(frame["message"].get("clientMsgId"), now)
                elif kind in ("ack", "error"):
                    fut = self.acks.pop(frame.get("clientMsgId"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
        except Exception:
            pass

    async def send_loop(self, count: int, window: int, tag: str) -> None:
        sem = asyncio.Semaphore(window)
        pending: list[asyncio.Task[None]] = []

        async def one(i: int) -> None:
            cid = f"{tag}-{self.user}-{i}"
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self.acks[cid] = fut
            self.state.started[cid] = time.perf_counter()
            await self.conn.send(
                json.dumps(
                    {
                        "type": "pm",
                        "to": self.partner,
                        "contentType": 1,
                        "content": f"bench chat {i}",
                        "clientMsgId": cid,
                    }
                )
            )
            try:
                reply = await asyncio.wait_for(fut, 30)
            except TimeoutError:
                self.state.errors["ack_timeout"] = self.state.errors.get("ack_timeout", 0) + 1
                return
            finally:
                sem.release()
            if reply["type"] == "ack":
                self.state.acked.add(cid)
            else:
                code = reply.get("code", "error")
                self.state.errors[code] = self.state.errors.get(code, 0) + 1

        for i in range(count):
            await sem.acquire()
            pending.append(asyncio.create_task(one(i)))
        await asyncio.gather(*pending)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


class Run:
    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.acked: set[str] = set()
        self.received: dict[str, float] = {}
        self.duplicates = 0
        self.errors: dict[str, int] = {}

    def on_message(self, cid: str | None, now: float) -> None:
        if cid is None or cid not in self.started:
            return
        if cid in self.received:
            self.duplicates += 1
        else:
            self.received[cid] = now


async def run_once(stack: Stack, patients: list[Patient], per_patient: int, window: int, tag: str) -> dict[str, Any]:
    run = Run()
    for p in patients:
        p.state = run
    with CpuMeter(stack) as cpu:
        t0 = time.perf_counter()
        await asyncio.gather(*(p.send_loop(per_patient, window, tag) for p in patients))
        deadline = time.perf_counter() + 15
        while not run.acked <= run.received.keys() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
    got = [c for c in run.acked if c in run.received]
    lat = [run.received[c] - run.started[c] for c in got]
    last = max((run.received[c] for c in got), default=t0)
    return {
        "sent": per_patient * len(patients),
        "acked": len(run.acked),
        "delivered": len(got),
        "lost": len(run.acked) - len(got),
        "duplicates": run.duplicates,
        "errors": run.errors,
        "msgs_per_s": round(len(got) / (last - t0), 1) if got else 0.0,
        **latency_figures(lat),
        **cpu.summary(per_patient * len(patients)),
    }


async def scenario(
    stack: Stack, repeats: int, *, patients: int = 100, messages: int = 3000, window: int = 2, warmup: int = 300
) -> list[dict[str, Any]]:
    assert patients % 2 == 0
    ids = [f"s2-pat-{i}" for i in range(patients)]
    placeholder = Run()
    clients = [Patient(ids[i], ids[i ^ 1], placeholder) for i in range(patients)]
    await asyncio.gather(*(c.open(stack.ws_url) for c in clients))
    stack.wait_sockets(patients)
    per_patient = max(1, messages // patients)
    results = []
    try:
        if warmup:
            await run_once(stack, clients, max(1, warmup // patients), window, "s2-warm")
        for r in range(repeats):
            res = await run_once(stack, clients, per_patient, window, f"s2-r{r}")
            res.update({"patients": patients, "pairs": patients // 2, "window": window})
            results.append(res)
            print(f"  s2 run {r + 1}: {json.dumps(res)}", flush=True)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--audit", choices=("on", "off"), default="on", help="[audit] enabled (SPEC §13 cost)")
    args = parser.parse_args()
    with Stack("s2", server_env={"IM_AUDIT_ENABLED": "true" if args.audit == "on" else "false"}) as stack:
        asyncio.run(scenario(stack, args.repeats, patients=args.patients, messages=args.messages, window=args.window))


if __name__ == "__main__":
    main()
