"""Several server processes on one database: change-stream fan-out between them (SPEC §10)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time

import pytest
from pymongo import AsyncMongoClient, monitoring
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from server import fanout as fanout_module
from server.auth import mint_token
from server.fanout import PEER_POLL_SECS, QUIET_POLL_MAX_SECS, ChangeStreamFanout, PollPacer
from tests.helpers import wait_until
from tests.processes import ServerProcess, free_port

SECRET = "test-secret-0123456789abcdef0123456789"
pytestmark = pytest.mark.slow


async def post(process: ServerProcess, path: str, body: dict, sub: str, role: str) -> tuple[int, dict]:
    request = HTTPRequest(
        process.base_url + path,
        method="POST",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {mint_token(SECRET, sub, role)}"},
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, json.loads(response.body)


async def rose_to_jack(process: ServerProcess, content: str) -> tuple[int, dict]:
    """Doctor Rose sends patient Jack a pm over REST on `process`: (status, body)."""
    return await post(
        process,
        "/api/v1/chats/pm",
        {"from": "Rose", "to": "Jack", "contentType": 1, "content": content},
        "Rose",
        "doctor",
    )


async def connect(process: ServerProcess, user: str, role: str = "patient"):
    return await websocket_connect(f"ws://127.0.0.1:{process.port}/ws?token={mint_token(SECRET, user, role)}")


async def read_messages(conn, count: int, timeout: float = 10.0) -> list[dict]:
    got: list[dict] = []
    while len(got) < count:
        try:
            frame = json.loads(await asyncio.wait_for(conn.read_message(), timeout))
        except TimeoutError:
            raise AssertionError(f"got {len(got)} of {count} messages: {[m['seq'] for m in got]}") from None
        if frame["type"] == "message":
            got.append(frame["message"])
    return got


@pytest.mark.gen_test(timeout=60)
async def test_test_profile_delivers_a_message_sent_on_a_to_a_socket_on_b(cluster):
    a, b = cluster
    assert all("IM_CHANGE_STREAMS" not in p.env and p.env["IM_PROFILE"] == "test" for p in cluster)
    jack = await connect(b, "Jack")
    code, sent = await rose_to_jack(a, "sent on A")
    assert code == 201
    (got,) = await read_messages(jack, 1)
    assert got["id"] == sent["id"] and got["content"] == "sent on A"
    assert "change-stream fan-out started" in b.log_text()
    jack.close()


@pytest.mark.gen_test(timeout=60)
async def test_messages_posted_on_b_reach_a_socket_on_a_in_order_once(cluster):
    a, b = cluster
    jack = await connect(a, "Jack")
    sent = []
    for i in range(30):
        code, message = await rose_to_jack(b if i % 3 else a, f"m{i}")
        assert code == 201
        sent.append(message["id"])
    got = await read_messages(jack, 30)
    assert [m["seq"] for m in got] == list(range(1, 31))
    assert [m["id"] for m in got] == sent
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(jack.read_message(), 0.5)
    jack.close()


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_writers_on_both_processes_keep_each_socket_in_order(cluster):
    a, b = cluster
    on_a, on_b = await connect(a, "Jack"), await connect(b, "Jack")

    async def burst(process, sender, role, to, n):
        for i in range(n):
            code, _ = await post(
                process,
                "/api/v1/chats/pm",
                {"from": sender, "to": to, "contentType": 1, "content": f"{sender}{i}"},
                sender,
                role,
            )
            assert code == 201

    await asyncio.gather(burst(a, "Rose", "doctor", "Jack", 20), burst(b, "Jack", "patient", "Rose", 20))
    for conn in (on_a, on_b):
        seqs = [m["seq"] for m in await read_messages(conn, 40)]
        assert seqs == list(range(1, 41))
        conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_group_fan_out_and_consultation_events_cross_processes(cluster):
    a, b = cluster
    lily, jack = await connect(a, "Lily"), await connect(a, "Jack")
    code, _ = await post(
        b,
        "/api/v1/groups",
        {"id": "ward", "name": "Ward", "groupType": 0, "members": ["Rose", "Jack", "Lily"]},
        "platform",
        "service",
    )
    assert code == 201
    code, _ = await post(
        b,
        "/api/v1/chats/gm",
        {"from": "Rose", "group": "ward", "contentType": 1, "content": "rounds at 9"},
        "Rose",
        "doctor",
    )
    assert code == 201
    for conn in (lily, jack):
        created, gm = await read_messages(conn, 2)
        assert created["event"] == "group.created" and gm["content"] == "rounds at 9"
    code, consultation = await post(b, "/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, "Rose", "doctor")
    assert code == 201
    event = (await read_messages(jack, 1))[0]
    assert event["event"] == "consultation.started" and event["consultationId"] == consultation["id"]
    lily.close()
    jack.close()


@pytest.mark.gen_test(timeout=60)
async def test_killing_b_mid_stream_loses_nothing_acknowledged(cluster):
    a, b = cluster
    jack = await connect(a, "Jack")
    acknowledged = []
    under_way = asyncio.Event()

    async def doctor_on_b():
        for i in range(200):
            code, message = await rose_to_jack(b, f"k{i}")
            if code != 201:
                return
            acknowledged.append(message["id"])
            if len(acknowledged) == 20:
                under_way.set()

    sender = asyncio.ensure_future(doctor_on_b())
    await asyncio.wait_for(under_way.wait(), 20)  # mid-stream: 20 of 200 acknowledged
    b.signal(signal.SIGKILL)
    with contextlib.suppress(Exception):  # the connection to B broke mid-request: not acknowledged
        await sender
    assert acknowledged
    received = await read_messages(jack, len(acknowledged))
    ids = [m["id"] for m in received]
    assert ids[: len(acknowledged)] == acknowledged
    assert len(set(ids)) == len(ids)
    jack.close()


@pytest.mark.gen_test(timeout=60)
async def test_presence_is_shared_between_processes(cluster):
    a, b = cluster

    async def presence_on_b() -> dict:
        request = HTTPRequest(
            b.base_url + "/api/v1/users/Jack/presence",
            headers={"Authorization": f"Bearer {mint_token(SECRET, 'Rose', 'doctor')}"},
        )
        return json.loads((await AsyncHTTPClient().fetch(request)).body)

    async def online_on_b() -> bool:
        return (await presence_on_b())["online"] is True

    async def offline_on_b() -> bool:
        return (await presence_on_b())["online"] is False

    jack = await connect(a, "Jack")
    # The presence write is asynchronous and B reads what A stored: nothing to await but the store.
    await wait_until(online_on_b, timeout=2.5, interval=0.05, message="Jack not online on B")
    jack.close()
    await wait_until(offline_on_b, timeout=2.5, interval=0.05, message="Jack still online on B")
    gone = await presence_on_b()
    assert gone["online"] is False and gone["lastSeen"]


class GetMoreCounter(monitoring.CommandListener):
    """Counts the getMore commands a client sends, and when."""

    def __init__(self) -> None:
        self.sent_at: list[float] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "getMore":
            self.sent_at.append(time.monotonic())

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def count_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.sent_at if start <= t < end)


@pytest.fixture
def process_a(mongo, settings, tmp_path):
    """Another server process on this test's database (plain test profile)."""
    process = ServerProcess(free_port(), mongo.uri, settings.db_name, tmp_path / "a.log").start()
    yield process
    process.stop()


@pytest.mark.gen_test(timeout=60)
async def test_idle_follower_polls_a_few_times_a_second_and_the_first_message_after_still_comes_fast(
    services, settings, api, process_a
):
    """nx-27017 answers an empty getMore at once: a quiet follower must back off (it polled every 20 ms,
    150 getMores a second: 13 % of a core), yet deliver the first message after the quiet within 1 s."""
    counter = GetMoreCounter()
    client: AsyncMongoClient[dict] = AsyncMongoClient(settings.mongo_uri, tz_aware=True, event_listeners=[counter])
    # This process's fan-out, wired as server/lifecycle.py wires it, on a client whose getMores we count.
    fanout = ChangeStreamFanout(
        client[settings.db_name],
        services.hub,
        services.groups,
        services.messages.stored_ids,
        instance_id=services.presence.instance_id,
    )
    try:
        jack = await api.ws("Jack")
        fanout.start()
        started = time.monotonic()
        window_secs = 4 * QUIET_POLL_MAX_SECS
        # The pace doubles from 20 ms to QUIET_POLL_MAX_SECS within about 2 × QUIET_POLL_MAX_SECS.
        quiet_from = started + 2.5 * QUIET_POLL_MAX_SECS
        # The measuring window itself (the behaviour under test is how often a quiet follower polls).
        await asyncio.sleep(quiet_from + window_secs - time.monotonic())
        polls = counter.count_between(quiet_from, quiet_from + window_secs)
        # Three streams, each at most once per QUIET_POLL_MAX_SECS (+1 for the window's edges).
        assert polls <= 3 * (window_secs / QUIET_POLL_MAX_SECS + 1), polls

        code, sent = await rose_to_jack(process_a, "after the quiet")
        stored = time.monotonic()
        assert code == 201
        frame = await jack.recv_type("message")
        assert frame["message"]["id"] == sent["id"]
        assert time.monotonic() - stored < 1.0
    finally:
        await fanout.stop()
        await client.close()


def test_poll_pacer_backs_off_when_quiet_and_is_fast_again_on_a_change():
    now = [100.0]
    pacer = PollPacer(busy_secs=0.02, max_secs=0.6, hold_secs=2.0, clock=lambda: now[0])
    paces = []
    for _ in range(8):  # quiet: the pace doubles up to the cap
        wait = pacer.next_wait()
        assert 0 < wait <= pacer.pace_secs
        now[0] += wait
        paces.append(pacer.pace_secs)
    assert paces == pytest.approx([0.04, 0.08, 0.16, 0.32, 0.6, 0.6, 0.6, 0.6])
    # Waits end on multiples of the pace, so that quiet followers wake up together.
    assert now[0] / 0.6 == pytest.approx(round(now[0] / 0.6))

    pacer.note_change()
    now[0] += 0.001
    assert pacer.next_wait() <= 0.02 and pacer.pace_secs == 0.02  # fast again at once
    now[0] += 1.5
    pacer.next_wait()
    assert pacer.pace_secs == 0.02  # and stays fast while more changes may come
    now[0] += 1.0
    pacer.next_wait()
    assert pacer.pace_secs == pytest.approx(0.04)  # then backs off again


@pytest.mark.gen_test(timeout=60)
async def test_alone_a_process_follows_nothing_and_a_peer_starts_and_stops_its_streams(
    services, settings, api, mongo, tmp_path, monkeypatch
):
    """Alone, every message is this process's own: no stream is open. A peer that comes up opens
    them, and what it stored before they opened still reaches this process's socket, once; a
    peer gone for PEER_GONE_SECS closes them."""
    monkeypatch.setattr(fanout_module, "PEER_GONE_SECS", 1.0)
    fanout = ChangeStreamFanout(
        services.db, services.hub, services.groups, services.messages.stored_ids, instance_id="this-process"
    )
    jack = await api.ws("Jack")
    fanout.start()
    try:
        await asyncio.sleep(1.5 * PEER_POLL_SECS)
        assert not fanout.following

        peer = ServerProcess(free_port(), mongo.uri, settings.db_name, tmp_path / "peer.log").start()
        try:
            # Stored on the peer before this process looked again: only the catch-up can bring it.
            code, sent = await rose_to_jack(peer, "from the new peer")
            assert code == 201
            frame = await jack.recv_type("message", timeout=3 * PEER_POLL_SECS + 2)
            assert frame["message"]["id"] == sent["id"]
            assert fanout.following
            code, second = await rose_to_jack(peer, "through the stream")
            frame = await jack.recv_type("message", timeout=5)
            assert frame["message"]["id"] == second["id"]  # the first one was not delivered twice
        finally:
            peer.stop()  # a clean stop withdraws its instance
        await wait_until(lambda: not fanout.following, timeout=5 * PEER_POLL_SECS, message="streams still open")
    finally:
        await fanout.stop()


@pytest.mark.gen_test(timeout=90)
async def test_a_websocket_sender_never_gets_its_own_message_back_through_the_change_stream(cluster):
    """With a peer alive, this process follows its own inserts too: the change stream can hand a
    message back before the insert's reply, and the sender's socket got it as a message frame (an
    echo of ~0.5 % of sends). 10 pairs on A, 60 messages each way, 4 in flight per sender."""
    a, b = cluster
    await wait_until(lambda: "change-stream fan-out started" in a.log_text(), timeout=10, message="A not following")
    pairs = [(f"echo-{i}a", f"echo-{i}b") for i in range(10)]
    users = [u for pair in pairs for u in pair]
    conns = {user: await connect(a, user) for user in users}
    partner = {x: y for pair in pairs for x, y in (pair, pair[::-1])}
    per_user, window = 60, 4
    echoes: list[tuple[str, int]] = []
    received = {user: 0 for user in users}
    acked = {user: 0 for user in users}

    async def read(user: str) -> None:
        while received[user] < per_user or acked[user] < per_user:
            raw = await asyncio.wait_for(conns[user].read_message(), 20)
            assert raw is not None, f"{user}'s socket closed"
            frame = json.loads(raw)
            if frame["type"] == "message":
                if frame["message"]["from"] == user:
                    echoes.append((user, frame["message"]["seq"]))
                else:
                    received[user] += 1
            elif frame["type"] == "ack":
                acked[user] += 1
            elif frame["type"] == "error":
                raise AssertionError(frame)

    async def send(user: str) -> None:
        for i in range(per_user):
            while i - acked[user] >= window:
                await asyncio.sleep(0.002)
            frame = {
                "type": "pm",
                "to": partner[user],
                "contentType": 1,
                "content": f"{i}",
                "clientMsgId": f"{user}-{i}",
            }
            await conns[user].write_message(json.dumps(frame))

    await asyncio.gather(*(read(u) for u in users), *(send(u) for u in users))
    assert echoes == []
    assert all(n == per_user for n in received.values())
    for conn in conns.values():
        conn.close()
