"""The WebSocket protocol: handshake, real-time and deferred delivery, acks, receipts, bad frames."""

from __future__ import annotations

import asyncio
import json

import pytest
from tornado.httpclient import HTTPClientError

from tests.helpers import DOCTOR, make_group


def pm_frame(to: str, content: str, client_msg_id: str, **extra) -> dict:
    return {"type": "pm", "to": to, "contentType": 1, "content": content, "clientMsgId": client_msg_id, **extra}


@pytest.mark.gen_test
@pytest.mark.parametrize("token", ["", "garbage", "a.b.c"])
async def test_bad_token_is_refused_at_the_handshake(api, token):
    with pytest.raises(HTTPClientError) as refused:
        await api.ws("Jack", token=token or None) if token else await _connect_without_token(api)
    assert refused.value.code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "unauthenticated"


async def _connect_without_token(api):
    from tornado.websocket import websocket_connect

    return await websocket_connect(api.base_url.replace("http", "ws", 1) + "/ws")


@pytest.mark.gen_test
async def test_expired_token_is_refused(api, token):
    with pytest.raises(HTTPClientError) as refused:
        await api.ws("Jack", token=token("Jack", "patient", ttl_secs=-10))
    assert refused.value.code == 401


@pytest.mark.gen_test
async def test_message_reaches_every_connection_and_the_senders_others(api):
    phone, tablet = await api.ws("Jack"), await api.ws("Jack")
    doctor_desk, doctor_phone = await api.ws("Rose", "doctor"), await api.ws("Rose", "doctor")
    ack = await phone.send_and_ack(pm_frame("Rose", "my head hurts", "c1"))
    assert ack["type"] == "ack" and ack["clientMsgId"] == "c1"
    message = ack["message"]
    assert message["from"] == "Jack" and message["seq"] == 1 and message["clientMsgId"] == "c1"
    for socket in (tablet, doctor_desk, doctor_phone):
        assert (await socket.recv_type("message"))["message"] == message
    await phone.expect_silence()  # the sending connection got the ack instead


@pytest.mark.gen_test
async def test_rest_message_reaches_the_patient_socket_at_once(api):
    jack = await api.ws("Jack")
    sent = await api.send_pm("Rose", "Jack", "results are fine")
    assert (await jack.recv_type("message"))["message"] == sent


@pytest.mark.gen_test
async def test_offline_user_gets_the_backlog_then_live_messages(api):
    for i in range(1, 4):
        await api.send_pm("Rose", "Jack", f"r{i}")
    await api.send_pm("Lily", "Jack", "from Lily")
    await api.post(
        "/api/v1/chats/sm",
        {"to": "Jack", "title": "T", "summary": "S", "contentType": 1, "content": "system"},
        as_=("platform", "service"),
    )
    jack = await api.ws("Jack")
    got = [(await jack.recv_type("message"))["message"] for _ in range(5)]
    by_peer = {}
    for m in got:
        by_peer.setdefault((m["channel"], m["from"]), []).append(m["seq"])
    assert by_peer == {("pm", "Rose"): [1, 2, 3], ("pm", "Lily"): [1], ("sm", "platform"): [1]}
    live = await api.send_pm("Rose", "Jack", "live")
    assert (await jack.recv_type("message"))["message"] == live


@pytest.mark.gen_test
async def test_received_marker_stops_redelivery_and_unmarked_messages_come_again(api):
    for i in range(3):
        await api.send_pm("Rose", "Jack", f"m{i}")
    first = await api.ws("Jack")
    got = [(await first.recv_type("message"))["message"]["seq"] for _ in range(3)]
    assert got == [1, 2, 3]
    await first.send({"type": "received", "channel": "pm", "peer": "Rose", "seq": 2})
    await first.send({"type": "ping"})
    await first.recv_type("pong")  # frames are handled in order: the marker is stored
    first.close()
    again = await api.ws("Jack")
    assert (await again.recv_type("message"))["message"]["seq"] == 3  # at least once: 3 was not marked
    await again.expect_silence()


@pytest.mark.gen_test(timeout=60)
async def test_backlog_and_concurrent_live_messages_have_no_gap_and_no_duplicate(api):
    backlog = 150
    await asyncio.gather(*[api.send_pm("Rose", "Jack", f"b{i}") for i in range(backlog)])

    live_started = asyncio.Event()

    async def live_sender():
        for i in range(60):
            await api.send_pm("Rose", "Jack", f"l{i}")
            live_started.set()

    sender = asyncio.ensure_future(live_sender())
    await live_started.wait()  # live sends are under way while Jack connects and reads his backlog
    jack = await api.ws("Jack")
    seqs = []
    while len(seqs) < backlog + 60:
        seqs.append((await jack.recv_type("message", timeout=10))["message"]["seq"])
    await sender
    assert seqs == list(range(1, backlog + 61))
    await jack.expect_silence()


@pytest.mark.gen_test
async def test_ws_send_is_idempotent_by_client_msg_id(api):
    jack = await api.ws("Jack")
    first = await jack.send_and_ack(pm_frame("Rose", "once", "same"))
    again = await jack.send_and_ack(pm_frame("Rose", "once", "same"))
    assert again["type"] == "ack" and again["message"] == first["message"]
    listed = await api.get("/api/v1/chats/pm?user_id=Rose&peer=Jack", as_=DOCTOR)
    assert len(listed.json["messages"]) == 1


@pytest.mark.gen_test(timeout=30)
async def test_rest_and_ws_sends_at_once_share_no_seq(api):
    jack = await api.ws("Jack")
    for i in range(30):
        await jack.send(pm_frame("Rose", f"ws{i}", f"w{i}"))
    rest = await asyncio.gather(*[api.send_pm("Rose", "Jack", f"rest{i}") for i in range(30)])
    acks = []
    while len(acks) < 30:
        frame = await jack.recv()
        if frame["type"] == "ack":
            acks.append(frame["message"]["seq"])
    assert sorted(acks + [m["seq"] for m in rest]) == list(range(1, 61))


@pytest.mark.gen_test
async def test_read_sends_a_receipt_to_the_other_party(api):
    rose = await api.ws("Rose", "doctor")
    jack = await api.ws("Jack")
    await api.send_pm("Rose", "Jack", "please confirm")
    await jack.recv_type("message")
    await rose.recv_type("message")
    await jack.send({"type": "read", "channel": "pm", "peer": "Rose", "seq": 1})
    receipt = await rose.recv_type("receipt")
    assert receipt == {"type": "receipt", "channel": "pm", "user": "Jack", "seq": 1}


@pytest.mark.gen_test
async def test_group_send_receipts_and_mentions_over_ws(api):
    await make_group(api, members=("Rose", "Jack", "Lily"))
    rose, jack, lily = await api.ws("Rose", "doctor"), await api.ws("Jack"), await api.ws("Lily")
    for s in (rose, jack, lily):
        await s.recv_type("message")  # the group.created notice from the backlog
    ack = await rose.send_and_ack(
        {
            "type": "gm",
            "group": "care-1",
            "groupType": 1,
            "at": ["Jack"],
            "contentType": 1,
            "content": "@Jack how are you?",
            "clientMsgId": "g1",
        }
    )
    assert ack["type"] == "ack" and ack["message"]["at"] == ["Jack"] and ack["message"]["seq"] == 2
    for s in (jack, lily):
        assert (await s.recv_type("message"))["message"] == ack["message"]
    await jack.send({"type": "read", "channel": "gm", "group": "care-1", "seq": 2})
    for s in (rose, lily):
        assert await s.recv_type("receipt") == {
            "type": "receipt",
            "channel": "gm",
            "user": "Jack",
            "seq": 2,
            "group": "care-1",
        }
    error = await jack.send_and_ack(
        {"type": "gm", "group": "other", "contentType": 1, "content": "x", "clientMsgId": "g2"}
    )
    assert error["type"] == "error" and error["code"] == "not_found"


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "frame, field",
    [
        ("not json", "frame"),
        ("[1, 2]", "frame"),
        ('{"type": "dance"}', "type"),
        ('{"no": "type"}', "type"),
        ('{"type": "pm", "to": "Rose", "contentType": 1, "content": "x"}', "clientMsgId"),
        ('{"type": "pm", "to": {"$gt": ""}, "contentType": 1, "content": "x", "clientMsgId": "e"}', "to"),
        ('{"type": "pm", "to": "Rose", "contentType": 9, "content": "x", "clientMsgId": "e"}', "contentType"),
        ('{"type": "read", "channel": "pm", "peer": "Rose", "seq": "x"}', "seq"),
        ('{"type": "received", "channel": "zz", "seq": 1}', "channel"),
    ],
)
async def test_malformed_frames_get_an_error_frame_and_the_socket_stays_open(api, frame, field):
    jack = await api.ws("Jack")
    await jack.conn.write_message(frame)
    error = await jack.recv_type("error")
    assert error["code"] in ("invalid_field", "invalid_body") and field in error["message"], error
    if '"clientMsgId": "e"' in frame:
        assert error["clientMsgId"] == "e"
    await jack.send({"type": "ping"})
    assert await jack.recv_type("pong") == {"type": "pong"}


@pytest.mark.gen_test
async def test_binary_frames_get_an_error_frame(api):
    jack = await api.ws("Jack")
    await jack.conn.write_message(b"\x00\x01binary", binary=True)
    assert (await jack.recv_type("error"))["code"] == "invalid_field"


@pytest.mark.gen_test
async def test_frames_over_64_kib_close_with_1009(api):
    jack = await api.ws("Jack")
    await jack.conn.write_message(json.dumps({"type": "ping", "pad": "x" * 70_000}))
    assert await jack.recv() is None
    assert jack.conn.close_code == 1009


@pytest.mark.gen_test
async def test_send_as_someone_else_is_impossible_over_ws(api):
    jack = await api.ws("Jack")
    ack = await jack.send_and_ack(pm_frame("Rose", "hi", "f1", **{"from": "Mallory"}))
    assert ack["type"] == "ack" and ack["message"]["from"] == "Jack"
