"""Several server processes on one database: change-stream fan-out between them (SPEC §10)."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from server.auth import mint_token
from tests.conftest import free_port
from tests.processes import ServerProcess

SECRET = "test-secret-0123456789abcdef0123456789"
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(mongo, tmp_path):
    db_name = f"c_{uuid.uuid4().hex[:10]}"
    processes = [ServerProcess(free_port(), mongo.uri, db_name, tmp_path / f"server-{i}.log",
                               IM_CHANGE_STREAMS="auto") for i in range(2)]
    for process in processes:
        process.start()
    yield processes
    for process in processes:
        process.stop()


async def post(process: ServerProcess, path: str, body: dict, sub: str, role: str) -> tuple[int, dict]:
    request = HTTPRequest(process.base_url + path, method="POST", body=json.dumps(body),
                          headers={"Authorization": f"Bearer {mint_token(SECRET, sub, role)}"})
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, json.loads(response.body)


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
async def test_messages_posted_on_b_reach_a_socket_on_a_in_order_once(cluster):
    a, b = cluster
    jack = await connect(a, "Jack")
    sent = []
    for i in range(30):
        code, message = await post(b if i % 3 else a, "/api/v1/chats/pm",
                                   {"from": "Rose", "to": "Jack", "contentType": 1, "content": f"m{i}"},
                                   "Rose", "doctor")
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
            code, _ = await post(process, "/api/v1/chats/pm", {"from": sender, "to": to, "contentType": 1,
                                                               "content": f"{sender}{i}"}, sender, role)
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
    code, _ = await post(b, "/api/v1/groups", {"id": "ward", "name": "Ward", "groupType": 0,
                                               "members": ["Rose", "Jack", "Lily"]}, "platform", "service")
    assert code == 201
    code, _ = await post(b, "/api/v1/chats/gm", {"from": "Rose", "group": "ward", "contentType": 1,
                                                 "content": "rounds at 9"}, "Rose", "doctor")
    assert code == 201
    for conn in (lily, jack):
        created, gm = await read_messages(conn, 2)
        assert created["event"] == "group.created" and gm["content"] == "rounds at 9"
    code, consultation = await post(b, "/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"},
                                    "Rose", "doctor")
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

    async def doctor_on_b():
        for i in range(200):
            code, message = await post(b, "/api/v1/chats/pm", {"from": "Rose", "to": "Jack", "contentType": 1,
                                                               "content": f"k{i}"}, "Rose", "doctor")
            if code != 201:
                return
            acknowledged.append(message["id"])

    sender = asyncio.ensure_future(doctor_on_b())
    await asyncio.sleep(0.5)
    b.signal(signal.SIGKILL)
    try:
        await sender
    except Exception:
        pass  # the connection to B broke mid-request: that message was not acknowledged
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
        request = HTTPRequest(b.base_url + "/api/v1/users/Jack/presence",
                              headers={"Authorization": f"Bearer {mint_token(SECRET, 'Rose', 'doctor')}"})
        return json.loads((await AsyncHTTPClient().fetch(request)).body)

    jack = await connect(a, "Jack")
    for _ in range(50):  # the presence write is asynchronous
        if (await presence_on_b())["online"]:
            break
        await asyncio.sleep(0.05)
    assert (await presence_on_b())["online"] is True
    jack.close()
    for _ in range(50):
        if not (await presence_on_b())["online"]:
            break
        await asyncio.sleep(0.05)
    gone = await presence_on_b()
    assert gone["online"] is False and gone["lastSeen"]
