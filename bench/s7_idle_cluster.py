"""Scenario 7: what cross-process delivery costs when nothing happens, and how fast it is when it does.

One nx-27017 and `python run.py` processes started as the tests start them: plain IM_PROFILE=test
(no IM_CHANGE_STREAMS override, so the profile's own `change_streams` setting decides), 127.0.0.1.

1. idle: server A alone on nx-27017, nothing connected, nothing sent; CPU of A and of nx-27017 as a
   share of one core over --idle-secs (psutil on their PIDs). This is the set-up of issue 11.6.
   Alone, A opens no change stream on the messages (server/fanout.py); it opens them when B comes up.
2. load: server B joins; --patients WebSocket clients connect to B, --doctors POST --messages pm
   messages to A at a steady --rate. Every message reaches its socket through B's change stream.
   Latency = POST start → socket receipt, p50/p99, and A's 201 → socket receipt (the change stream's
   share: the message is stored when A answers).
3. quiet: nothing sent for --quiet-secs (the sockets stay connected); CPU of A, B and nx-27017 over it,
   then one message on A: its latency to B's socket (the follower has backed off to its slowest poll).
   Repeated --quiet-rounds times.

    .venv/bin/python -m bench.s7_idle_cluster                      # about 2.5 minutes
    .venv/bin/python -m bench.s7_idle_cluster --idle-secs 20 --quiet-secs 20 --messages 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from typing import Any

import aiohttp
import psutil

from bench.harness import Stack, free_port, latency_figures, token
from bench.s1_rest_ws import Receivers


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def measure_idle(procs: dict[str, psutil.Process], secs: float) -> dict[str, float]:
    """Share of one core (%) each process used over `secs` of wall time."""
    before = {name: cpu_seconds(p) for name, p in procs.items()}
    t0 = time.perf_counter()
    await asyncio.sleep(secs)
    wall = time.perf_counter() - t0
    return {name: round(100 * (cpu_seconds(p) - before[name]) / wall, 2) for name, p in procs.items()}


def start_server(stack: Stack, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    proc = stack.spawn_server(port, log_name=f"{name}.log")
    stack.wait_up(proc, base_url, log_name=f"{name}.log")
    return proc, base_url


def wait_following(stack: Stack, name: str, timeout: float = 10.0) -> None:
    """A server opens the change streams once it sees another one alive (server/fanout.py)."""
    deadline = time.monotonic() + timeout
    while True:
        log = (stack.tmp / f"{name}.log").read_text(errors="replace")
        if "change-stream fan-out started" in log:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server {name} did not start the change-stream fan-out:\n{log[-2000:]}")
        time.sleep(0.1)


class Sender:
    """Doctors POSTing pm messages to one server; remembers when each send started."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, doctors: list[str], patients: list[str]):
        self.session = session
        self.url = base_url + "/api/v1/chats/pm"
        self.doctors = doctors
        self.patients = patients
        self.headers = {
            d: {"Authorization": f"Bearer {token(d, 'doctor')}", "Content-Type": "application/json"} for d in doctors
        }
        self.started: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.accepted: set[str] = set()
        self.errors: dict[str, int] = {}

    async def send(self, i: int, tag: str) -> str:
        doctor = self.doctors[i % len(self.doctors)]
        patient = self.patients[i % len(self.patients)]
        cid = f"{tag}-{i}"
        body = json.dumps({"from": doctor, "to": patient, "contentType": 1, "content": f"s7 {i}", "clientMsgId": cid})
        self.started[cid] = time.perf_counter()
        try:
            async with self.session.post(self.url, data=body, headers=self.headers[doctor]) as resp:
                await resp.read()
                self.answered[cid] = time.perf_counter()
                if resp.status == 201:
                    self.accepted.add(cid)
                else:
                    self.errors[str(resp.status)] = self.errors.get(str(resp.status), 0) + 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
        return cid

    async def send_steadily(self, count: int, rate: float, tag: str) -> list[str]:
        """`count` sends started 1/rate apart (not one after another: a slow answer delays nothing)."""
        t0 = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(i, tag)))
        return list(await asyncio.gather(*tasks))


async def scenario(args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack("s7")
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {
        "messages": args.messages,
        "rate": args.rate,
        "idle_secs": args.idle_secs,
        "quiet_secs": args.quiet_secs,
    }
    try:
        stack.start_mongo()
        assert stack.nx is not None
        nx = psutil.Process(stack.nx.pid)
        a, a_url = start_server(stack, "a")
        procs.append(a)
        await asyncio.sleep(args.settle_secs)  # start-up work and the follower's back-off are over
        idle = await measure_idle({"server": psutil.Process(a.pid), "nx": nx}, args.idle_secs)
        result["idle_1p_pct"] = idle
        print(
            f"idle, one server ({args.idle_secs:.0f} s): server {idle['server']} % + nx-27017 {idle['nx']} % "
            f"= {idle['server'] + idle['nx']:.2f} % of a core",
            flush=True,
        )

        b, b_url = start_server(stack, "b")
        procs.append(b)
        wait_following(stack, "a")
        wait_following(stack, "b")
        doctors = [f"s7-doc-{i}" for i in range(args.doctors)]
        patients = [f"s7-pat-{i}" for i in range(args.patients)]
        receivers = Receivers()
        await receivers.open(b_url.replace("http", "ws", 1) + "/ws", patients)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            sender = Sender(session, a_url, doctors, patients)
            warm = await sender.send_steadily(args.warmup, args.rate, "warm")
            await receivers.wait_for(set(warm) & sender.accepted, timeout=15)
            sent = await sender.send_steadily(args.messages, args.rate, "load")
            accepted = set(sent) & sender.accepted
            await receivers.wait_for(accepted, timeout=15)
            got = [cid for cid in sent if cid in receivers.received]
            lat = [receivers.received[cid] - sender.started[cid] for cid in got]
            # From A's 201 (the message is stored) to B's socket: the change stream's own share.
            after_store = [receivers.received[cid] - sender.answered[cid] for cid in got]
            load = {
                "accepted": len(accepted),
                "delivered": len(got),
                "lost": len(accepted) - len(got),
                "duplicates": receivers.duplicates,
                "errors": sender.errors,
                **latency_figures(lat),
                **latency_figures(after_store, "after_store"),
            }
            result["load"] = load
            print(
                f"load: {args.messages} messages at {args.rate:.0f}/s on A → {args.patients} sockets on B: "
                f"POST start → socket p50 {load['lat_p50_ms']} ms, p99 {load['lat_p99_ms']} ms, "
                f"max {load['lat_max_ms']} ms; A's 201 → socket p50 {load['after_store_p50_ms']} ms, "
                f"p99 {load['after_store_p99_ms']} ms; "
                f"lost {load['lost']}, duplicates {load['duplicates']}, errors {sender.errors}",
                flush=True,
            )

            rounds = []
            for r in range(args.quiet_rounds):
                quiet = await measure_idle(
                    {"server_a": psutil.Process(a.pid), "server_b": psutil.Process(b.pid), "nx": nx}, args.quiet_secs
                )
                cid = await sender.send(r, f"quiet{r}")
                await receivers.wait_for({cid}, timeout=15)
                first_ms = (
                    round(1000 * (receivers.received[cid] - sender.started[cid]), 1)
                    if cid in receivers.received
                    else None
                )
                rounds.append({"idle_2p_pct": quiet, "first_message_ms": first_ms})
                print(
                    f"quiet {args.quiet_secs:.0f} s, two servers with {args.patients} sockets on B: "
                    f"A {quiet['server_a']} % + B {quiet['server_b']} % + nx-27017 {quiet['nx']} % of a core; "
                    f"then the first message A → B took {first_ms} ms",
                    flush=True,
                )
            result["quiet"] = rounds
        await receivers.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(12)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        stack.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-secs", type=float, default=60.0, help="idle window, one server (60)")
    parser.add_argument("--quiet-secs", type=float, default=60.0, help="quiet window before the first message (60)")
    parser.add_argument("--quiet-rounds", type=int, default=1, help="quiet windows, each ended by one message (1)")
    parser.add_argument("--messages", type=int, default=1000, help="messages sent under load (1000)")
    parser.add_argument("--rate", type=float, default=50.0, help="steady send rate under load, msg/s (50)")
    parser.add_argument("--warmup", type=int, default=50, help="messages before the measured load (50)")
    parser.add_argument("--doctors", type=int, default=10)
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--settle-secs", type=float, default=5.0, help="wait after start-up before measuring (5)")
    args = parser.parse_args()
    result = asyncio.run(scenario(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
