"""Recall and edit, with the original kept for the record (SPEC §14): REST, WebSocket, files, the
offline backlog, idempotency, races, webhooks, audit, and two server processes."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import uuid
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from server.auth import mint_token
from server.config import ConfigError, load_settings
from tests.helpers import DOCTOR, PATIENT, SERVICE, assert_error, make_group
from tests.processes import ServerProcess, free_port
from tests.test_files import multipart, png_bytes

ADMIN = ("ops", "admin")
LILY = ("Lily", "patient")
PM_LIST = "/api/v1/chats/pm?user_id=Jack&peer=Rose"


def recall_path(message: dict[str, Any]) -> str:
    return f"/api/v1/chats/{message['channel']}/{message['id']}/recall"


def message_path(message: dict[str, Any]) -> str:
    return f"/api/v1/chats/{message['channel']}/{message['id']}"


async def recall(api, message: dict[str, Any], as_=DOCTOR, body: Any = None):
    return await api.post(recall_path(message), body, as_=as_)


async def edit(api, message: dict[str, Any], body: dict[str, Any], as_=DOCTOR):
    return await api.request("PATCH", message_path(message), body, as_=as_)


async def history(api, message: dict[str, Any], as_=ADMIN):
    return await api.get(f"{message_path(message)}/history", as_=as_)


async def pm_messages(api, as_=PATIENT, path: str = PM_LIST) -> list[dict[str, Any]]:
    response = await api.get(path, as_=as_)
    assert response.code == 200, response.body
    return response.json["messages"]  # type: ignore[no-any-return]


async def audit_entries(api, action: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/v1/audit?action={action}", as_=ADMIN)
    assert response.code == 200, response.body
    return response.json["entries"]  # type: ignore[no-any-return]


async def age_message(services, message: dict[str, Any], secs: float) -> None:
    """Make a stored message look sent `secs` seconds ago (the windows count from createdAt)."""
    created = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=secs)
    await services.db[message["channel"]].update_one({"_id": message["id"]}, {"$set": {"createdAt": created}})


# ---- REST ---------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_sender_recalls_its_message_and_every_view_shows_it_recalled(api):
    sent = await api.send_pm("Rose", "Jack", "take 50 mg twice a day", clientMsgId="d-1")
    response = await recall(api, sent, body={"reason": "wrong patient"})
    assert response.code == 200, response.body
    recalled = response.json
    assert recalled["id"] == sent["id"] and recalled["seq"] == 1 and recalled["clientMsgId"] == "d-1"
    assert recalled["recalled"] is True and recalled["recalledBy"] == "Rose" and recalled["content"] == ""
    assert recalled["recalledAt"] >= sent["createdAt"] and recalled["recalledAt"].endswith("Z")

    # The message itself changed, and a notice follows it with the next seq.
    first, notice = await pm_messages(api)
    assert first == recalled
    assert notice["seq"] == 2 and notice["event"] == "message.recalled" and notice["target"] == sent["id"]
    assert notice["from"] == "Rose" and notice["to"] == "Jack" and notice["parties"] == ["Jack", "Rose"]
    assert notice["content"] == "Rose recalled a message" and notice["contentType"] == 1
    assert "recalled" not in notice and "eventKey" not in notice

    # The conversation list shows the notice, the newest message (what a production client shows).
    conversations = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"]
    assert [c["lastMessage"]["id"] for c in conversations] == [notice["id"]]
    assert conversations[0]["unread"] == 2

    # The original is kept: admin sees every version, oldest first.
    body = (await history(api, sent)).json
    assert body["message"] == recalled
    assert [(v["action"], v["content"], v["by"]) for v in body["versions"]] == [
        ("created", "take 50 mg twice a day", "Rose"),
        ("recalled", "", "Rose"),
    ]
    assert body["versions"][0]["at"] == sent["createdAt"] and body["versions"][1]["at"] == recalled["recalledAt"]
    assert body["versions"][1]["reason"] == "wrong patient"

    # Repeating the recall changes nothing more: the same message, no second notice.
    again = await recall(api, sent)
    assert again.code == 200 and again.json == recalled
    assert [m["seq"] for m in await pm_messages(api)] == [1, 2]

    [entry] = await audit_entries(api, "message.recalled")
    assert entry["actor"] == "Rose" and entry["via"] == "rest" and entry["outcome"] == "ok"
    assert entry["target"] == {"channel": "pm", "messageId": sent["id"], "seq": 1, "user": "Rose", "peer": "Jack"}
    [read] = await audit_entries(api, "message.history.read")
    assert read["actor"] == "ops" and read["target"]["messageId"] == sent["id"]


@pytest.mark.gen_test
async def test_sender_edits_and_every_version_is_kept_oldest_first(api):
    sent = await api.send_pm("Rose", "Jack", "take 500 mg")
    response = await edit(api, sent, {"content": "take 50 mg", "clientMsgId": "e-1"})
    assert response.code == 200, response.body
    edited = response.json
    assert edited["content"] == "take 50 mg" and edited["editCount"] == 1 and edited["editedBy"] == "Rose"
    assert edited["editedAt"] >= sent["createdAt"] and edited["seq"] == 1 and "recalled" not in edited
    second = (await edit(api, sent, {"content": "take 50 mg after meals", "contentType": "1"})).json
    assert second["editCount"] == 2 and second["contentType"] == 1

    messages = await pm_messages(api)
    assert [m["seq"] for m in messages] == [1, 2, 3]
    assert messages[0] == second
    notices = messages[1:]
    assert [n["event"] for n in notices] == ["message.edited", "message.edited"]
    assert [n["content"] for n in notices] == ["take 50 mg", "take 50 mg after meals"]
    assert all(n["target"] == sent["id"] and n["from"] == "Rose" for n in notices)
    conversations = (await api.get("/api/v1/conversations?user_id=Rose", as_=DOCTOR)).json["conversations"]
    assert conversations[0]["lastMessage"]["content"] == "take 50 mg after meals"  # the latest notice

    versions = (await history(api, sent)).json["versions"]
    assert [(v["action"], v["content"]) for v in versions] == [
        ("created", "take 500 mg"),
        ("edited", "take 50 mg"),
        ("edited", "take 50 mg after meals"),
    ]
    assert versions[1]["at"] == edited["editedAt"] and versions[2]["at"] == second["editedAt"]

    # The first edit repeated (same clientMsgId): nothing more; reused for other content: 409.
    repeat = await edit(api, sent, {"content": "take 50 mg", "clientMsgId": "e-1"})
    assert repeat.code == 200 and repeat.json == second
    assert_error(
        await edit(api, sent, {"content": "take 5 mg", "clientMsgId": "e-1"}),
        409,
        "client_msg_id_reused",
        "clientMsgId",
    )
    # The same content again is no change at all.
    same = await edit(api, sent, {"content": "take 50 mg after meals"})
    assert same.code == 200 and same.json == second
    assert len(await pm_messages(api)) == 3
    assert len(await audit_entries(api, "message.edited")) == 2


@pytest.mark.gen_test
async def test_the_latest_edit_repeated_with_its_client_msg_id_changes_nothing(api):
    sent = await api.send_pm("Rose", "Jack", "come at 9")
    first = (await edit(api, sent, {"content": "come at 10", "clientMsgId": "e-9"})).json
    for _ in range(3):
        again = await edit(api, sent, {"content": "come at 10", "clientMsgId": "e-9"})
        assert again.code == 200 and again.json == first
    assert [m["seq"] for m in await pm_messages(api)] == [1, 2]
    assert len((await history(api, sent)).json["versions"]) == 2


@pytest.mark.gen_test
async def test_a_send_retried_after_its_message_changed_gets_the_message_as_it_now_is(api):
    body = {"from": "Rose", "to": "Jack", "contentType": 1, "content": "wrong dose", "clientMsgId": "s-1"}
    sent = (await api.post("/api/v1/chats/pm", body, as_=DOCTOR)).json
    recalled = (await recall(api, sent)).json
    retry = await api.post("/api/v1/chats/pm", body, as_=DOCTOR)
    assert retry.code == 200 and retry.json == recalled
    other_peer = await api.post("/api/v1/chats/pm", {**body, "to": "Lily"}, as_=DOCTOR)
    assert_error(other_peer, 409, "client_msg_id_reused")


@pytest.mark.gen_test
async def test_a_summary_still_showing_the_changed_message_shows_it_changed(api, services):
    from models.conversations import ConversationRef

    sent = await api.send_pm("Rose", "Jack", "first")
    ref = ConversationRef.pm("Rose", "Jack")
    doc = await services.db.pm.find_one({"_id": sent["id"]})
    await services.conversations.show_changed_message(ref, {**doc, "content": "", "recalled": True})
    summary = await services.conversations.get_summary(ref)
    assert summary["lastMessage"]["content"] == "" and summary["lastMessage"]["recalled"]
    newer = await api.send_pm("Jack", "Rose", "second", role="patient")
    await services.conversations.show_changed_message(ref, {**doc, "content": "stale"})
    summary = await services.conversations.get_summary(ref)
    assert summary["lastMessage"]["_id"] == newer["id"] and summary["lastMessage"]["content"] == "second"


@pytest.mark.gen_test
async def test_refusals_name_the_condition(api, services):
    sent = await api.send_pm("Rose", "Jack", "results are normal")
    # Someone else's message: 403, recorded as access.denied with the message asked for.
    assert_error(await recall(api, sent, as_=PATIENT), 403, "forbidden")
    assert_error(await edit(api, sent, {"content": "x"}, as_=PATIENT), 403, "forbidden")
    denied = await audit_entries(api, "access.denied")
    assert {e["target"].get("messageId") for e in denied} == {sent["id"]}
    # Only staff name an operator.
    assert_error(await recall(api, sent, body={"operator": "Lily"}), 403, "forbidden", "operator")
    # Unknown ids and channels that do not hold the id: 404.
    missing = {**sent, "id": "0" * 24}
    assert_error(await recall(api, missing), 404, "not_found")
    assert_error(await edit(api, {**sent, "id": "not-an-id"}, {"content": "x"}), 404, "not_found")
    assert_error(await recall(api, {**sent, "channel": "gm"}), 404, "not_found")
    # Bad bodies: 400 naming the field, nothing changed.
    assert_error(await edit(api, sent, {}), 400, "invalid_field", "content")
    assert_error(await edit(api, sent, {"content": 5}), 400, "invalid_field", "content")
    assert_error(await edit(api, sent, {"content": "   "}), 400, "invalid_field", "content")
    assert_error(await edit(api, sent, {"content": "x" * 8001}), 400, "invalid_field", "content")
    assert_error(await edit(api, sent, {"content": "no url", "contentType": 4}), 400, "invalid_field", "content")
    assert_error(await edit(api, sent, {"content": "ok", "contentType": 9}), 400, "invalid_field", "contentType")
    assert_error(await edit(api, sent, {"content": "ok", "clientMsgId": 7}), 400, "invalid_field", "clientMsgId")
    assert_error(await recall(api, sent, body={"reason": ["x"]}), 400, "invalid_field", "reason")
    assert_error(await api.post(recall_path(sent), raw_body=b"[1]", as_=DOCTOR), 400, "invalid_body")
    bad_json = await api.request("PATCH", message_path(sent), raw_body=b"{", as_=DOCTOR)
    assert_error(bad_json, 400, "invalid_body")
    assert (await pm_messages(api))[0] == sent
    # Notices and other event messages cannot be changed.
    await recall(api, sent)
    notice = (await pm_messages(api))[-1]
    assert_error(await recall(api, notice), 409, "not_editable")
    assert_error(await edit(api, notice, {"content": "x"}), 409, "not_editable")
    group = await make_group(api, "ward-7")
    [created] = (await api.get("/api/v1/chats/gm?group=ward-7", as_=DOCTOR)).json["messages"]
    assert created["event"] == "group.created" and group["id"] == "ward-7"
    assert_error(await recall(api, created, as_=SERVICE, body={"operator": "ops"}), 409, "not_editable")
    # A recalled message cannot be edited.
    assert_error(await edit(api, sent, {"content": "again"}), 409, "message_recalled")
    # History is admin's alone (service is refused, and the refusal audited).
    assert_error(await history(api, sent, as_=SERVICE), 403, "forbidden")
    assert_error(await history(api, sent, as_=DOCTOR), 403, "forbidden")
    assert_error(await history(api, missing), 404, "not_found")


@pytest.mark.gen_test
async def test_the_windows_bind_the_sender_but_not_staff(api, services):
    sent = await api.send_pm("Rose", "Jack", "see you tomorrow")
    await age_message(services, sent, 601)
    assert_error(await recall(api, sent), 403, "window_expired", "600 seconds")
    assert_error(await edit(api, sent, {"content": "see you friday"}), 403, "window_expired")
    # Staff at any time, naming the operator (whom the notice is from).
    assert_error(await edit(api, sent, {"content": "see you friday"}, as_=SERVICE), 400, "invalid_field", "operator")
    staff_edit = await edit(api, sent, {"content": "see you friday", "operator": "nurse-ann"}, as_=SERVICE)
    assert staff_edit.code == 200 and staff_edit.json["editedBy"] == "nurse-ann"
    staff = await recall(api, sent, as_=SERVICE, body={"operator": "nurse-ann"})
    assert staff.code == 200 and staff.json["recalledBy"] == "nurse-ann"
    notices = (await pm_messages(api))[1:]
    # The operator is staff, so `parties` names the conversation (from/to alone would not).
    assert [(n["event"], n["from"], n["to"], n["parties"]) for n in notices] == [
        ("message.edited", "nurse-ann", "Jack", ["Jack", "Rose"]),
        ("message.recalled", "nurse-ann", "Jack", ["Jack", "Rose"]),
    ]
    # The edit notice carried the edited text; the recall emptied it too.
    assert notices[0]["content"] == "" and notices[0]["recalled"] is True
    versions = (await history(api, sent)).json["versions"]
    assert [(v["action"], v["content"], v["by"]) for v in versions] == [
        ("created", "see you tomorrow", "Rose"),
        ("edited", "see you friday", "nurse-ann"),
        ("recalled", "", "nurse-ann"),
    ]


def test_windows_come_from_the_profile_and_the_environment():
    settings = load_settings({"IM_PROFILE": "test"})
    assert (settings.messages.recall_window_secs, settings.messages.edit_window_secs) == (600, 600)
    changed = load_settings({"IM_PROFILE": "test", "IM_MESSAGES_RECALL_WINDOW_SECS": "120"})
    assert changed.messages.recall_window_secs == 120 and changed.messages.edit_window_secs == 600
    for bad in ("soon", "-1"):
        with pytest.raises(ConfigError, match="IM_MESSAGES_EDIT_WINDOW_SECS"):
            load_settings({"IM_PROFILE": "test", "IM_MESSAGES_EDIT_WINDOW_SECS": bad})


@pytest.mark.gen_test
async def test_group_and_system_messages(api):
    await make_group(api, "care-1")
    member_socket = await api.ws("Lily")
    assert (await member_socket.recv_type("message"))["message"]["event"] == "group.created"
    posted = await api.post(
        "/api/v1/chats/gm",
        {"from": "Rose", "group": "care-1", "contentType": 1, "content": "team: 3 pm", "at": ["Lily"]},
        as_=DOCTOR,
    )
    assert posted.code == 201
    sent = posted.json
    assert (await member_socket.recv_type("message"))["message"]["id"] == sent["id"]
    edited = (await edit(api, sent, {"content": "team: 4 pm"})).json
    assert edited["content"] == "team: 4 pm" and edited["at"] == ["Lily"] and edited["group"] == "care-1"
    notice = (await member_socket.recv_type("message"))["message"]
    assert notice["event"] == "message.edited" and notice["group"] == "care-1" and notice["content"] == "team: 4 pm"
    assert "parties" not in notice and notice["seq"] == sent["seq"] + 1
    listed = (await api.get("/api/v1/chats/gm?group=care-1", as_=PATIENT)).json["messages"]
    assert listed[-2] == edited

    system = await api.post(
        "/api/v1/chats/sm",
        {"to": "Jack", "title": "Appointment", "summary": "Monday", "contentType": 1, "content": "Monday 9:00"},
        as_=SERVICE,
    )
    assert system.code == 201
    assert_error(await recall(api, system.json, as_=PATIENT), 403, "forbidden")
    done = await recall(api, system.json, as_=SERVICE, body={"operator": "front-desk"})
    assert done.code == 200 and done.json["recalled"] is True and done.json["title"] == "Appointment"
    sm = (await api.get("/api/v1/chats/sm?user_id=Jack", as_=PATIENT)).json["messages"]
    assert sm[0] == done.json
    assert (sm[1]["event"], sm[1]["title"], sm[1]["from"], sm[1]["to"]) == (
        "message.recalled",
        "Message recalled",
        "front-desk",
        "Jack",
    )


# ---- files --------------------------------------------------------------------------------------


async def upload_image(api, as_=PATIENT) -> str:
    body, headers = multipart(png_bytes(), "image/png", filename="rash.png")
    response = await api.post("/api/v1/files", as_=as_, raw_body=body, headers=headers)
    assert response.code == 201, response.body
    return response.json["id"]  # type: ignore[no-any-return]


@pytest.mark.gen_test
async def test_a_recalled_image_is_no_longer_served_to_its_recipient_but_kept(api):
    first, second = await upload_image(api), await upload_image(api)
    sent = (
        await api.post(
            "/api/v1/chats/pm", {"from": "Jack", "to": "Rose", "contentType": 2, "content": first}, as_=PATIENT
        )
    ).json
    assert (await api.get(f"/api/v1/files/{first}", as_=DOCTOR)).code == 200
    # Edited to another image: the edit notice carries it, so the doctor may read it.
    assert (await edit(api, sent, {"content": second}, as_=PATIENT)).code == 200
    assert (await api.get(f"/api/v1/files/{second}", as_=DOCTOR)).code == 200
    assert (await api.get(f"/api/v1/files/{first}", as_=DOCTOR)).code == 404  # no message shows it any more
    # Editing to a file the sender may not attach is refused like a send.
    stranger_file = await upload_image(api, as_=LILY)
    assert_error(await edit(api, sent, {"content": stranger_file}, as_=PATIENT), 400, "invalid_field", "content")

    assert (await recall(api, sent, as_=PATIENT)).code == 200
    for file_id in (first, second):
        assert_error(await api.get(f"/api/v1/files/{file_id}", as_=DOCTOR), 404, "not_found")
        # Kept for the record: the uploader and staff still read it; history names it.
        assert (await api.get(f"/api/v1/files/{file_id}", as_=PATIENT)).code == 200
        assert (await api.get(f"/api/v1/files/{file_id}", as_=ADMIN)).code == 200
    versions = (await history(api, sent)).json["versions"]
    assert [(v["action"], v["content"], v["contentType"]) for v in versions] == [
        ("created", first, 2),
        ("edited", second, 2),
        ("recalled", "", 2),
    ]


# ---- WebSocket ----------------------------------------------------------------------------------


async def send_frame(socket, frame: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send a frame; (its ack or error, the messages that came before it)."""
    await socket.send(frame)
    before: list[dict[str, Any]] = []
    while True:
        reply = await socket.recv()
        assert reply is not None
        if reply["type"] == "message":
            before.append(reply["message"])
        elif reply["type"] in ("ack", "error") and reply.get("clientMsgId") == frame.get("clientMsgId"):
            return reply, before


@pytest.mark.gen_test(timeout=30)
async def test_recall_and_edit_frames_are_acked_and_everyone_gets_the_notice(api):
    jack, jack_tablet, rose = await api.ws("Jack"), await api.ws("Jack"), await api.ws("Rose", "doctor")
    ack = await jack.send_and_ack(
        {"type": "pm", "to": "Rose", "contentType": 1, "content": "fever 39", "clientMsgId": "p1"}
    )
    sent = ack["message"]
    for socket in (jack_tablet, rose):
        assert (await socket.recv_type("message"))["message"]["id"] == sent["id"]

    edit_frame = {"type": "edit", "channel": "pm", "id": sent["id"], "content": "fever 38", "clientMsgId": "p2"}
    ack, before = await send_frame(jack, edit_frame)
    assert ack["type"] == "ack" and ack["clientMsgId"] == "p2"
    assert ack["message"]["content"] == "fever 38" and ack["message"]["editCount"] == 1
    # The notice is a new message: every connection gets it, the sending one too (before its ack).
    notices = before + [(await socket.recv_type("message"))["message"] for socket in (jack_tablet, rose)]
    assert len(notices) == 3 and len({json.dumps(n) for n in notices}) == 1
    assert notices[0]["event"] == "message.edited" and notices[0]["target"] == sent["id"] and notices[0]["seq"] == 2
    # The frame repeated (a client resending after a reconnect): the same ack, nothing new.
    again = await jack.send_and_ack(edit_frame)
    assert again["type"] == "ack" and again["message"] == ack["message"]

    recall_frame = {"type": "recall", "channel": "pm", "id": sent["id"], "clientMsgId": "p3"}
    ack, before = await send_frame(jack, recall_frame)
    assert ack["message"]["recalled"] is True and ack["message"]["content"] == ""
    notices = before + [(await socket.recv_type("message"))["message"] for socket in (jack_tablet, rose)]
    assert [(n["event"], n["seq"]) for n in notices] == [("message.recalled", 3)] * 3
    await rose.expect_silence()

    # Refusals are error frames carrying the clientMsgId; the connection stays open.
    refused = await rose.send_and_ack({"type": "recall", "channel": "pm", "id": sent["id"], "clientMsgId": "d1"})
    assert (refused["type"], refused["code"]) == ("error", "forbidden")
    edited_recalled = await jack.send_and_ack({**edit_frame, "clientMsgId": "p4"})
    assert (edited_recalled["type"], edited_recalled["code"]) == ("error", "message_recalled")
    for frame, field in (
        ({"type": "recall", "channel": "pm", "id": sent["id"]}, "clientMsgId"),
        ({"type": "recall", "channel": "xx", "id": sent["id"], "clientMsgId": "p5"}, "channel"),
        ({"type": "recall", "channel": "pm", "id": 5, "clientMsgId": "p6"}, "id"),
        ({"type": "edit", "channel": "pm", "id": sent["id"], "clientMsgId": "p7"}, "content"),
    ):
        await jack.send(frame)
        error = await jack.recv_type("error")
        assert error["code"] == "invalid_field" and error["message"].startswith(field), error
    [entry] = await audit_entries(api, "message.recalled")
    assert entry["via"] == "ws" and entry["actor"] == "Jack"
    denied = [e for e in await audit_entries(api, "access.denied") if e["via"] == "ws"]
    assert denied and denied[0]["target"]["messageId"] == sent["id"]


@pytest.mark.gen_test
async def test_an_offline_client_gets_the_changed_message_and_the_notice_in_its_backlog(api):
    # Jack has received the first message, then goes offline.
    jack = await api.ws("Jack")
    first = await api.send_pm("Rose", "Jack", "take 2 tablets")
    assert (await jack.recv_type("message"))["message"]["id"] == first["id"]
    await jack.send({"type": "received", "channel": "pm", "peer": "Rose", "seq": 1})
    await jack.send({"type": "ping"})
    await jack.recv_type("pong")  # frames are handled in order: the marker has moved
    jack.close()
    second = await api.send_pm("Rose", "Jack", "and rest")
    await edit(api, first, {"content": "take 1 tablet"})
    await recall(api, second)

    jack = await api.ws("Jack")
    got = [(await jack.recv_type("message"))["message"] for _ in range(3)]
    assert [m["seq"] for m in got] == [2, 3, 4]
    assert got[0]["id"] == second["id"] and got[0]["recalled"] is True and got[0]["content"] == ""
    assert (got[1]["event"], got[1]["target"], got[1]["content"]) == ("message.edited", first["id"], "take 1 tablet")
    assert (got[2]["event"], got[2]["target"]) == ("message.recalled", second["id"])
    await jack.expect_silence()


# ---- races and repeats --------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_recall_racing_edits_always_ends_recalled_and_empty(api, services):
    for round_ in range(5):
        sent = await api.send_pm("Rose", "Jack", f"dose {round_}")
        edits = [edit(api, sent, {"content": f"dose {round_} v{i}", "clientMsgId": f"r{round_}-{i}"}) for i in range(3)]
        answers = await asyncio.gather(*edits[:2], recall(api, sent), *edits[2:], recall(api, sent))
        codes = sorted(a.code for a in answers)
        assert all(code in (200, 409) for code in codes), [(a.code, a.body) for a in answers]
        assert all(a.json["error"]["code"] == "message_recalled" for a in answers if a.code == 409)
        stored = await services.db.pm.find_one({"_id": sent["id"]})
        assert stored["content"] == "" and stored["recalled"]
        # No copy of any edited text is left in the conversation.
        notices = [m for m in await pm_messages(api) if m.get("target") == sent["id"]]
        assert all(n["content"] == "" for n in notices if n["event"] == "message.edited")
        assert [n["event"] for n in notices].count("message.recalled") == 1
        versions = (await history(api, sent)).json["versions"]
        assert versions[0]["action"] == "created" and versions[-1]["action"] == "recalled"
        assert len(versions) == 2 + sum(1 for a in answers[:2] + answers[3:4] if a.code == 200)


@pytest.mark.gen_test(timeout=30)
async def test_parallel_edits_lose_none_and_parallel_recalls_give_one_notice(api):
    sent = await api.send_pm("Rose", "Jack", "v0")
    answers = await asyncio.gather(*(edit(api, sent, {"content": f"v{i}"}) for i in range(1, 7)))
    assert all(a.code == 200 for a in answers)
    assert sorted(a.json["editCount"] for a in answers) == list(range(1, 7))  # each edit counted once
    versions = (await history(api, sent)).json["versions"]
    assert [v["action"] for v in versions] == ["created"] + ["edited"] * 6
    recalls = await asyncio.gather(*(recall(api, sent) for _ in range(5)))
    assert {r.code for r in recalls} == {200} and len({json.dumps(r.json) for r in recalls}) == 1
    events = [m.get("event") for m in await pm_messages(api)]
    assert events.count("message.recalled") == 1 and events.count("message.edited") == 6


# ---- webhooks -----------------------------------------------------------------------------------


class TestWebhookEvents:
    @pytest.fixture
    def settings(self, mongo):
        base = load_settings(
            {"IM_PROFILE": "test", "IM_MONGO_URI": mongo.uri, "IM_DB_NAME": f"t_{uuid.uuid4().hex[:12]}"}
        )
        # A receiver that is never started: the events stay pending in the outbox.
        hooks = dataclasses.replace(base.webhooks, url=f"http://127.0.0.1:{free_port()}/hook", secret="s" * 20)
        return dataclasses.replace(base, webhooks=hooks)

    @pytest.mark.gen_test
    async def test_recalled_and_edited_events_carry_the_message_as_it_now_is(self, api, services):
        sent = await api.send_pm("Rose", "Jack", "first")
        edited = (await edit(api, sent, {"content": "second"})).json
        await edit(api, sent, {"content": "second"})  # no change: no event
        recalled = (await recall(api, sent, as_=SERVICE, body={"operator": "ops-1"})).json
        await recall(api, sent)  # a repeat: the same event, stored once
        found = await services.db.webhook_events.find(
            {"type": {"$in": ["message.edited", "message.recalled"]}}
        ).to_list()
        by_type = {doc["type"]: doc for doc in found}
        assert len(found) == 2
        assert by_type["message.edited"]["data"] == {"message": edited, "by": "Rose"}
        assert by_type["message.recalled"]["data"] == {"message": recalled, "by": "ops-1"}
        created = await services.db.webhook_events.count_documents({"type": "message.created"})
        # The message and its two notices: Jack is offline, so each is also stored for the push
        # planner (their webhook delivery state is in the messages themselves, models/outbox.py).
        assert created == 3


# ---- two server processes -----------------------------------------------------------------------

SECRET = "test-secret-0123456789abcdef0123456789"


async def call(process: ServerProcess, method: str, path: str, body: Any, sub: str, role: str) -> tuple[int, Any]:
    request = HTTPRequest(
        process.base_url + path,
        method=method,
        body=None if body is None else json.dumps(body),
        headers={"Authorization": f"Bearer {mint_token(SECRET, sub, role)}"},
        allow_nonstandard_methods=True,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, json.loads(response.body)


async def next_message(conn, timeout: float = 10.0) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(conn.read_message(), timeout))
        if frame["type"] == "message":
            return frame["message"]  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_change_on_one_process_reaches_clients_of_the_other(cluster):
    a, b = cluster
    jack_on_b = await websocket_connect(f"ws://127.0.0.1:{b.port}/ws?token={mint_token(SECRET, 'Jack', 'patient')}")
    code, sent = await call(
        a, "POST", "/api/v1/chats/pm", {"from": "Rose", "to": "Jack", "contentType": 1, "content": "500 mg"}, *DOCTOR
    )
    assert code == 201
    assert (await next_message(jack_on_b))["id"] == sent["id"]
    code, edited = await call(a, "PATCH", f"/api/v1/chats/pm/{sent['id']}", {"content": "50 mg"}, *DOCTOR)
    assert code == 200
    notice = await next_message(jack_on_b)
    assert (notice["event"], notice["target"], notice["content"], notice["seq"]) == (
        "message.edited",
        sent["id"],
        "50 mg",
        2,
    )
    # Recalled on B while Jack is offline: his next connection, on A, gets the notice.
    jack_on_b.close()
    code, recalled = await call(b, "POST", f"/api/v1/chats/pm/{sent['id']}/recall", {}, *DOCTOR)
    assert code == 200 and recalled["recalled"] is True
    code, again = await call(a, "POST", f"/api/v1/chats/pm/{sent['id']}/recall", {}, *DOCTOR)
    assert code == 200 and again == recalled  # the other process sees it recalled: a repeat
    jack_on_a = await websocket_connect(f"ws://127.0.0.1:{a.port}/ws?token={mint_token(SECRET, 'Jack', 'patient')}")
    backlog = [await next_message(jack_on_a) for _ in range(3)]
    assert [m["seq"] for m in backlog] == [1, 2, 3]
    assert backlog[0] == recalled and backlog[1]["content"] == ""  # the edit notice emptied by the recall
    assert backlog[2]["event"] == "message.recalled" and backlog[2]["target"] == sent["id"]
    # Both processes list the message as it now is.
    for process in (a, b):
        code, page = await call(process, "GET", "/api/v1/chats/pm?user_id=Jack&peer=Rose", None, *PATIENT)
        assert code == 200 and page["messages"][0] == recalled and [m["seq"] for m in page["messages"]] == [1, 2, 3]
    jack_on_a.close()
    assert edited["editCount"] == 1
