"""Issue 18, the purge does not stall sends: scenario 1 while a purge of 500,000 old messages runs.

One Stack (nx-27017 + `python run.py`, test profile, IM_RETENTION_PM_DAYS=30 so that old pm
messages are past their limit). --old pm messages (500,000) are seeded straight into nx-27017 in
the shape models/messages.py stores, 400 to 31 days old, over --conversations conversations of
users that take no part in the load (seeding stops after --seed-secs and says how many it
stored). Then scenario 1 (REST → WebSocket, bench/s1_rest_ws.py: 10 doctors, 100 patients, C=64)
runs --repeats times on the quiet server, then `POST /api/v1/retention/run` (admin) starts the
purge and scenario 1 runs again and again while it lasts: only runs that ended before the purge
did count. Target: the p99 under the purge within 2× the quiet p99 (medians of the runs).

    .venv/bin/python -m bench.s10_retention
    .venv/bin/python -m bench.s10_retention --old 100000 --repeats 2     # smaller
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import signal
import statistics
import sys
import time
from typing import Any

import aiohttp
from bson import ObjectId

from bench.harness import Stack, token
from bench.s1_rest_ws import Receivers, run_once
from models.clock import unix_ms
from models.conversations import pm_conv

SEED_BATCH = 10_000
OLDEST_DAYS = 400
NEWEST_DAYS = 31


def seed(stack: Stack, old: int, conversations: int, budget_s: float) -> dict[str, Any]:
    """Old pm messages, round robin over the conversations (each one's seqs 1, 2, 3 … in time order)."""
    db = stack.mongo()
    now = datetime.datetime.now(datetime.UTC)
    span = datetime.timedelta(days=OLDEST_DAYS - NEWEST_DAYS) / old
    oldest = now - datetime.timedelta(days=OLDEST_DAYS)
    pairs = [(f"s10-old-doc-{i % 100:03d}", f"s10-old-pat-{i:05d}") for i in range(conversations)]
    convs = [pm_conv(a, b) for a, b in pairs]
    t0 = time.perf_counter()
    stored = 0
    chunk: list[dict[str, Any]] = []
    for n in range(old):
        c = n % conversations
        doctor, patient = pairs[c]
        at = oldest + span * n
        chunk.append(
            {
                "_id": str(ObjectId()),
                "conv": convs[c],
                "channel": "pm",
                "from": doctor,
                "to": patient,
                "contentType": 1,
                "content": f"old message {n}: how is the fever today?",
                "seq": n // conversations + 1,
                "createdAt": at.replace(microsecond=at.microsecond // 1000 * 1000),
                "createdMs": unix_ms(at),  # as models/messages.py stores it
            }
        )
        if len(chunk) == SEED_BATCH:
            db.pm.insert_many(chunk, ordered=False)
            stored += len(chunk)
            chunk = []
            elapsed = time.perf_counter() - t0
            if stored % 50_000 == 0:
                print(f"s10: seeded {stored:,} in {elapsed:.0f} s ({stored / elapsed:,.0f}/s)", flush=True)
            if elapsed > budget_s:
                break
    if chunk and time.perf_counter() - t0 <= budget_s:
        db.pm.insert_many(chunk, ordered=False)
        stored += len(chunk)
    secs = time.perf_counter() - t0
    return {"seeded": stored, "seed_s": round(secs, 1), "seed_per_s": round(stored / secs)}


async def purge(stack: Stack) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token('s10-admin', 'admin')}"}
    t0 = time.perf_counter()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session,
        session.post(f"{stack.base_url}/api/v1/retention/run", headers=headers) as resp,
    ):
        body = await resp.json()
        assert resp.status == 200, f"{body}\n{stack.server_log_tail(60)}"
    return {"purged": body["purged"], "purge_s": round(time.perf_counter() - t0, 1)}


async def scenario(stack: Stack, repeats: int, messages: int, concurrency: int) -> dict[str, Any]:
    doctors = [f"s1-doc-{i}" for i in range(10)]
    patients = [f"s1-pat-{i}" for i in range(100)]
    # nx-27017 digests the seeding (its change log, SQLite) for a while: quiet means quiet. Before
    # the sockets open: this wait blocks the loop, and sockets that cannot answer pings are closed.
    print(f"  s10: waited {stack.wait_quiet('nx', 15.0, timeout=180.0)} s for nx-27017 to settle", flush=True)
    receivers = Receivers()
    await receivers.open(stack.ws_url, patients)
    stack.wait_sockets(len(patients))
    out: dict[str, Any] = {"quiet": [], "purging": []}
    try:
        await run_once(stack, receivers, doctors, patients, 300, concurrency, "s10-warm")
        for r in range(repeats):
            res = await run_once(stack, receivers, doctors, patients, messages, concurrency, f"s10-q{r}")
            print(f"  s10 quiet run {r + 1}: {json.dumps(res)}", flush=True)
            out["quiet"].append(res)
        purging = asyncio.create_task(purge(stack))
        await asyncio.sleep(1.0)  # the purge is under way
        r = 0
        while not purging.done():
            res = await run_once(stack, receivers, doctors, patients, messages, concurrency, f"s10-p{r}")
            res["during_purge"] = not purging.done()
            print(f"  s10 run {r + 1} while purging: {json.dumps(res)}", flush=True)
            if res["during_purge"]:
                out["purging"].append(res)
            r += 1
        out.update(await purging)
    finally:
        await receivers.close()
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    if not runs:
        return {}
    return {
        key: statistics.median(r[key] for r in runs)
        for key in ("msgs_per_s", "lat_p50_ms", "lat_p99_ms", "lat_max_ms", "lost")
    } | {"runs": len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=int, default=500_000, help="old messages to seed and purge")
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--seed-secs", type=float, default=480.0, help="stop seeding after this long")
    parser.add_argument("--repeats", type=int, default=3, help="quiet s1 runs")
    parser.add_argument("--messages", type=int, default=2000, help="messages per s1 run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1000, help="[retention] batch_size")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop nx-27017 and the server on the way out

    env = {"IM_RETENTION_PM_DAYS": "30", "IM_RETENTION_BATCH_SIZE": str(args.batch_size)}
    with Stack("s10", server_env=env) as stack:
        figures: dict[str, Any] = seed(stack, args.old, args.conversations, args.seed_secs)
        print(f"s10: {figures}", flush=True)
        stack.wait_quiet()
        result = asyncio.run(scenario(stack, args.repeats, args.messages, args.concurrency))
        left = stack.mongo().pm.count_documents({"from": {"$regex": "^s10-old-"}})
        quiet, purging = summary(result["quiet"]), summary(result["purging"])
        figures.update(
            {
                "batch_size": args.batch_size,
                "purged": result["purged"],
                "purge_s": result["purge_s"],
                "purged_per_s": round(result["purged"]["pm"] / result["purge_s"]),
                "old_left": left,
                "quiet": quiet,
                "purging": purging,
                "p99_ratio": round(purging["lat_p99_ms"] / quiet["lat_p99_ms"], 2) if purging else None,
            }
        )
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
