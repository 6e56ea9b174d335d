"""Issue 13, a family doctor's real load: the conversation list, the backlog and group fan-out at size.

Three parts, each on its own Stack (nx-27017 + `python run.py`, test profile):

- list: one doctor with --patients pm conversations of --messages-per each (2,000 × 50 = 100,000
  messages), seeded straight into nx-27017 in the pre-issue-13 shape (messages, summaries,
  cursors) so the server's start-up upgrade (models/conversations.py upgrade_summaries) runs on
  it too. Figures: GET /api/v1/conversations?limit=50 latency (alone, then while other doctors
  send), and the p99 of those other doctors' POST /api/v1/chats/pm alone and while the list is
  being read in a loop.
- backlog: the same doctor, of whose conversations --news have 5 messages above its received
  marker, connects over WebSocket: time from connect start until the last backlog message.
- fanout: one gm to a group of --members online members (sockets spread over --workers load
  processes, so the load generator is not what is measured): POST start → last member has it.

    .venv/bin/python -m bench.s13_scale                      # all three parts
    .venv/bin/python -m bench.s13_scale --only list,backlog  # a subset
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import multiprocessing.connection
import time
from typing import Any

import aiohttp
from websockets.asyncio.client import connect

from bench.harness import Stack, latency_figures, token, ws_connect_kwargs

DOCTOR = "s13-doc"
NEWS_PER_CONVERSATION = 5
SEND_CLIENTS = 4


def pm_conv(a: str, b: str) -> str:
    low, high = sorted((a, b))
    return f"{len(low)}:{low}|{high}"


def seed_doctor(stack: Stack, patients: int, per: int, news: int) -> dict[str, Any]:
    """Messages, summaries and cursors as the server before issue 13 stored them."""
    db = stack.mongo()
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    t0 = time.perf_counter()
    messages, summaries, cursors = [], [], []
    for i in range(patients):
        patient = f"s13-p{i:05d}"
        conv = pm_conv(DOCTOR, patient)
        last: dict[str, Any] = {}
        for seq in range(1, per + 1):
            sender, to = (DOCTOR, patient) if seq % 2 else (patient, DOCTOR)
            created = start + datetime.timedelta(seconds=i * per + seq)
            created = created.replace(microsecond=created.microsecond // 1000 * 1000)
            last = {
                "_id": f"{i:08x}{seq:016x}",
                "conv": conv,
                "channel": "pm",
                "from": sender,
                "to": to,
                "contentType": 1,
                "content": f"message {seq} of conversation {i}: 今天感觉怎么样？",
                "seq": seq,
                "createdAt": created,
            }
            messages.append(last)
        summaries.append(
            {
                "_id": f"pm:{conv}",
                "channel": "pm",
                "conv": conv,
                "members": sorted((DOCTOR, patient)),
                "lastSeq": per,
                "lastMessage": last,
                "updatedAt": last["createdAt"],
            }
        )
        doctor_marker = per - NEWS_PER_CONVERSATION if i < news else per
        cursors.append(
            {"user": DOCTOR, "channel": "pm", "conv": conv, "received": doctor_marker, "read": doctor_marker}
        )
        cursors.append({"user": patient, "channel": "pm", "conv": conv, "received": per, "read": per})
        if len(messages) >= 20_000:
            db.pm.insert_many(messages)
            messages = []
    if messages:
        db.pm.insert_many(messages)
    db.conversations.insert_many(summaries)
    db.cursors.insert_many(cursors)
    return {
        "patients": patients,
        "messages": patients * per,
        "news_conversations": news,
        "seed_s": round(time.perf_counter() - t0, 1),
    }


def start_seeded(stack: Stack, patients: int, per: int, news: int) -> dict[str, Any]:
    stack.start_mongo()
    # The server creates the indexes at start-up; seeding first keeps inserts cheap.
    seeded = seed_doctor(stack, patients, per, news)
    t0 = time.perf_counter()
    stack.start_server()  # ensure_indexes + upgrade_summaries run before it serves
    seeded["server_start_with_upgrade_s"] = round(time.perf_counter() - t0, 1)
    return seeded


async def timed_get(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    async with session.get(url, headers=headers) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"GET {url} answered {resp.status}: {body}")
    return time.perf_counter() - t0, body


async def send_loop(stack: Stack, stop: asyncio.Event, latencies: list[float], client: int) -> None:
    """Another doctor writing to its own patient, one message at a time, until stop."""
    sender, patient = f"s13-other-{client}", f"s13-other-p{client}"
    headers = {"Authorization": f"Bearer {token(sender, 'doctor')}"}
    url = stack.base_url + "/api/v1/chats/pm"
    async with aiohttp.ClientSession() as session:
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            async with session.post(
                url, headers=headers, json={"from": sender, "to": patient, "contentType": 1, "content": f"m{n}"}
            ) as resp:
                await resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"send answered {resp.status}")
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)


async def list_loop(
    stack: Stack, stop: asyncio.Event, latencies: list[float], pages: int, pause: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token(DOCTOR, 'doctor')}"}
    base = stack.base_url + f"/api/v1/conversations?user_id={DOCTOR}&limit=50"
    seen = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            cursor = None
            for _ in range(pages):
                url = base + (f"&cursor={cursor}" if cursor else "")
                seconds, body = await timed_get(session, url, headers)
                latencies.append(seconds)
                seen = max(seen, len(body["conversations"]))
                cursor = body["next"]
                if cursor is None:
                    break
            await asyncio.sleep(pause)
    return {"page_size_seen": seen}


async def part_list(stack: Stack, phase_secs: float, list_pause: float) -> dict[str, Any]:
    alone: list[float] = []
    first_pages: list[float] = []
    headers = {"Authorization": f"Bearer {token(DOCTOR, 'doctor')}"}
    async with aiohttp.ClientSession() as session:
        url = stack.base_url + f"/api/v1/conversations?user_id={DOCTOR}&limit=50"
        for _ in range(3):  # warm-up
            await timed_get(session, url, headers)
        for _ in range(200):
            seconds, body = await timed_get(session, url, headers)
            first_pages.append(seconds)
        assert len(body["conversations"]) == 50 and body["next"], body
        # Walking every page: 2,000 conversations in 40 pages, each O(page).
        cursor, pages, t0 = None, 0, time.perf_counter()
        while True:
            seconds, body = await timed_get(session, url + (f"&cursor={cursor}" if cursor else ""), headers)
            alone.append(seconds)
            pages += 1
            cursor = body["next"]
            if cursor is None:
                break
        walk_s = time.perf_counter() - t0
    # Other doctors' sends alone, then while the doctor reads its first page in a loop.
    sends_alone: list[float] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(send_loop(stack, stop, sends_alone, c)) for c in range(SEND_CLIENTS)]
    await asyncio.sleep(phase_secs)
    stop.set()
    await asyncio.gather(*tasks)
    sends_during: list[float] = []
    lists_during: list[float] = []
    stop = asyncio.Event()
    tasks = [asyncio.create_task(send_loop(stack, stop, sends_during, c)) for c in range(SEND_CLIENTS)]
    lister = asyncio.create_task(list_loop(stack, stop, lists_during, pages=1, pause=list_pause))
    await asyncio.sleep(phase_secs)
    stop.set()
    await asyncio.gather(*tasks, lister)
    return {
        **latency_figures(first_pages, "first_page"),
        "all_pages": pages,
        "all_pages_walk_s": round(walk_s, 2),
        **latency_figures(alone, "any_page"),
        "sends_alone_n": len(sends_alone),
        **latency_figures(sends_alone, "sends_alone"),
        "sends_during_list_n": len(sends_during),
        **latency_figures(sends_during, "sends_during_list"),
        "list_pause_s": list_pause,
        "lists_during_sends_n": len(lists_during),
        **latency_figures(lists_during, "first_page_during_sends"),
    }


async def part_backlog(stack: Stack, expected: int, repeats: int) -> dict[str, Any]:
    times: list[float] = []
    for _ in range(repeats):
        got = 0
        t0 = time.perf_counter()
        async with connect(f"{stack.ws_url}?token={token(DOCTOR, 'doctor')}", **ws_connect_kwargs()) as conn:
            while got < expected:
                frame = json.loads(await asyncio.wait_for(conn.recv(), 30))
                if frame.get("type") == "message":
                    got += 1
            times.append(time.perf_counter() - t0)
            try:  # nothing more than the news
                extra = json.loads(await asyncio.wait_for(conn.recv(), 0.5))
                raise RuntimeError(f"more than the backlog arrived: {extra}")
            except TimeoutError:
                pass
    return {"backlog_messages": expected, **latency_figures(times, "connect_to_last_backlog")}


def fanout_worker(ws_url: str, users: list[str], conn: multiprocessing.connection.Connection) -> None:
    """Opens its members' sockets; per round reports (round id, arrival times) to the parent."""
    asyncio.run(_fanout_worker(ws_url, users, conn))


async def _fanout_worker(ws_url: str, users: list[str], pipe: multiprocessing.connection.Connection) -> None:
    arrivals: dict[str, dict[str, float]] = {}
    done: dict[str, asyncio.Event] = {}
    sem = asyncio.Semaphore(50)

    stopping = asyncio.Event()
    opened = 0
    all_open = asyncio.Event()

    async def member(user: str) -> None:
        """One member's socket; reconnects like a client when the server asks it to (1013)."""
        nonlocal opened
        first = True
        while not stopping.is_set():
            try:
                async with sem:
                    ws = await connect(f"{ws_url}?token={token(user, 'patient')}", **ws_connect_kwargs())
                if first:
                    first = False
                    opened += 1
                    if opened == len(users):
                        all_open.set()
                async with ws:
                    async for raw in ws:
                        now = time.perf_counter()
                        frame = json.loads(raw)
                        message = frame.get("message", {}) if frame.get("type") == "message" else {}
                        cid = message.get("clientMsgId")
                        if cid:
                            times = arrivals.setdefault(cid, {})
                            times.setdefault(user, now)  # the first copy (a reconnect may resend)
                            if len(times) == len(users):
                                done.setdefault(cid, asyncio.Event()).set()
                        if stopping.is_set():
                            break
            except Exception:
                pass
            await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(member(u)) for u in users]
    await all_open.wait()
    pipe.send("ready")
    loop = asyncio.get_running_loop()
    while True:
        cid = await loop.run_in_executor(None, pipe.recv)
        if cid is None:
            break
        event = done.setdefault(cid, asyncio.Event())
        with contextlib.suppress(TimeoutError):  # what arrived by then is reported; the rest is lost
            await asyncio.wait_for(event.wait(), 15)
        pipe.send((cid, list(arrivals.get(cid, {}).values())))
    stopping.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def part_fanout(stack: Stack, members: int, rounds: int, workers: int) -> dict[str, Any]:
    ids = [f"s13-m{i:05d}" for i in range(members)]
    stack.mongo().groups.insert_one(
        {
            "_id": "s13-notice",
            "name": "clinic notices",
            "groupType": 0,
            "members": [DOCTOR, *ids],
            "createdAt": datetime.datetime.now(datetime.UTC),
            "createdBy": DOCTOR,
        }
    )
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for w in range(workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=fanout_worker, args=(stack.ws_url, ids[w::workers], child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        if not pipe.poll(300) or pipe.recv() != "ready":
            raise RuntimeError("a fan-out worker did not open its sockets")
    held = stack.wait_sockets(members, timeout=120)
    # The connect storm (5,000 handshakes, backlogs, presence) is not what is measured: start
    # once the server and nx-27017 are idle again.
    settle_s = stack.wait_quiet("server", 20, 120) + stack.wait_quiet("nx", 20, 60)
    headers = {"Authorization": f"Bearer {token(DOCTOR, 'doctor')}"}
    last: list[float] = []
    lost = 0
    try:
        async with aiohttp.ClientSession() as session:
            for k in range(-2, rounds):  # two warm-up rounds
                cid = f"s13-f{k}"
                t0 = time.perf_counter()
                async with session.post(
                    stack.base_url + "/api/v1/chats/gm",
                    headers=headers,
                    json={
                        "from": DOCTOR,
                        "group": "s13-notice",
                        "contentType": 1,
                        "content": f"notice {k}",
                        "clientMsgId": cid,
                    },
                ) as resp:
                    await resp.read()
                    if resp.status != 201:
                        raise RuntimeError(f"gm send answered {resp.status}")
                for pipe in pipes:
                    pipe.send(cid)
                arrivals: list[float] = []
                for pipe in pipes:
                    _cid, times = await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
                    arrivals.extend(times)
                if k >= 0:
                    lost += members - len(arrivals)
                    last.append(max(arrivals) - t0 if arrivals else float("nan"))
                await asyncio.sleep(0.2)
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in procs:
            proc.join(30)
    return {
        "members": members,
        "rounds": rounds,
        "workers": workers,
        "sockets_held": held,
        "settle_s": settle_s,
        "lost": lost,
        **latency_figures(last, "last_member"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="list,backlog,fanout")
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--messages-per", type=int, default=50)
    parser.add_argument("--news", type=int, default=50)
    parser.add_argument("--phase-secs", type=float, default=8.0)
    parser.add_argument(
        "--list-pause",
        type=float,
        default=0.0,
        help="seconds between the doctor's list reads while others send (0: back to back)",
    )
    parser.add_argument("--members", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results: dict[str, Any] = {}
    if parts & {"list", "backlog"}:
        stack = Stack("s13")
        try:
            results["seed"] = start_seeded(stack, args.patients, args.messages_per, args.news)
            print(f"  s13 seed: {json.dumps(results['seed'])}", flush=True)
            if "backlog" in parts:  # first, before the list's other doctors add conversations
                results["backlog"] = asyncio.run(part_backlog(stack, args.news * NEWS_PER_CONVERSATION, 5))
                print(f"  s13 backlog: {json.dumps(results['backlog'])}", flush=True)
            if "list" in parts:
                results["list"] = asyncio.run(part_list(stack, args.phase_secs, args.list_pause))
                print(f"  s13 list: {json.dumps(results['list'])}", flush=True)
        finally:
            stack.stop()
    if "fanout" in parts:
        with Stack("s13f") as stack:
            results["fanout"] = asyncio.run(part_fanout(stack, args.members, args.rounds, args.workers))
            print(f"  s13 fanout: {json.dumps(results['fanout'])}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
