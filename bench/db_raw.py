"""The embedded database alone: raw PyMongo round trips against nx-27017, no IM server involved.

Figures: sequential insert_one with j=True (what every send pays at least once), sequential find_one
by _id, sequential update_one upsert (the conversation summary / cursor shape), and concurrent
insert_one j=True with N in flight through the async client (what many simultaneous sends see).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bson import ObjectId
from pymongo import AsyncMongoClient, MongoClient, WriteConcern

from bench.harness import CpuMeter, Stack, latency_figures


def _doc(i: int) -> dict[str, Any]:
    return {
        "_id": str(ObjectId()),
        "conv": f"5:bench|peer{i % 100}",
        "channel": "pm",
        "from": "a",
        "to": "b",
        "contentType": 1,
        "content": f"raw {i}",
        "seq": i + 1,
    }


def sequential(stack: Stack, ops: int) -> dict[str, Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_uri)
    db = client[stack.db_name + "_raw"]
    coll = db.get_collection("raw", write_concern=WriteConcern(j=True))
    out: dict[str, Any] = {}
    ids: list[str] = []
    try:
        coll.insert_one({"_id": "warm"})
        with CpuMeter(stack) as cpu:
            lat = []
            t0 = time.perf_counter()
            for i in range(ops):
                d = _doc(i)
                s = time.perf_counter()
                coll.insert_one(d)
                lat.append(time.perf_counter() - s)
                ids.append(d["_id"])
            wall = time.perf_counter() - t0
        out["insert_j_ops_per_s"] = round(ops / wall, 1)
        out.update(latency_figures(lat, "insert_j"))
        out["insert_j_cpu_nx_ms_per_op"] = round(1000 * cpu.used["nx"] / ops, 3)

        lat = []
        t0 = time.perf_counter()
        for i in range(ops):
            s = time.perf_counter()
            coll.find_one({"_id": ids[i]})
            lat.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        out["find_one_ops_per_s"] = round(ops / wall, 1)
        out.update(latency_figures(lat, "find_one"))

        summaries = db.get_collection("summaries", write_concern=WriteConcern(j=True))
        lat = []
        t0 = time.perf_counter()
        for i in range(ops):
            s = time.perf_counter()
            summaries.update_one({"_id": f"pm:{i % 100}"}, {"$set": {"lastSeq": i}}, upsert=True)
            lat.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        out["upsert_j_ops_per_s"] = round(ops / wall, 1)
        out.update(latency_figures(lat, "upsert_j"))
    finally:
        client.drop_database(stack.db_name + "_raw")
        client.close()
    return out


async def concurrent(stack: Stack, ops: int, in_flight: int) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.mongo_uri)
    db = client[stack.db_name + "_rawc"]
    coll = db.get_collection("raw", write_concern=WriteConcern(j=True))
    await coll.insert_one({"_id": "warm"})
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < ops:
            i = next_i
            next_i += 1
            await coll.insert_one(_doc(i))

    try:
        with CpuMeter(stack) as cpu:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            wall = time.perf_counter() - t0
        return {
            f"insert_j_x{in_flight}_ops_per_s": round(ops / wall, 1),
            f"insert_j_x{in_flight}_cpu_nx_pct": cpu.summary()["cpu_nx_pct"],
        }
    finally:
        await client.drop_database(stack.db_name + "_rawc")
        await client.close()


def scenario(stack: Stack, repeats: int, ops: int = 1000, in_flight: int = 32) -> list[dict[str, Any]]:
    results = []
    for r in range(repeats):
        res = sequential(stack, ops)
        res.update(asyncio.run(concurrent(stack, ops * 2, in_flight)))
        results.append(res)
        print(f"  db run {r + 1}: {json.dumps(res)}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=32)
    args = parser.parse_args()
    with Stack("db") as stack:
        scenario(stack, args.repeats, args.ops, args.in_flight)


if __name__ == "__main__":
    main()
