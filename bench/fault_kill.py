"""SIGKILL the server under steady load; prove that nothing acknowledged is lost or duplicated.

    .venv/bin/python -m bench.fault_kill                      # 60 s, a kill every 8 s, 6 patients
    .venv/bin/python -m bench.fault_kill --duration 20 --kill-every 5 --patients 3 --json out.json

What runs (all on 127.0.0.1): its own nx-27017 (fresh data directory), one server process
(`python run.py`, test profile) and, as clients, N patients on WebSockets and one doctor (Rose) who
sends over REST and listens on a WebSocket. Every patient sends pm messages to Rose; Rose sends to
every patient in turn. Each send carries a clientMsgId; a send without an answer (the server died)
is retried with the same clientMsgId once the server is back, until it is acknowledged. Every
--kill-every seconds the server gets SIGKILL and is started again at once (what supervisord does).
Receivers mark what they got (`received`), reconnect with back-off and drop duplicates by id.

At the end every receiver reconnects once more and reads its backlog; then the checks, straight
from the database:
- every clientMsgId that was sent is stored exactly once, and every acknowledgement names the
  stored id (nothing acknowledged is lost; no retry made a second copy);
- seq is 1..n without gaps in every conversation;
- every stored message reached its recipient (after de-duplication by id) exactly once;
- with webhooks on (the default; --no-webhooks turns them off): a receiver answering at once got
  every stored message's message.created — those a killed process had not delivered are taken over
  by a later process once the dead one's heartbeat is stale, so this waits up to WEBHOOK_WAIT_SECS
  after the load.
Exit status 0 when all hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.receiver import Receiver  # noqa: E402
from server.auth import mint_token  # noqa: E402
from tests.processes import MongoProcess, ServerProcess, free_port, wait_until_serving  # noqa: E402

TEST_SECRET = "test-secret-0123456789abcdef0123456789"  # conf/test.toml
DOCTOR = "Rose"
ACK_TIMEOUT_SECS = 5.0
RETRY_PAUSE_SECS = 0.2
QUIET_SECS = 1.0
WEBHOOK_WAIT_SECS = 90.0  # a dead process's events are taken over 20-50 s after it died


@dataclasses.dataclass
class Report:
    duration_secs: float = 0.0
    kills: int = 0
    sends_attempted: int = 0  # distinct clientMsgIds
    send_retries: int = 0  # resends of an unanswered clientMsgId
    acknowledged: int = 0
    stored: int = 0
    stored_twice: int = 0
    acked_but_missing: int = 0
    ack_id_mismatch: int = 0
    seq_gaps: int = 0
    deliveries_expected: int = 0
    delivered: int = 0
    not_delivered: int = 0
    duplicate_frames_dropped: int = 0  # at-least-once redelivery, dropped by id as the SDK does
    webhook_events_expected: int = 0  # message.created of every stored message (webhooks on)
    webhook_events_missing: int = 0
    webhook_posts: int = 0  # POSTs the receiver answered; above expected: redeliveries after a kill
    webhook_wait_secs: float = 0.0  # after the load, until the receiver had every event
    reconnects: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class LiveClient:
    """One user's WebSocket: reconnects, marks `received`, de-duplicates by id, resolves acks."""

    def __init__(self, user: str, role: str, base_ws: str, report: Report):
        self.user = user
        self.url = f"{base_ws}/ws?token={mint_token(TEST_SECRET, user, role, 3600)}"
        self.report = report
        self.received: dict[str, dict[str, Any]] = {}
        self.acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.conn: ClientConnection | None = None
        self.last_frame_at = time.monotonic()
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()

    async def ensure_connected(self) -> ClientConnection:
        async with self._connecting:
            while self.conn is None:
                try:
                    self.conn = await connect(self.url, open_timeout=3, max_size=None)
                    self.report.reconnects += 1
                    self._reader = asyncio.ensure_future(self._read(self.conn))
                except (OSError, InvalidStatus, TimeoutError, ConnectionClosed):
                    await asyncio.sleep(RETRY_PAUSE_SECS)
            return self.conn

    async def _read(self, conn: ClientConnection) -> None:
        try:
            async for text in conn:
                self.last_frame_at = time.monotonic()
                frame = json.loads(text)
                if frame["type"] == "message":
                    message = frame["message"]
                    if message["id"] in self.received:
                        self.report.duplicate_frames_dropped += 1
                    self.received[message["id"]] = message
                    marker = {
                        "type": "received",
                        "channel": "pm",
                        "peer": message["from"] if message["from"] != self.user else message["to"],
                        "seq": message["seq"],
                    }
                    await conn.send(json.dumps(marker))
                elif frame["type"] in ("ack", "error") and frame.get("clientMsgId") in self.acks:
                    future = self.acks.pop(frame["clientMsgId"])
                    if not future.done():
                        future.set_result(frame)
        except ConnectionClosed:
            pass
        finally:
            if self.conn is conn:
                self.conn = None
            for future in self.acks.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection lost"))
            self.acks.clear()

    async def send_pm(self, to: str, client_msg_id: str, content: str) -> dict[str, Any]:
        """Send until acknowledged; the same clientMsgId on every attempt."""
        first = True
        while True:
            if not first:
                self.report.send_retries += 1
            first = False
            conn = await self.ensure_connected()
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # lost ones are retried
            self.acks[client_msg_id] = future
            try:
                await conn.send(
                    json.dumps(
                        {"type": "pm", "to": to, "contentType": 1, "content": content, "clientMsgId": client_msg_id}
                    )
                )
                reply = await asyncio.wait_for(future, ACK_TIMEOUT_SECS)
            except (ConnectionClosed, ConnectionError, TimeoutError):
                self.acks.pop(client_msg_id, None)
                await asyncio.sleep(RETRY_PAUSE_SECS)
                continue
            if reply["type"] == "ack":
                return reply["message"]  # type: ignore[no-any-return]
            await asyncio.sleep(RETRY_PAUSE_SECS)  # database_unavailable and the like: retry

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


async def rest_send(
    http: AsyncHTTPClient, base_url: str, token: str, to: str, client_msg_id: str, content: str, report: Report
) -> dict[str, Any]:
    body = json.dumps({"from": DOCTOR, "to": to, "contentType": 1, "content": content, "clientMsgId": client_msg_id})
    first = True
    while True:
        if not first:
            report.send_retries += 1
        first = False
        try:
            response = await http.fetch(
                HTTPRequest(
                    base_url + "/api/v1/chats/pm",
                    method="POST",
                    body=body,
                    headers={"Authorization": f"Bearer {token}"},
                    request_timeout=ACK_TIMEOUT_SECS,
                )
            )
            return json.loads(response.body)  # type: ignore[no-any-return]
        except (HTTPClientError, OSError, TimeoutError):
            await asyncio.sleep(RETRY_PAUSE_SECS)


async def run_scenario(
    mongo_uri: str,
    db_name: str,
    log_path: Path,
    *,
    duration_secs: float,
    kill_every_secs: float,
    patients: int,
    webhooks: bool = False,
) -> Report:
    """The whole scenario against a database that is already running; returns the report."""
    report = Report()
    port = free_port()
    receiver = Receiver("fast") if webhooks else None
    env = {}
    if receiver is not None:
        env = {"IM_WEBHOOKS_URL": receiver.start(), "IM_WEBHOOKS_SECRET": "fault-kill-webhook-secret-0123"}
        env["IM_WEBHOOKS_EVENTS"] = '["message.created"]'
    server = ServerProcess(port, mongo_uri, db_name, log_path, **env)
    server.start()
    base_url, base_ws = server.base_url, f"ws://127.0.0.1:{port}"
    names = [f"patient{i}" for i in range(patients)]
    clients = {name: LiveClient(name, "patient", base_ws, report) for name in names}
    rose = LiveClient(DOCTOR, "doctor", base_ws, report)
    http = AsyncHTTPClient(force_instance=True)
    doctor_token = mint_token(TEST_SECRET, DOCTOR, "doctor", 3600)
    acked: dict[str, dict[str, Any]] = {}
    attempted: set[str] = set()
    started = time.monotonic()
    stop_at = started + duration_secs

    async def patient_loop(name: str) -> None:
        k = 0
        while time.monotonic() < stop_at:
            k += 1
            cid = f"{name}-{k}"
            attempted.add(cid)
            acked[cid] = await clients[name].send_pm(DOCTOR, cid, f"from {name} #{k}")

    async def doctor_loop() -> None:
        k = 0
        while time.monotonic() < stop_at:
            k += 1
            cid = f"{DOCTOR}-{k}"
            attempted.add(cid)
            acked[cid] = await rest_send(
                http, base_url, doctor_token, names[k % patients], cid, f"to {names[k % patients]} #{k}", report
            )

    async def killer() -> None:
        while time.monotonic() + kill_every_secs < stop_at:
            await asyncio.sleep(kill_every_secs)
            assert server.process is not None
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)
            report.kills += 1
            server.start(wait=False)  # at once, as supervisord would
            await asyncio.get_running_loop().run_in_executor(None, wait_until_serving, base_url)

    try:
        await asyncio.gather(rose.ensure_connected(), *(c.ensure_connected() for c in clients.values()))
        await asyncio.gather(killer(), doctor_loop(), *(patient_loop(n) for n in names))
        report.duration_secs = round(time.monotonic() - started, 1)
        # Final round: every receiver reconnects and reads its backlog until it goes quiet.
        for client in [rose, *clients.values()]:
            await client.close()
        for client in [rose, *clients.values()]:
            await client.ensure_connected()
        while time.monotonic() - max(c.last_frame_at for c in [rose, *clients.values()]) < QUIET_SECS:
            await asyncio.sleep(0.1)
        for client in [rose, *clients.values()]:
            await client.close()
        if receiver is not None:
            await wait_for_webhooks(report, receiver, mongo_uri, db_name)
    finally:
        http.close()
        server.stop()
    verify(report, mongo_uri, db_name, attempted, acked, rose, clients)
    return report


async def wait_for_webhooks(report: Report, receiver: Receiver, mongo_uri: str, db_name: str) -> None:
    """Until the receiver has every stored message's message.created, at most WEBHOOK_WAIT_SECS."""
    db: Any = MongoClient(mongo_uri)[db_name]
    try:
        expected = {doc["_id"] for doc in db.pm.find({}, {"_id": 1})}
    finally:
        db.client.close()
    started = time.monotonic()
    while expected - receiver.ids and time.monotonic() - started < WEBHOOK_WAIT_SECS:
        await asyncio.sleep(0.5)
    report.webhook_wait_secs = round(time.monotonic() - started, 1)
    report.webhook_events_expected = len(expected)
    report.webhook_events_missing = len(expected - receiver.ids)
    report.webhook_posts = receiver.received
    if report.webhook_events_missing:
        report.problems.append(f"webhook_events_missing: {report.webhook_events_missing}")


def verify(
    report: Report,
    mongo_uri: str,
    db_name: str,
    attempted: set[str],
    acked: dict[str, dict[str, Any]],
    rose: LiveClient,
    clients: dict[str, LiveClient],
) -> None:
    db: Any = MongoClient(mongo_uri)[db_name]
    try:
        docs = list(db.pm.find({}, {"conv": 1, "seq": 1, "from": 1, "to": 1, "clientMsgId": 1}))
    finally:
        db.client.close()
    report.sends_attempted = len(attempted)
    report.acknowledged = len(acked)
    report.stored = len(docs)
    by_client_id: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_client_id.setdefault(doc.get("clientMsgId", ""), []).append(doc)
    report.stored_twice = sum(len(v) > 1 for v in by_client_id.values())
    for cid, message in acked.items():
        stored = by_client_id.get(cid, [])
        if not stored:
            report.acked_but_missing += 1
        elif stored[0]["_id"] != message["id"]:
            report.ack_id_mismatch += 1
    unexpected = set(by_client_id) - attempted
    seqs: dict[str, list[int]] = {}
    for doc in docs:
        seqs.setdefault(doc["conv"], []).append(doc["seq"])
    report.seq_gaps = sum(sorted(s) != list(range(1, len(s) + 1)) for s in seqs.values())
    for doc in docs:
        receiver = rose if doc["to"] == DOCTOR else clients[doc["to"]]
        report.deliveries_expected += 1
        if doc["_id"] in receiver.received:
            report.delivered += 1
        else:
            report.not_delivered += 1
    for name, value in [
        ("stored_twice", report.stored_twice),
        ("acked_but_missing", report.acked_but_missing),
        ("ack_id_mismatch", report.ack_id_mismatch),
        ("seq_gaps", report.seq_gaps),
        ("not_delivered", report.not_delivered),
        ("unexpected_stored", len(unexpected)),
    ]:
        if value:
            report.problems.append(f"{name}: {value}")
    if report.acknowledged != report.sends_attempted:
        report.problems.append(f"sends never acknowledged: {report.sends_attempted - report.acknowledged}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--kill-every", type=float, default=8.0, help="seconds between SIGKILLs (default 8)")
    parser.add_argument("--patients", type=int, default=6, help="patients on WebSockets (default 6)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument(
        "--no-webhooks",
        dest="webhooks",
        action="store_false",
        help="no webhook receiver (default: every event checked)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fault-kill-") as tmp:
        mongo = MongoProcess(Path(tmp) / "mongo")
        mongo.start()
        try:
            report = asyncio.run(
                run_scenario(
                    mongo.uri,
                    f"fk_{uuid.uuid4().hex[:8]}",
                    Path(tmp) / "server.log",
                    duration_secs=args.duration,
                    kill_every_secs=args.kill_every,
                    patients=args.patients,
                    webhooks=args.webhooks,
                )
            )
        finally:
            mongo.stop()
    summary = {k: v for k, v in dataclasses.asdict(report).items()}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print("OK: nothing acknowledged was lost or duplicated" if report.ok else f"FAILED: {report.problems}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
