"""Cluster scenario: delivery latency and throughput with 1 and 2 server processes on one nx-27017.

Three set-ups, each on a fresh database of the same nx-27017, with the scenario-1 load (D doctors
POST pm messages, C in flight, to R connected patients; POST start → socket receipt):

- ``1p-off``:  one process, IM_CHANGE_STREAMS=off (the test profile's default; scenario 1's set-up);
- ``1p-auto``: one process, IM_CHANGE_STREAMS=auto: alone, it opens no change stream (server/fanout.py),
  so this should match ``1p-off``;
- ``2p-auto``: two processes, both IM_CHANGE_STREAMS=auto; the patients' sockets are on process A
  and the doctors POST to process B, which holds no socket, so every message reaches its recipient
  through A's change stream.

Set-ups are interleaved within each repeat (off, auto, 2p, off, auto, 2p, ...) so that the noise of
a shared machine spreads over all three. Before each load the CPU of the idle processes is measured
for a moment (the change streams poll nx-27017 even when nothing is sent).
Figures per set-up: delivered msg/s, latency p50/p95/p99, lost, duplicates, CPU of every process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
import uuid
from typing import Any

import psutil

from bench.harness import CpuMeter, Stack, _stop_pid, free_port
from bench.s1_rest_ws import Receivers, run_once

SETUPS = ("1p-off", "1p-auto", "2p-auto")
IDLE_SECS = 2.0


class Setup:
    """The server process(es) of one set-up on the Stack's nx-27017 (a fresh database each time)."""

    def __init__(self, stack: Stack, name: str, run: int):
        self.stack = stack
        self.name = name
        self.run = run
        self.b: subprocess.Popen[bytes] | None = None
        self.b_url: str | None = None
        self.a_log_offset = 0

    def start(self) -> None:
        st = self.stack
        _stop_pid(st.server)
        st.db_name = f"bench_{uuid.uuid4().hex[:10]}"
        mode = "off" if self.name == "1p-off" else "auto"
        st.server_env = {"IM_CHANGE_STREAMS": mode}
        log_a = st.tmp / "server.log"
        self.a_log_offset = log_a.stat().st_size if log_a.exists() else 0
        st.restart_server()  # process A: the sockets (and, with one process, the POSTs too)
        if self.name == "2p-auto":
            port = free_port()
            self.b_url = f"http://127.0.0.1:{port}"
            log_name = f"server-b-{self.run}.log"
            self.b = st.spawn_server(port, log_name=log_name)
            st.wait_up(self.b, self.b_url, log_name=log_name)
            st._spy(self.b.pid, f"serverB{self.run}")

    def fanout_started(self) -> bool:
        """Every process of the set-up logged that it follows the change streams."""
        with open(self.stack.tmp / "server.log", "rb") as f:  # A's log of this start only
            f.seek(self.a_log_offset)
            logs = [f.read().decode(errors="replace")]
        if self.b is not None:
            logs.append((self.stack.tmp / f"server-b-{self.run}.log").read_text(errors="replace"))
        return all("change-stream fan-out started" in text for text in logs)

    def extra_procs(self) -> dict[str, psutil.Process]:
        return {"server_b": psutil.Process(self.b.pid)} if self.b is not None else {}

    def stop(self) -> None:
        _stop_pid(self.b)
        self.b = None


async def one(
    stack: Stack, setup: Setup, doctors: list[str], patients: list[str], messages: int, concurrency: int, warmup: int
) -> dict[str, Any]:
    setup.start()
    try:
        receivers = Receivers()
        await receivers.open(stack.ws_url, patients)  # always on process A
        stack.wait_sockets(len(patients))
        await asyncio.sleep(1.0)  # the sockets' backlog reads and presence writes settle
        with CpuMeter(stack, setup.extra_procs()) as idle:
            await asyncio.sleep(IDLE_SECS)
        try:
            kw: dict[str, Any] = {"post_base_url": setup.b_url, "cpu_extra": setup.extra_procs()}
            if warmup:
                await run_once(
                    stack, receivers, doctors, patients, warmup, concurrency, f"cl-{setup.name}-{setup.run}-warm", **kw
                )
            res = await run_once(
                stack, receivers, doctors, patients, messages, concurrency, f"cl-{setup.name}-{setup.run}", **kw
            )
        finally:
            await receivers.close()
        res["duplicates"] = receivers.duplicates
        res["fanout_started"] = setup.fanout_started() if setup.name != "1p-off" else False
        res.update({f"idle_{k}": v for k, v in idle.summary().items() if k.endswith("_pct")})
        return res
    finally:
        setup.stop()


async def scenario(
    stack: Stack,
    repeats: int,
    *,
    doctors: int = 10,
    patients: int = 100,
    messages: int = 1000,
    concurrency: int = 64,
    warmup: int = 200,
    setups: tuple[str, ...] = SETUPS,
) -> list[dict[str, Any]]:
    """One result per repeat, with the figures of every set-up prefixed by its name ("2p-auto.msgs_per_s")."""
    doctor_ids = [f"cl-doc-{i}" for i in range(doctors)]
    patient_ids = [f"cl-pat-{i}" for i in range(patients)]
    results = []
    for r in range(repeats):
        flat: dict[str, Any] = {}
        for name in setups:
            t0 = time.monotonic()
            res = await one(stack, Setup(stack, name, r), doctor_ids, patient_ids, messages, concurrency, warmup)
            print(f"  cluster run {r + 1} {name} ({time.monotonic() - t0:.0f} s): {json.dumps(res)}", flush=True)
            for key in (
                "msgs_per_s",
                "posts_per_s",
                "lat_p50_ms",
                "lat_p95_ms",
                "lat_p99_ms",
                "lat_max_ms",
                "delivered",
                "lost",
                "duplicates",
                "errors",
                "fanout_started",
                "cpu_server_s",
                "cpu_server_b_s",
                "cpu_nx_s",
                "cpu_loadgen_s",
                "idle_cpu_server_pct",
                "idle_cpu_server_b_pct",
                "idle_cpu_nx_pct",
            ):
                if key in res:
                    flat[f"{name}.{key}"] = res[key]
        flat.update({"doctors": doctors, "patients": patients, "concurrency": concurrency, "messages": messages})
        results.append(flat)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--doctors", type=int, default=10)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated: " + ",".join(SETUPS))
    args = parser.parse_args()
    with Stack("cluster") as stack:
        asyncio.run(
            scenario(
                stack,
                args.repeats,
                doctors=args.doctors,
                patients=args.patients,
                messages=args.messages,
                concurrency=args.concurrency,
                setups=tuple(s for s in args.setups.split(",") if s),
            )
        )


if __name__ == "__main__":
    main()
