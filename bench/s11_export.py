"""Issue 18, a patient's record exported: 100,000 messages as NDJSON with the server's memory flat.

One Stack (nx-27017 + `python run.py`, test profile). --messages pm messages (100,000) for one
patient are seeded straight into nx-27017 in the shape models/messages.py stores, spread over
--peers doctors (50), then one real message per conversation goes through REST, so every
conversation has its summary and its lastSeq as the server keeps them. Then the patient exports its
record (`GET /api/v1/users/{id}/export`, its own token) --repeats times, once read as fast as the
client can and once by a slow reader (--slow-kib-per-s), while a thread samples the server's RSS
every 20 ms: the peak growth over the RSS just before the export is the figure (target < 50 MB).

    .venv/bin/python -m bench.s11_export
    .venv/bin/python -m bench.s11_export --messages 20000 --repeats 1    # smaller
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import signal
import sys
import threading
import time
from typing import Any

import aiohttp
import psutil
from bson import ObjectId

from bench.harness import Stack, token
from models.conversations import pm_conv

PATIENT = "s11-patient"
SEED_BATCH = 10_000


def doctor_id(i: int) -> str:
    return f"s11-doc-{i:03d}"


def seed(stack: Stack, messages: int, peers: int, budget_s: float) -> dict[str, Any]:
    """Old messages straight into `pm`, a conversation per doctor, each with seq 1, 2, 3 …"""
    db = stack.mongo()
    per_peer = messages // peers
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=300)
    t0 = time.perf_counter()
    stored = 0
    chunk: list[dict[str, Any]] = []
    for p in range(peers):
        doctor = doctor_id(p)
        conv = pm_conv(doctor, PATIENT)
        for n in range(per_peer):
            sender, to = (doctor, PATIENT) if n % 2 == 0 else (PATIENT, doctor)
            at = start + datetime.timedelta(seconds=p * per_peer + n)
            chunk.append(
                {
                    "_id": str(ObjectId()),
                    "conv": conv,
                    "channel": "pm",
                    "from": sender,
                    "to": to,
                    "contentType": 1,
                    # About the size of a real exchange (a few sentences), in Chinese and English.
                    "content": f"第{n}条 How is the fever today? 今天发烧怎么样？ Take the tablets after meals. #{n}",
                    "seq": n + 1,
                    "createdAt": at.replace(microsecond=0),
                }
            )
            if len(chunk) == SEED_BATCH:
                db.pm.insert_many(chunk, ordered=False)
                stored += len(chunk)
                chunk = []
                if stored % 50_000 == 0:
                    print(f"s11: seeded {stored:,} in {time.perf_counter() - t0:.0f} s", flush=True)
                if time.perf_counter() - t0 > budget_s:
                    break
        if time.perf_counter() - t0 > budget_s:
            break
    if chunk:
        db.pm.insert_many(chunk, ordered=False)
        stored += len(chunk)
    secs = time.perf_counter() - t0
    return {"seeded": stored, "seed_s": round(secs, 1), "seed_per_s": round(stored / secs), "peers": peers}


async def finish_conversations(stack: Stack, peers: int) -> None:
    """One real message per conversation: its summary (lastSeq, lastMessage) as the server writes it."""
    async with aiohttp.ClientSession() as session:
        for p in range(peers):
            doctor = doctor_id(p)
            headers = {"Authorization": f"Bearer {token(doctor, 'doctor')}", "Content-Type": "application/json"}
            body = {"from": doctor, "to": PATIENT, "contentType": 1, "content": "latest"}
            async with session.post(f"{stack.base_url}/api/v1/chats/pm", json=body, headers=headers) as resp:
                assert resp.status == 201, await resp.text()


class RssSampler:
    """The server's RSS every interval, on a thread (the export's client runs on the asyncio loop)."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def export_once(stack: Stack, slow_kib_per_s: float | None) -> dict[str, Any]:
    assert stack.server is not None
    headers = {"Authorization": f"Bearer {token(PATIENT, 'patient')}"}
    lines = 0
    size = 0
    last = b""
    types: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=3600)
    with RssSampler(stack.server.pid) as rss:
        t0 = time.perf_counter()
        url = f"{stack.base_url}/api/v1/users/{PATIENT}/export"
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            buffer = b""
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    lines += 1
                    kind = json.loads(raw)["type"]
                    types[kind] = types.get(kind, 0) + 1
                    last = raw
                if slow_kib_per_s:
                    await asyncio.sleep(len(chunk) / 1024 / slow_kib_per_s)
        secs = time.perf_counter() - t0
    end = json.loads(last)
    assert end["type"] == "end", last[:200]
    return {
        "reader": f"slow {slow_kib_per_s:g} KiB/s" if slow_kib_per_s else "fast",
        "lines": lines,
        "types": types,
        "counts": end["counts"],
        "mib": round(size / 2**20, 1),
        "secs": round(secs, 1),
        "lines_per_s": round(lines / secs),
        "rss_before_mib": round(rss.baseline / 2**20, 1),
        "rss_peak_mib": round(rss.peak / 2**20, 1),
        "rss_growth_mib": round((rss.peak - rss.baseline) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--peers", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--slow-kib-per-s", type=float, default=4096.0, help="the slow reader's pace (0: none)")
    parser.add_argument("--seed-secs", type=float, default=420.0, help="stop seeding after this long")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop nx-27017 and the server on the way out

    with Stack("s11") as stack:
        figures: dict[str, Any] = seed(stack, args.messages, args.peers, args.seed_secs)
        print(f"s11: {figures}", flush=True)
        asyncio.run(finish_conversations(stack, args.peers))
        paces: list[float | None] = [None] + ([args.slow_kib_per_s] if args.slow_kib_per_s else [])
        runs = []
        for _ in range(args.repeats):
            for pace in paces:
                result = asyncio.run(export_once(stack, pace))
                print(f"s11: {json.dumps(result)}", flush=True)
                runs.append(result)
        figures["runs"] = runs
        figures["rss_growth_max_mib"] = max(r["rss_growth_mib"] for r in runs)
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
