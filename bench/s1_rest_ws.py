"""Scenario 1, REST → WebSocket: D doctors POST pm messages (bounded concurrency) to R connected patients.

Figures: delivered messages per second end to end (first POST start → last socket receipt), latency
from POST start to socket receipt (p50/p95/p99), lost (accepted with 201 but never received),
duplicates, the CPU each process used, and per message: server and database CPU µs and database
operations.

    .venv/bin/python -m bench.s1_rest_ws                  # 10 doctors, 100 patients, C=64
    .venv/bin/python -m bench.s1_rest_ws --table          # one sender, C=32, R=50, M=2000, webhooks live
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
from websockets.asyncio.client import connect

from bench.harness import CpuMeter, Stack, latency_figures, token, ws_connect_kwargs
from bench.receiver import SECRET, Receiver

WARMUP_MESSAGES = 300
RECEIVER_WAIT_SECS = 60.0  # a message.created not there by then is left pending by the stopping server


class Receivers:
    """R patient sockets; records the first receipt time of each clientMsgId, counts duplicates."""

    def __init__(self, mark_received: bool = False) -> None:
        # mark_received: answer each message with a `received` frame, as the SDK does (marker moves,
        # and so audit entries and marker history, per message).
        self.mark_received = mark_received
        self.received: dict[str, float] = {}
        self.duplicates = 0
        self.other_frames = 0
        self.conns: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.progress = asyncio.Event()

    async def open(self, ws_url: str, users: list[str]) -> None:
        async def one(user: str) -> None:
            conn = await connect(f"{ws_url}?token={token(user, 'patient')}", **ws_connect_kwargs())
            self.conns.append(conn)
            self.tasks.append(asyncio.create_task(self._read(conn)))

        await asyncio.gather(*(one(u) for u in users))

    async def _read(self, conn: Any) -> None:
        try:
            async for raw in conn:
                now = time.perf_counter()
                frame = json.loads(raw)
                if frame.get("type") != "message":
                    self.other_frames += 1
                    continue
                cid = frame["message"].get("clientMsgId")
                if cid is None:
                    continue
                if cid in self.received:
                    self.duplicates += 1
                else:
                    self.received[cid] = now
                    self.progress.set()
                if self.mark_received:
                    message = frame["message"]
                    await conn.send(
                        json.dumps(
                            {"type": "received", "channel": "pm", "peer": message["from"], "seq": message["seq"]}
                        )
                    )
        except Exception:
            pass

    async def wait_for(self, wanted: set[str], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not wanted <= self.received.keys() and time.perf_counter() < deadline:
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), 0.2)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.conns), return_exceptions=True)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def run_once(
    stack: Stack,
    receivers: Receivers,
    doctors: list[str],
    patients: list[str],
    messages: int,
    concurrency: int,
    tag: str,
    *,
    post_base_url: str | None = None,
    cpu_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """post_base_url: POST to another server process than the one holding the sockets (bench.cluster)."""
    headers = {
        d: {"Authorization": f"Bearer {token(d, 'doctor')}", "Content-Type": "application/json"} for d in doctors
    }
    url = (post_base_url or stack.base_url) + "/api/v1/chats/pm"
    started: dict[str, float] = {}
    accepted: set[str] = set()
    errors: dict[str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(messages):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            doctor = doctors[i % len(doctors)]
            patient = patients[(i // len(doctors)) % len(patients)]
            cid = f"{tag}-{i}"
            body = json.dumps(
                {"from": doctor, "to": patient, "contentType": 1, "content": f"bench message {i}", "clientMsgId": cid}
            )
            started[cid] = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers[doctor]) as resp:
                    await resp.read()
                    if resp.status == 201:
                        accepted.add(cid)
                    else:
                        errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    with CpuMeter(stack, cpu_extra) as cpu:
        t0 = time.perf_counter()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        posts_done = time.perf_counter()
        await receivers.wait_for(accepted, timeout=15)
    got = [cid for cid in accepted if cid in receivers.received]
    lat = [receivers.received[cid] - started[cid] for cid in got]
    last = max((receivers.received[c] for c in got), default=t0)
    result: dict[str, Any] = {
        "sent": messages,
        "accepted": len(accepted),
        "delivered": len(got),
        "lost": len(accepted) - len(got),
        "errors": errors,
        "msgs_per_s": round(len(got) / (last - t0), 1) if got else 0.0,
        "posts_per_s": round(len(accepted) / (posts_done - t0), 1),
        **latency_figures(lat),
        **cpu.summary(messages),
    }
    return result


async def scenario(
    stack: Stack,
    repeats: int,
    *,
    doctors: int = 10,
    patients: int = 100,
    messages: int = 3000,
    concurrency: int = 64,
    warmup: int = WARMUP_MESSAGES,
    mark_received: bool = False,
) -> list[dict[str, Any]]:
    doctor_ids = [f"s1-doc-{i}" for i in range(doctors)]
    patient_ids = [f"s1-pat-{i}" for i in range(patients)]
    receivers = Receivers(mark_received)
    await receivers.open(stack.ws_url, patient_ids)
    stack.wait_sockets(patients)
    results = []
    try:
        if warmup:
            await run_once(stack, receivers, doctor_ids, patient_ids, warmup, concurrency, "s1-warm")
        for r in range(repeats):
            res = await run_once(stack, receivers, doctor_ids, patient_ids, messages, concurrency, f"s1-r{r}")
            res.update({"doctors": doctors, "patients": patients, "concurrency": concurrency})
            res["duplicates"] = receivers.duplicates
            results.append(res)
            print(f"  s1 run {r + 1}: {json.dumps(res)}", flush=True)
    finally:
        await receivers.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--doctors", type=int, default=10)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--table",
        action="store_true",
        help="issue 20's load: one sender, C=32, R=50 recipients, M=2000, webhooks to a live receiver",
    )
    parser.add_argument(
        "--metrics", choices=("on", "off"), default="on", help="[metrics] enabled (SPEC §17 cost, side by side)"
    )
    parser.add_argument("--audit", choices=("on", "off"), default="on", help="[audit] enabled (SPEC §13 cost)")
    parser.add_argument(
        "--webhooks", choices=("off", "live"), default="off", help="SPEC §11 events to a receiver answering at once"
    )
    parser.add_argument("--mark-received", action="store_true", help="receivers send `received` like the SDK")
    args = parser.parse_args()
    if args.table:
        args.doctors, args.patients, args.messages, args.concurrency, args.webhooks = 1, 50, 2000, 32, "live"
    env = {
        "IM_METRICS_ENABLED": "true" if args.metrics == "on" else "false",
        "IM_AUDIT_ENABLED": "true" if args.audit == "on" else "false",
    }
    receiver = None
    if args.webhooks == "live":
        receiver = Receiver("fast")
        env.update({"IM_WEBHOOKS_URL": receiver.start(), "IM_WEBHOOKS_SECRET": SECRET})
    with Stack("s1", server_env=env) as stack:
        results = asyncio.run(
            scenario(
                stack,
                args.repeats,
                doctors=args.doctors,
                patients=args.patients,
                messages=args.messages,
                concurrency=args.concurrency,
                mark_received=args.mark_received,
            )
        )
        if receiver is not None:
            # Before the server stops (it would leave the rest pending for the next process):
            # how long after the last socket receipt the receiver has every message.created.
            expected = WARMUP_MESSAGES + sum(r["accepted"] for r in results)
            waited = time.perf_counter()
            while receiver.received < expected and time.perf_counter() - waited < RECEIVER_WAIT_SECS:
                time.sleep(0.01)
            lag = time.perf_counter() - waited
            print(
                f"  s1: the webhook receiver got {receiver.received} of {expected} events, {lag:.2f} s after",
                flush=True,
            )


if __name__ == "__main__":
    main()
