"""Scenario 4, capacity: N idle authenticated WebSocket connections on one server process.

The load is spread over W worker processes (one asyncio loop each, each with at most `inflight`
handshakes under way). Figures: connections held (as the load generator and the server's own
/api/v1/status count them), handshakes per second while connecting (first connect start → last
handshake done), handshake latency p50/p99, server RSS before and right after the last handshake
and its growth per connection, and how many sockets are still open (and which close codes the
others got) after a 2-second settle. The server gets a fresh process (same database) for every repeat, so each baseline
is clean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import multiprocessing.connection
import time
from typing import Any

import psutil

from bench.harness import CpuMeter, Stack, latency_figures, raise_nofile, ws_connect_kwargs


def _worker(pipe: multiprocessing.connection.Connection, ws_url: str, users: list[str], inflight: int) -> None:
    """One load-generator process: wait for 'go', connect every user, report, hold until 'close'."""
    raise_nofile()
    from bench.harness import token

    tokens = [token(u, "patient") for u in users]
    pipe.send(("ready", len(users)))
    assert pipe.recv() == "go"
    asyncio.run(_hold(pipe, ws_url, tokens, inflight))


async def _hold(pipe: multiprocessing.connection.Connection, ws_url: str, tokens: list[str], inflight: int) -> None:
    from websockets.asyncio.client import connect

    sem = asyncio.Semaphore(inflight)
    conns: list[Any] = []
    lat: list[float] = []
    done_at: list[float] = []
    errors: dict[str, int] = {}
    t0 = time.time()

    async def one(tok: str) -> None:
        async with sem:
            s = time.perf_counter()
            try:
                conn = await connect(f"{ws_url}?token={tok}", **ws_connect_kwargs())
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            lat.append(time.perf_counter() - s)
            done_at.append(time.time())
            conns.append(conn)

    await asyncio.gather(*(one(t) for t in tokens))
    pipe.send(
        ("connected", {"ok": len(conns), "errors": errors, "lat": lat, "t0": t0, "t_last": max(done_at, default=t0)})
    )
    loop = asyncio.get_running_loop()
    while (order := await loop.run_in_executor(None, pipe.recv)) == "count":
        codes: dict[str, int] = {}
        for c in conns:
            if c.close_code is not None:
                codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
        pipe.send(("count", {"open": len(conns) - sum(codes.values()), "closed_by_code": codes}))
    assert order == "close"
    # Close in bounded batches so the server is not hit by N close handshakes at once.
    for i in range(0, len(conns), 500):
        await asyncio.gather(*(c.close() for c in conns[i : i + 500]), return_exceptions=True)
    pipe.send(("closed", len(conns)))


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def run_once(stack: Stack, connections: int, workers: int, inflight: int, rnd: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    users = [f"s4-r{rnd}-u{i}" for i in range(connections)]
    chunks = [users[i::workers] for i in range(workers)]
    pipes, procs = [], []
    for chunk in chunks:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, stack.ws_url, chunk, inflight), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        for pipe in pipes:
            assert pipe.recv()[0] == "ready"
        server_pid = stack.server.pid  # type: ignore[union-attr]
        time.sleep(1.0)
        rss_before = _rss(server_pid)
        extra = {f"worker{i}": psutil.Process(p.pid) for i, p in enumerate(procs)}
        with CpuMeter(stack, extra) as cpu:
            for pipe in pipes:
                pipe.send("go")
            reports = [pipe.recv()[1] for pipe in pipes]
            ok = sum(r["ok"] for r in reports)
            # RSS while every handshake is done (before any server-side close can shrink the set).
            rss_connected = _rss(server_pid)
            server_count = stack.wait_sockets(ok, timeout=15)
            time.sleep(2.0)  # let presence writes and backlog queries settle
            rss_settled = _rss(server_pid)
            for pipe in pipes:
                pipe.send("count")
            counts = [pipe.recv()[1] for pipe in pipes]
        ok = sum(r["ok"] for r in reports)
        errors: dict[str, int] = {}
        for r in reports:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        t0 = min(r["t0"] for r in reports)
        t_last = max(r["t_last"] for r in reports)
        lat = [x for r in reports for x in r["lat"]]
        still_open = sum(c["open"] for c in counts)
        closed: dict[str, int] = {}
        for c in counts:
            for k, v in c["closed_by_code"].items():
                closed[k] = closed.get(k, 0) + v
        res = {
            "connections": ok,
            "server_sockets": server_count,
            "errors": errors,
            "workers": workers,
            "handshakes_per_s": round(ok / (t_last - t0), 1) if ok else 0.0,
            "connect_wall_s": round(t_last - t0, 2),
            **latency_figures(lat, "handshake"),
            "held_after_settle": still_open,
            "closed_by_server": closed,
            "rss_before_mib": round(rss_before / 2**20, 1),
            "rss_connected_mib": round(rss_connected / 2**20, 1),
            "rss_settled_mib": round(rss_settled / 2**20, 1),
            "rss_per_conn_kib": round((rss_connected - rss_before) / max(ok, 1) / 1024, 1),
            **{k: v for k, v in cpu.summary().items() if k.endswith("_s")},
        }
        for pipe in pipes:
            pipe.send("close")
        for pipe in pipes:
            pipe.recv()
        stack.wait_sockets(0, timeout=20)
        return res
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


def scenario(
    stack: Stack, repeats: int, *, connections: int = 10_000, workers: int = 2, inflight: int = 100
) -> list[dict[str, Any]]:
    results = []
    for r in range(repeats):
        if r:
            stack.restart_server()
        res = run_once(stack, connections, workers, inflight, r)
        results.append(res)
        print(f"  s4 run {r + 1}: {json.dumps(res)}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--inflight", type=int, default=100)
    args = parser.parse_args()
    raise_nofile()
    with Stack("s4") as stack:
        scenario(stack, args.repeats, connections=args.connections, workers=args.workers, inflight=args.inflight)


if __name__ == "__main__":
    main()
