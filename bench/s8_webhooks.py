"""Scenario 8, the send path never waits for the webhook receiver (issue 15).

Scenario 1 (REST → WebSocket) against three servers side by side, alternating: webhooks off; on, to
a receiver that answers every event after 5 s; on, to a receiver that accepts the connection and
never answers. Prints s1's figures for each and the medians per mode.

    .venv/bin/python -m bench.s8_webhooks --rounds 3 --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

from bench.harness import Stack
from bench.receiver import SECRET, Receiver
from bench.s1_rest_ws import scenario


def run_mode(mode: str, messages: int, concurrency: int) -> dict[str, Any]:
    env: dict[str, str] = {}
    receiver = None
    if mode != "off":
        receiver = Receiver(mode)
        env = {"IM_WEBHOOKS_URL": receiver.start(), "IM_WEBHOOKS_SECRET": SECRET}
    with Stack(f"s8-{mode}", server_env=env) as stack:
        results = asyncio.run(scenario(stack, 1, messages=messages, concurrency=concurrency, warmup=200))
    result = results[0]
    result["mode"] = mode
    if receiver is not None:
        result["receiver_got"] = receiver.received
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--modes", default="off,slow,dead")
    args = parser.parse_args()
    modes = args.modes.split(",")
    by_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for round_no in range(args.rounds):
        for mode in modes:
            result = run_mode(mode, args.messages, args.concurrency)
            by_mode[mode].append(result)
            print(f"round {round_no + 1} {mode}: {json.dumps(result)}", flush=True)
    print("\nmedians:")
    for mode, runs in by_mode.items():
        figures = {
            key: statistics.median(r[key] for r in runs)
            for key in ("msgs_per_s", "lat_p50_ms", "lat_p99_ms", "lost")
            if all(key in r for r in runs)
        }
        print(f"  {mode}: {json.dumps(figures)}")


if __name__ == "__main__":
    main()
