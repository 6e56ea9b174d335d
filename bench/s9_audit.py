"""Issue 16, the audit query at size: GET /api/v1/audit?user=U&since=<a month ago> over 1M entries.

One Stack (nx-27017 + `python run.py`, test profile; the server's start-up creates the audit
indexes of server/db.py). --entries audit entries (1,000,000) are seeded straight into nx-27017 in
the shape models/audit.py stores (`_id` = `key` = time key + ObjectId, `at`, actor, role, action,
via, target, outcome), in batches of --batch, spread over --users users (50,000) and --days days
(90). Seeding stops early after --seed-secs and says how many it stored. Then --queries (50)
queries for different users, each `GET /api/v1/audit?user=U&since=<30 days ago>` with an admin
token, one at a time: p50/p99/max. `explain` of the two queries behind one (models/audit.py
merges target.user and target.peer) shows which index nx-27017 uses.

    .venv/bin/python -m bench.s9_audit
    .venv/bin/python -m bench.s9_audit --entries 200000 --queries 20   # smaller
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import signal
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

from bson import ObjectId

from bench.harness import Stack, latency_figures, token
from models.audit import _with, parse_query, time_key

ACTIONS = ("messages.read", "marker.received", "marker.read", "conversations.read", "file.read")


def pm_conv_peer(rng: random.Random, users: int, me: int) -> int:
    peer = rng.randrange(users - 1)
    return peer + 1 if peer >= me else peer


def user_id(i: int) -> str:
    return f"s9-u{i:05d}"


def entries(n: int, users: int, days: int, now: datetime.datetime, seed: int = 9) -> Any:
    """Audit entries as models/audit.py AuditLog.record stores them, at random times over `days`."""
    rng = random.Random(seed)
    span_ms = days * 86_400_000
    for _ in range(n):
        at = now - datetime.timedelta(milliseconds=rng.randrange(span_ms))
        at = at.replace(microsecond=at.microsecond // 1000 * 1000)
        entry_id = f"{time_key(at)}-{ObjectId()}"
        me = rng.randrange(users)
        peer = pm_conv_peer(rng, users, me)
        action = ACTIONS[rng.randrange(len(ACTIONS))]
        # A user reading its own conversation (the entry concerns both the reader and the peer),
        # or now and then staff reading a user's conversation.
        staff = rng.random() < 0.1
        actor = f"s9-doc{rng.randrange(100):03d}" if staff else user_id(me)
        target: dict[str, Any] = {"channel": "pm", "peer": user_id(peer)}
        if staff:
            target["user"] = user_id(me)
        if action in ("messages.read", "marker.received", "marker.read"):
            seq = rng.randrange(1, 500)
            target.update({"fromSeq": seq, "toSeq": seq + rng.randrange(5)})
        yield {
            "_id": entry_id,
            "key": entry_id,
            "at": at,
            "actor": actor,
            "role": "doctor" if staff else "patient",
            "action": action,
            "via": "rest" if rng.random() < 0.5 else "ws",
            "target": target,
            "outcome": "ok",
        }


def seed(stack: Stack, n: int, users: int, days: int, batch: int, budget_s: float) -> dict[str, Any]:
    db = stack.mongo()
    now = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    stored = 0
    chunk: list[dict[str, Any]] = []
    for doc in entries(n, users, days, now):
        chunk.append(doc)
        if len(chunk) == batch:
            db.audit.insert_many(chunk, ordered=False)
            stored += len(chunk)
            chunk = []
            elapsed = time.perf_counter() - t0
            if stored % (10 * batch) == 0:
                print(f"s9: seeded {stored:,} in {elapsed:.0f} s ({stored / elapsed:,.0f}/s)", flush=True)
            if elapsed > budget_s:
                break
    if chunk and time.perf_counter() - t0 <= budget_s:
        db.audit.insert_many(chunk, ordered=False)
        stored += len(chunk)
    secs = time.perf_counter() - t0
    return {"seeded": stored, "seed_s": round(secs, 1), "seed_per_s": round(stored / secs)}


def query(stack: Stack, admin: str, user: str, since: str) -> tuple[float, int]:
    qs = urllib.parse.urlencode({"user": user, "since": since})
    req = urllib.request.Request(f"{stack.base_url}/api/v1/audit?{qs}", headers={"Authorization": f"Bearer {admin}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    return time.perf_counter() - t0, len(body["entries"])


def explain(stack: Stack, user: str, since: str) -> dict[str, str]:
    """Which index nx-27017 picks for each of the two queries behind ?user=, built as models/audit.py builds them."""
    db = stack.mongo()
    filter_, _, limit = parse_query({"user": user, "since": since})
    out = {}
    for field in ("target.user", "target.peer"):
        query = _with(filter_, field, user)
        plan = db.command("explain", {"find": "audit", "filter": query, "sort": {"key": -1}, "limit": limit + 1})
        out[field] = _index_names(plan) or json.dumps(plan, default=str)[:400]
    return out


def _index_names(plan: Any) -> str:
    """The plan's index use: MongoDB's indexName, or nx-27017's SQLite plan lines ("SEARCH ... USING INDEX")."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                step = isinstance(v, str) and (k == "indexName" or (k == "detail" and v.startswith(("SEARCH", "SCAN"))))
                if step and v not in found:
                    found.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(plan)
    return "; ".join(found)


def bare_vs_eq(stack: Stack, users: list[str], since: str) -> dict[str, Any]:
    """The same two queries straight to nx-27017, as models/audit.py asks them ({"$eq": u}) and with
    bare values (as before this issue's fix): seconds per ?user= (both queries), and the bare plan."""
    db = stack.mongo()
    out: dict[str, Any] = {}
    for shape in ("eq", "bare"):
        seconds = []
        for user in users:
            filter_, _, limit = parse_query({"user": user, "since": since})
            queries = [_with(filter_, field, user) for field in ("target.user", "target.peer")]
            if shape == "bare":
                queries = [
                    {k: v["$eq"] if isinstance(v, dict) and "$eq" in v else v for k, v in q.items()}
                    for q in queries
                    if q
                ]
            t0 = time.perf_counter()
            for query in queries:
                db.audit.find(query).sort("key", -1).limit(limit + 1).to_list()
            seconds.append(time.perf_counter() - t0)
        out.update(latency_figures(seconds, f"direct_{shape}"))
        if shape == "bare":
            plan = db.command("explain", {"find": "audit", "filter": queries[0], "sort": {"key": -1}, "limit": 51})
            out["explain_bare"] = _index_names(plan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--seed-secs", type=float, default=420.0, help="stop seeding after this long")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--compare", type=int, default=5, help="users for the $eq vs bare-value comparison (0: none)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop nx-27017 and the server on the way out

    with Stack("s9") as stack:
        figures: dict[str, Any] = seed(stack, args.entries, args.users, args.days, args.batch, args.seed_secs)
        print(f"s9: {figures}", flush=True)
        admin = token("s9-admin", "admin")
        month_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        since = month_ago.strftime("%Y-%m-%dT%H:%M:%SZ")
        rng = random.Random(16)
        users = [user_id(i) for i in rng.sample(range(args.users), args.queries + 1)]
        query(stack, admin, users[0], since)  # warm-up (connection, first plans)
        seconds, counts = [], []
        for user in users[1:]:
            secs, count = query(stack, admin, user, since)
            seconds.append(secs)
            counts.append(count)
        figures.update(latency_figures(seconds, "audit_query"))
        figures["queries"] = len(seconds)
        figures["entries_per_answer_mean"] = round(sum(counts) / len(counts), 1)
        figures["explain"] = explain(stack, users[1], since)
        if args.compare:
            print(f"s9: {json.dumps(figures)}", flush=True)
            figures.update(bare_vs_eq(stack, users[1 : 1 + args.compare], since))
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
