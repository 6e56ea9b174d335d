"""Scenario 3, group fan-out: one gm message to a group of M online members.

The group is created through POST /api/v1/groups when the server has it, otherwise written straight
into the `groups` collection. Each round a doctor (a member) POSTs one gm message; the round's figure
is the time from the POST start until the last of the M member sockets has it. Rounds are sequential.
Figures: p50/p99 over the rounds of that "last member" time, the p50 of the per-member times, lost.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import time
from typing import Any

import aiohttp
from websockets.asyncio.client import connect

from bench.harness import CpuMeter, Stack, latency_figures, percentile, token, ws_connect_kwargs


async def create_group(stack: Stack, group_id: str, members: list[str]) -> str:
    """POST /api/v1/groups as a service token; fall back to the collection if the route is missing."""
    headers = {"Authorization": f"Bearer {token('bench-service', 'service')}"}
    body = {"id": group_id, "name": "bench fan-out", "groupType": 0, "members": members}
    async with (
        aiohttp.ClientSession() as session,
        session.post(stack.base_url + "/api/v1/groups", json=body, headers=headers) as resp,
    ):
        if resp.status in (200, 201):
            return "POST /api/v1/groups"
        if resp.status not in (404, 405):
            raise RuntimeError(f"POST /api/v1/groups answered {resp.status}: {await resp.text()}")
    stack.mongo().groups.insert_one(
        {
            "_id": group_id,
            "name": "bench fan-out",
            "groupType": 0,
            "members": members,
            "createdAt": datetime.datetime.now(datetime.UTC),
            "createdBy": "bench",
        }
    )
    return "direct insert into groups"


class Member:
    def __init__(self, user: str, rounds: dict[str, Round]):
        self.user = user
        self.rounds = rounds
        self.conn: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.duplicates = 0
        self.seen: set[str] = set()

    async def open(self, ws_url: str) -> None:
        self.conn = await connect(f"{ws_url}?token={token(self.user, 'patient')}", **ws_connect_kwargs())
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.conn:
                now = time.perf_counter()
                frame = json.loads(raw)
                if frame.get("type") != "message":
                    continue
                cid = frame["message"].get("clientMsgId")
                rnd = self.rounds.get(cid) if cid else None
                if rnd is None:
                    continue
                if cid in self.seen:
                    self.duplicates += 1
                    continue
                self.seen.add(cid)
                rnd.arrived(now)
        except Exception:
            pass

    async def close(self) -> None:
        await self.conn.close()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


class Round:
    def __init__(self, expected: int):
        self.expected = expected
        self.times: list[float] = []
        self.done = asyncio.Event()

    def arrived(self, now: float) -> None:
        self.times.append(now)
        if len(self.times) >= self.expected:
            self.done.set()


async def scenario(
    stack: Stack, repeats: int, *, members: int = 500, rounds: int = 30, pause: float = 0.05
) -> list[dict[str, Any]]:
    sender = "s3-doc"
    ids = [f"s3-mem-{i}" for i in range(members)]
    group_id = "s3-group"
    how = await create_group(stack, group_id, [sender, *ids])
    round_map: dict[str, Round] = {}
    clients = [Member(u, round_map) for u in ids]
    sem = asyncio.Semaphore(100)

    async def open_one(c: Member) -> None:
        async with sem:
            await c.open(stack.ws_url)

    await asyncio.gather(*(open_one(c) for c in clients))
    stack.wait_sockets(members)
    headers = {"Authorization": f"Bearer {token(sender, 'doctor')}"}
    url = stack.base_url + "/api/v1/chats/gm"
    results = []
    try:
        async with aiohttp.ClientSession() as session:
            for r in range(-1, repeats):  # r == -1: a warm-up pass, not recorded
                last_times: list[float] = []
                member_lat: list[float] = []
                incomplete = 0
                with CpuMeter(stack) as cpu:
                    for k in range(rounds if r >= 0 else 3):
                        cid = f"s3-r{r}-{k}"
                        rnd = round_map[cid] = Round(members)
                        t0 = time.perf_counter()
                        async with session.post(
                            url,
                            headers=headers,
                            json={
                                "from": sender,
                                "group": group_id,
                                "contentType": 1,
                                "content": f"fan-out {k}",
                                "clientMsgId": cid,
                            },
                        ) as resp:
                            await resp.read()
                            if resp.status != 201:
                                raise RuntimeError(f"gm send answered {resp.status}")
                        try:
                            await asyncio.wait_for(rnd.done.wait(), 15)
                        except TimeoutError:
                            incomplete += 1
                        last_times.append(max(rnd.times) - t0 if rnd.times else float("nan"))
                        member_lat.extend(t - t0 for t in rnd.times)
                        await asyncio.sleep(pause)
                if r < 0:
                    continue
                res = {
                    "members": members,
                    "rounds": rounds,
                    "group_created_by": how,
                    "incomplete_rounds": incomplete,
                    "lost": sum(members - len(round_map[f"s3-r{r}-{k}"].times) for k in range(rounds)),
                    "duplicates": sum(c.duplicates for c in clients),
                    **latency_figures(last_times, "last"),
                    "member_p50_ms": round(1000 * percentile(member_lat, 50), 1),
                    **cpu.summary(),
                }
                results.append(res)
                print(f"  s3 run {r + 1}: {json.dumps(res)}", flush=True)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with Stack("s3") as stack:
        asyncio.run(scenario(stack, args.repeats, members=args.members, rounds=args.rounds))


if __name__ == "__main__":
    main()
