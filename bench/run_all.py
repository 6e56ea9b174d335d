"""Run the whole benchmark suite and print the figures (medians over repeats) and the targets.

    .venv/bin/python -m bench.run_all                 # everything, 3 repeats, ~10 minutes
    .venv/bin/python -m bench.run_all --only s1,s3    # a subset
    BENCH_PROFILE=bench/profiles .venv/bin/python -m bench.run_all --only s1   # + py-spy stacks

Every scenario gets its own nx-27017 and server processes (see bench/harness.py); results of each
run go to --json (default bench/results/latest.json).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import cluster, db_raw, s1_rest_ws, s2_ws_ws, s3_group, s4_capacity, s5_reconnect
from bench.harness import Stack, raise_nofile

SCENARIOS: dict[str, tuple[str, Callable[[Stack, int], list[dict[str, Any]]]]] = {
    "db": ("embedded database alone (raw PyMongo → nx-27017)", lambda st, n: db_raw.scenario(st, n)),
    "s1": (
        "REST → WebSocket, 10 doctors → 100 patients, 64 in flight",
        lambda st, n: asyncio.run(s1_rest_ws.scenario(st, n, messages=2000)),
    ),
    "s2": (
        "WebSocket → WebSocket, 50 pairs, 2 in flight per patient",
        lambda st, n: asyncio.run(s2_ws_ws.scenario(st, n, messages=2000)),
    ),
    "s3": (
        "group fan-out, 500 online members, 30 sequential gm sends per run",
        lambda st, n: asyncio.run(s3_group.scenario(st, n)),
    ),
    "s4": (
        "capacity, 10,000 idle sockets, 2 load processes × 100 handshakes in flight",
        lambda st, n: s4_capacity.scenario(st, n),
    ),
    "s5": (
        "reconnect storm, 2,000 clients × 20-message backlog, all at once; then 200 of them and one live gm",
        lambda st, n: asyncio.run(s5_reconnect.scenario(st, n, timeout=45.0)),
    ),
    "cluster": (
        "1 vs 2 server processes on one nx-27017 (change streams), s1 load, 1,000 msgs per set-up",
        lambda st, n: asyncio.run(cluster.scenario(st, n, messages=1000)),
    ),
}

# (scenario, figure, comparison, bound, label)
TARGETS = [
    ("s1", "msgs_per_s", ">=", 1000, "s1 ≥ 1,000 msg/s"),
    ("s1", "lat_p99_ms", "<=", 100, "s1 p99 ≤ 100 ms"),
    ("s1", "lost", "<=", 0, "s1 lost = 0"),
    ("s3", "last_p99_ms", "<=", 200, "s3 p99 ≤ 200 ms"),
    ("s4", "held_after_settle", ">=", 10000, "s4 10,000 sockets held"),
    ("s4", "rss_per_conn_kib", "<=", 16, "s4 ≤ 16 KiB RSS per connection (issue 20)"),
    ("s5", "all_delivered_s", "<=", 6, "s5 all backlogs ≤ 6 s (issue 20)"),
    ("s5", "duplicates", "<=", 0, "s5 duplicates = 0"),
    ("s5", "gaps", "<=", 0, "s5 gaps = 0"),
    ("s5", "live_after_connect_s", "<=", 1, "s5 live message after 200 connects ≤ 1 s (issue 20)"),
    ("s5", "live_duplicates", "<=", 0, "s5 live round duplicates = 0"),
]


def median_of(runs: list[dict[str, Any]], key: str) -> Any:
    values = [r.get(key) for r in runs]
    if any(v is None for v in values):
        return None  # e.g. a storm that did not complete: no time to take a median of
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        m = statistics.median(values)
        return round(m, 1) if isinstance(m, float) else m
    return values[0] if len({json.dumps(v, sort_keys=True) for v in values}) == 1 else values


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.node()}: {psutil.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{mem:.0f} GiB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ",".join(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "latest.json")
    args = parser.parse_args()
    raise_nofile()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")

    started = time.monotonic()
    report: dict[str, Any] = {
        "command": " ".join([os.path.relpath(sys.executable), "-m", "bench.run_all", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "repeats": args.repeats,
        "scenarios": {},
    }
    print(f"# {report['date']} — {report['machine']}", flush=True)
    for name in chosen:
        title, fn = SCENARIOS[name]
        print(f"== {name}: {title}", flush=True)
        t0 = time.monotonic()
        try:
            with Stack(name) as stack:
                runs = fn(stack, args.repeats)
        except Exception as exc:  # one broken scenario does not lose the others' figures
            print(f"  {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            report["scenarios"][name] = {"title": title, "error": f"{type(exc).__name__}: {exc}"}
            continue
        keys = list(dict.fromkeys(k for r in runs for k in r))
        medians = {k: median_of(runs, k) for k in keys}
        report["scenarios"][name] = {
            "title": title,
            "runs": runs,
            "median": medians,
            "seconds": round(time.monotonic() - t0, 1),
        }
        print(f"  {name} median: {json.dumps(medians)}", flush=True)

    print("\n## Targets (medians)")
    report["targets"] = []
    for name, key, op, bound, label in TARGETS:
        if name not in report["scenarios"] or "median" not in report["scenarios"][name]:
            continue
        value = report["scenarios"][name]["median"].get(key)
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        report["targets"].append({"target": label, "value": value, "met": met})
        print(f"- {label}: {value} → {'MET' if met else 'MISSED'}")
    report["total_seconds"] = round(time.monotonic() - started, 1)
    print(f"\nsuite took {report['total_seconds']} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
