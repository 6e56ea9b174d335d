"""Per-message receipts from the marker history (SPEC §13)."""

from __future__ import annotations

import pytest

from tests.helpers import DOCTOR, PATIENT, SERVICE, assert_error, make_group


@pytest.mark.gen_test
async def test_pm_receipt_shows_when_received_then_read(api):
    first = await api.send_pm("Rose", "Jack", "one")
    second = await api.send_pm("Rose", "Jack", "two")
    url = f"/api/v1/chats/pm/{second['id']}/receipts"
    empty = await api.get(url, as_=DOCTOR)
    assert empty.code == 200 and empty.json == {
        "message": second["id"],
        "receipts": [{"user": "Jack", "receivedAt": None, "readAt": None}],
    }
    sock = await api.ws("Jack")
    await sock.recv_type("message")
    await sock.send({"type": "received", "channel": "pm", "peer": "Rose", "seq": 2})
    await sock.send({"type": "ping"})
    await sock.recv_type("pong")
    got = (await api.get(url, as_=DOCTOR)).json["receipts"][0]
    assert got["receivedAt"] and got["readAt"] is None
    body = {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 1}
    await api.post("/api/v1/conversations/read", body, as_=PATIENT)
    assert (await api.get(url, as_=DOCTOR)).json["receipts"][0]["readAt"] is None  # read only up to 1
    one = (await api.get(f"/api/v1/chats/pm/{first['id']}/receipts", as_=SERVICE)).json["receipts"][0]
    assert one["readAt"] and one["receivedAt"] <= one["readAt"]
    await api.post("/api/v1/conversations/read", {**body, "seq": 2}, as_=PATIENT)
    final = (await api.get(url, as_=("ops", "admin"))).json["receipts"][0]
    assert final["receivedAt"] == got["receivedAt"] and final["readAt"] >= final["receivedAt"]


@pytest.mark.gen_test
async def test_group_receipts_name_the_members_when_it_was_sent(api):
    await make_group(api, gid="ward-9", members=("Rose", "Jack", "Lily"))
    sent = await api.post(
        "/api/v1/chats/gm", {"from": "Rose", "group": "ward-9", "contentType": 1, "content": "hi"}, as_=DOCTOR
    )
    assert sent.code == 201
    await api.post("/api/v1/groups/ward-9/members", {"members": ["Ann"]}, as_=SERVICE)
    await api.request("DELETE", "/api/v1/groups/ward-9/members/Lily", as_=SERVICE)
    body = {"user_id": "Jack", "channel": "gm", "group": "ward-9", "seq": 2}
    assert (await api.post("/api/v1/conversations/read", body, as_=PATIENT)).code == 200
    receipts = (await api.get(f"/api/v1/chats/gm/{sent.json['id']}/receipts", as_=DOCTOR)).json["receipts"]
    assert [r["user"] for r in receipts] == ["Jack", "Lily"]  # sender excluded; Ann joined later
    assert receipts[0]["readAt"] and receipts[0]["receivedAt"] and receipts[1]["readAt"] is None


@pytest.mark.gen_test
async def test_sm_receipt_and_who_may_ask(api):
    sent = await api.post(
        "/api/v1/chats/sm", {"to": "Jack", "title": "t", "summary": "s", "contentType": 1, "content": "c"}, as_=SERVICE
    )
    assert sent.code == 201
    url = f"/api/v1/chats/sm/{sent.json['id']}/receipts"
    assert (await api.get(url, as_=SERVICE)).json["receipts"] == [{"user": "Jack", "receivedAt": None, "readAt": None}]
    assert_error(await api.get(url, as_=PATIENT), 403)
    assert_error(await api.get(url, as_=DOCTOR), 403)
    assert_error(await api.get("/api/v1/chats/sm/nope/receipts", as_=SERVICE), 404)
    assert_error(await api.get(url), 401)
