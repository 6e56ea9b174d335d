"""Scenario 5, reconnect storm: C offline clients, each with a backlog of B messages, connect at once.

Set-up (not timed): D doctors, connected over WebSocket, send B pm messages to each of their patients
while no patient is connected. Storm: all C patients connect at the same moment (no pacing); each
counts the backlog frames it gets. A client whose socket is closed before its backlog is complete
reconnects after a short back-off, like the SDK does. Figures: time from the storm's start until the
last client has all B messages, per-client completion p50/p99, duplicates (the same message twice on
one connection), gaps (a seq skipped on a connection), messages still missing when the storm's
time limit ends, reconnects.

Live after connect (after each storm, on a fresh server once nx-27017 is idle): L of the patients
(200), still with their backlogs, connect at once; the moment the last handshake is done a doctor
POSTs one gm message to a group of theirs. Figure: time from the POST until every one of the L
sockets has it (`live_after_connect_s`); a live message must not wait behind backlogs, its own
socket's or other sockets'. Also checked: every socket still gets its whole backlog, in order,
without duplicates. The live clients mark the gm message `received`, so the group has no backlog
in the next round and the pm backlogs stay for the next storm.

Clients do not send `received`, so every repeat replays the same backlog (delivery is at least once
until a client marks it received): one set-up serves all repeats. Every repeat after the first
starts on a fresh server process (same nx-27017 and data) once nx-27017 is idle again, so that a
storm does not inherit the unfinished work of the previous one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from typing import Any

import aiohttp
from websockets.asyncio.client import connect

from bench.harness import CpuMeter, Stack, latency_figures, raise_nofile, token, ws_connect_kwargs
from bench.s3_group import create_group


async def send_backlog(
    stack: Stack, doctors: list[str], patients: list[str], per_patient: int, window: int = 8
) -> dict[str, Any]:
    """Each doctor sends per_patient messages to each of its patients over its WebSocket."""
    owned = {d: patients[i :: len(doctors)] for i, d in enumerate(doctors)}
    errors: dict[str, int] = {}
    t0 = time.perf_counter()

    async def doctor(d: str) -> int:
        conn = await connect(f"{stack.ws_url}?token={token(d, 'doctor')}", **ws_connect_kwargs())
        acks: dict[str, asyncio.Future[dict[str, Any]]] = {}

        async def reader() -> None:
            async for raw in conn:
                frame = json.loads(raw)
                fut = acks.pop(frame.get("clientMsgId"), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)

        rtask = asyncio.create_task(reader())
        sem = asyncio.Semaphore(window)
        sent = 0

        async def one(p: str, k: int) -> None:
            nonlocal sent
            cid = f"s5-{d}-{p}-{k}"
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            acks[cid] = fut
            try:
                await conn.send(
                    json.dumps({"type": "pm", "to": p, "contentType": 1, "content": f"backlog {k}", "clientMsgId": cid})
                )
                reply = await asyncio.wait_for(fut, 60)
                if reply.get("type") == "ack":
                    sent += 1
                else:
                    errors[reply.get("code", "?")] = errors.get(reply.get("code", "?"), 0) + 1
            finally:
                sem.release()

        tasks = []
        # Message k goes to every patient before k+1, so each conversation's seq is 1..B in order.
        for k in range(per_patient):
            for p in owned[d]:
                await sem.acquire()
                tasks.append(asyncio.create_task(one(p, k)))
        await asyncio.gather(*tasks)
        await conn.close()
        rtask.cancel()
        await asyncio.gather(rtask, return_exceptions=True)
        return sent

    sent = sum(await asyncio.gather(*(doctor(d) for d in doctors)))
    wall = time.perf_counter() - t0
    return {
        "backlog_sent": sent,
        "backlog_errors": errors,
        "backlog_send_s": round(wall, 1),
        "backlog_send_msgs_per_s": round(sent / wall, 1),
    }


class Client:
    def __init__(self, user: str, expected: int):
        self.user = user
        self.expected = expected
        self.have: set[int] = set()
        self.duplicates = 0
        self.gaps = 0
        self.redelivered = 0
        self.reconnects = 0
        self.done_at: float | None = None
        self.conn: Any = None

    async def run(self, ws_url: str, t0: float, deadline: float, done: asyncio.Event, counter: list[int]) -> None:
        attempt = 0
        while self.done_at is None and time.perf_counter() < deadline:
            try:
                self.conn = await connect(f"{ws_url}?token={token(self.user, 'patient')}", **ws_connect_kwargs())
            except Exception:
                self.conn = None
            if self.conn is not None:
                seen_here: set[str] = set()
                last_seq = 0
                try:
                    async for raw in self.conn:
                        frame = json.loads(raw)
                        if frame.get("type") != "message":
                            continue
                        msg = frame["message"]
                        if msg["id"] in seen_here:
                            self.duplicates += 1
                            continue
                        seen_here.add(msg["id"])
                        seq = msg["seq"]
                        if seq != last_seq + 1 and last_seq:
                            self.gaps += 1
                        last_seq = seq
                        if seq in self.have:
                            self.redelivered += 1
                        self.have.add(seq)
                        if len(self.have) >= self.expected and self.done_at is None:
                            self.done_at = time.perf_counter()
                            counter[0] += 1
                            if counter[0] >= counter[1]:
                                done.set()
                            break  # keep the socket open (idle) until the storm is over
                except Exception:
                    pass
                if self.done_at is not None:
                    return
            attempt += 1
            self.reconnects += 1
            await asyncio.sleep(min(5.0, 0.5 * attempt) * (0.5 + random.random()))

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def storm(stack: Stack, patients: list[str], per_patient: int, timeout: float) -> dict[str, Any]:
    clients = [Client(p, per_patient) for p in patients]
    done = asyncio.Event()
    counter = [0, len(clients)]
    with CpuMeter(stack) as cpu:
        t0 = time.perf_counter()
        deadline = t0 + timeout
        tasks = [asyncio.create_task(c.run(stack.ws_url, t0, deadline, done, counter)) for c in clients]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
        t_end = time.perf_counter()
    await asyncio.gather(*tasks, return_exceptions=True)
    finished = [c.done_at - t0 for c in clients if c.done_at is not None]
    missing = sum(per_patient - len(c.have) for c in clients)
    res = {
        "clients": len(clients),
        "backlog_per_client": per_patient,
        "complete_clients": len(finished),
        "all_delivered_s": round(max(finished), 2) if len(finished) == len(clients) else None,
        "storm_wall_s": round(t_end - t0, 2),
        **latency_figures(finished, "client_done"),
        "duplicates": sum(c.duplicates for c in clients),
        "gaps": sum(c.gaps for c in clients),
        "missing_at_end": missing,
        "reconnects": sum(c.reconnects for c in clients),
        "redelivered_after_reconnect": sum(c.redelivered for c in clients),
        **{k: v for k, v in cpu.summary().items() if k.endswith("_s")},
    }
    for i in range(0, len(clients), 500):
        await asyncio.gather(*(c.close() for c in clients[i : i + 500]), return_exceptions=True)
    return res


LIVE_GROUP = "s5-live"


class LiveClient:
    """A patient of the live round: counts its pm backlog, notes when the live gm message came."""

    def __init__(self, user: str, backlog: int, marker: str):
        self.user = user
        self.backlog = backlog
        self.marker = marker
        self.pm_seqs: list[int] = []
        self.live_at: float | None = None
        self.duplicates = 0
        self.out_of_order = 0
        self.complete = asyncio.Event()
        self.conn: Any = None
        self._ids: set[str] = set()

    async def open(self, ws_url: str) -> None:
        self.conn = await connect(f"{ws_url}?token={token(self.user, 'patient')}", **ws_connect_kwargs())

    async def read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.conn:
                frame = json.loads(raw)
                if frame.get("type") != "message":
                    continue
                msg = frame["message"]
                if msg["id"] in self._ids:
                    self.duplicates += 1
                    continue
                self._ids.add(msg["id"])
                if msg.get("group") == LIVE_GROUP:
                    if msg.get("clientMsgId") == self.marker and self.live_at is None:
                        self.live_at = time.perf_counter()
                    await self.conn.send(
                        json.dumps({"type": "received", "channel": "gm", "group": LIVE_GROUP, "seq": msg["seq"]})
                    )
                else:
                    if self.pm_seqs and msg["seq"] != self.pm_seqs[-1] + 1:
                        self.out_of_order += 1
                    self.pm_seqs.append(msg["seq"])
                if self.live_at is not None and len(self.pm_seqs) >= self.backlog:
                    self.complete.set()


async def live_after_connect(
    stack: Stack, doctor: str, patients: list[str], backlog: int, rnd: int, timeout: float = 30.0
) -> dict[str, Any]:
    """L sockets with backlogs connect at once; one gm message right after: until all L have it."""
    marker = f"s5-live-{rnd}"
    clients = [LiveClient(p, backlog, marker) for p in patients]
    await asyncio.gather(*(c.open(stack.ws_url) for c in clients))
    readers = [asyncio.create_task(c.read()) for c in clients]
    headers = {"Authorization": f"Bearer {token(doctor, 'doctor')}"}
    body = {"from": doctor, "group": LIVE_GROUP, "contentType": 1, "content": "live", "clientMsgId": marker}
    t0 = time.perf_counter()
    async with (
        aiohttp.ClientSession() as session,
        session.post(stack.base_url + "/api/v1/chats/gm", json=body, headers=headers) as resp,
    ):
        await resp.read()
        if resp.status != 201:
            raise RuntimeError(f"live gm send answered {resp.status}")
    posted = time.perf_counter() - t0
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.complete.wait() for c in clients)), timeout)
    arrived = [c.live_at - t0 for c in clients if c.live_at is not None]
    res = {
        "live_sockets": len(clients),
        "live_after_connect_s": round(max(arrived), 3) if len(arrived) == len(clients) else None,
        **latency_figures(arrived, "live_socket"),
        "live_post_ms": round(1000 * posted, 1),
        "live_missing": len(clients) - len(arrived),
        "live_backlog_missing": sum(max(0, backlog - len(c.pm_seqs)) for c in clients),
        "live_duplicates": sum(c.duplicates for c in clients),
        "live_backlog_out_of_order": sum(c.out_of_order for c in clients),
    }
    for c in clients:
        await c.conn.close()
    await asyncio.gather(*readers, return_exceptions=True)
    return res


async def scenario(
    stack: Stack,
    repeats: int,
    *,
    clients: int = 2000,
    per_patient: int = 20,
    doctors: int = 100,
    timeout: float = 120.0,
    conv_index: bool = False,
    live: int = 200,
) -> list[dict[str, Any]]:
    raise_nofile()
    doctor_ids = [f"s5-doc-{i}" for i in range(doctors)]
    patient_ids = [f"s5-pat-{i}" for i in range(clients)]
    setup = await send_backlog(stack, doctor_ids, patient_ids, per_patient)
    live_patients = patient_ids[:live]
    if live:
        await create_group(stack, LIVE_GROUP, [doctor_ids[0], *live_patients])
    if conv_index:
        # What-if (not the server's own indexes): a single-field `conv` index, which nx-27017 uses
        # for {conv, seq > n} where it does not use the compound conv_seq index (RESULTS.md).
        stack.mongo().pm.create_index("conv", name="bench_conv")
        setup["bench_conv_index"] = True
    print(f"  s5 set-up: {json.dumps(setup)}", flush=True)
    results = []
    for r in range(repeats):
        quiet_wait_s = 0.0
        if r:
            # Each storm starts on a fresh server process (same nx-27017 and data): a storm that
            # did not finish leaves the server and nx-27017 busy with backlog reads of sockets that
            # are long gone, which the next storm would otherwise inherit (see RESULTS.md).
            stack.restart_server()
            quiet_wait_s = stack.wait_quiet("nx")
        res = await storm(stack, patient_ids, per_patient, timeout)
        res["fresh_server"] = bool(r)
        res["quiet_wait_s"] = quiet_wait_s
        if live:
            stack.restart_server()
            stack.wait_quiet("nx")
            res.update(await live_after_connect(stack, doctor_ids[0], live_patients, per_patient, r))
        res.update(setup)
        results.append(res)
        print(f"  s5 run {r + 1}: {json.dumps(res)}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--backlog", type=int, default=20)
    parser.add_argument("--doctors", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--live", type=int, default=200, help="sockets of the live-after-connect round (0: none)")
    parser.add_argument(
        "--conv-index", action="store_true", help="what-if: add a single-field index on pm.conv before the storm"
    )
    args = parser.parse_args()
    with Stack("s5") as stack:
        asyncio.run(
            scenario(
                stack,
                args.repeats,
                clients=args.clients,
                per_patient=args.backlog,
                doctors=args.doctors,
                timeout=args.timeout,
                conv_index=args.conv_index,
                live=args.live,
            )
        )


if __name__ == "__main__":
    main()
