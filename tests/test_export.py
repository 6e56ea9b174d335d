"""A patient's record, exported (SPEC §16): NDJSON, streamed, in order, for the user itself and staff."""

from __future__ import annotations

import json

import pytest

from models.clock import utcnow
from tests.helpers import DOCTOR, PATIENT, SERVICE, assert_error, make_group
from tests.test_files import uploaded_id

ADMIN = ("ops", "admin")


async def export(api, user="Jack", as_=PATIENT):
    response = await api.get(f"/api/v1/users/{user}/export", as_=as_)
    assert response.code == 200, response.body
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    text = response.body.decode()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def of_type(lines, kind):
    return [line for line in lines if line["type"] == kind]


async def send_gm(api, group, content, sender=DOCTOR):
    body = {"from": sender[0], "group": group, "contentType": 1, "content": content}
    response = await api.post("/api/v1/chats/gm", body, as_=sender)
    assert response.code == 201, response.body
    return response.json


@pytest.mark.gen_test
async def test_a_patient_exports_its_whole_record_in_order(api, services):
    await api.post(
        "/api/v1/chats/sm",
        {"to": "Jack", "title": "Flu shots", "summary": "s", "contentType": 1, "content": "Come in"},
        as_=SERVICE,
    )
    file_id = await uploaded_id(api)
    await api.send_pm("Rose", "Jack", "How are you?")
    await api.send_pm("Jack", "Rose", "Better", role="patient")
    await api.send_pm("Rose", "Jack", file_id, contentType=2)
    await api.send_pm("Lily", "Ann", "not Jack's")
    consultation = (await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=DOCTOR)).json
    await make_group(api, gid="ward-7", members=("Rose", "Jack"))
    await send_gm(api, "ward-7", "group hello")

    lines = await export(api)
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "user" and lines[0] == {"type": "user", "id": "Jack"}
    assert kinds[-1] == "end"
    order = ["user", "conversation", "message", "consultation", "file", "end"]
    assert [k for k in order if k in kinds] == order and kinds == sorted(kinds, key=order.index)

    listed = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"]
    assert [{k: v for k, v in c.items() if k != "type"} for c in of_type(lines, "conversation")] == listed

    messages = [line["message"] for line in of_type(lines, "message")]
    by_channel = {ch: [m for m in messages if m["channel"] == ch] for ch in ("sm", "pm", "gm")}
    assert [m["title"] for m in by_channel["sm"]] == ["Flu shots"]
    assert [m["seq"] for m in by_channel["pm"]] == [1, 2, 3, 4]  # oldest first; the consultation event too
    assert by_channel["pm"][3]["event"] == "consultation.started"
    assert [m["content"] for m in by_channel["gm"]][1:] == ["group hello"]
    assert all("Lily" not in (m.get("from"), m.get("to")) for m in messages)
    stored = await services.db.pm.find_one({"seq": 1, "from": "Rose", "to": "Jack"})
    assert by_channel["pm"][0]["id"] == stored["_id"] and by_channel["pm"][0]["content"] == "How are you?"

    assert of_type(lines, "consultation") == [{"type": "consultation", **consultation}]
    files = of_type(lines, "file")
    assert files == [
        {
            "type": "file",
            "id": file_id,
            "url": f"/api/v1/files/{file_id}",
            "mimeType": "image/png",
            "size": files[0]["size"],
        }
    ]
    assert files[0]["size"] > 0
    counts = lines[-1]["counts"]
    assert counts == {"conversations": 3, "messages": len(messages), "consultations": 1, "files": 1}


@pytest.mark.gen_test
async def test_group_messages_only_while_a_member(api):
    await make_group(api, gid="ward-8", members=("Rose", "Lily"))  # seq 1
    await send_gm(api, "ward-8", "before Jack")  # 2
    await api.post("/api/v1/groups/ward-8/members", {"members": ["Jack"]}, as_=SERVICE)  # 3
    await send_gm(api, "ward-8", "with Jack")  # 4
    await api.request("DELETE", "/api/v1/groups/ward-8/members/Jack", as_=SERVICE)  # 5
    await send_gm(api, "ward-8", "after Jack")  # 6
    await api.post("/api/v1/groups/ward-8/members", {"members": ["Jack"]}, as_=SERVICE)  # 7
    await send_gm(api, "ward-8", "back again")  # 8
    messages = [line["message"] for line in of_type(await export(api), "message")]
    assert [m["seq"] for m in messages if m["channel"] == "gm"] == [3, 4, 5, 7, 8]
    # A group it has left entirely still counts for its membership.
    await api.request("DELETE", "/api/v1/groups/ward-8/members/Jack", as_=SERVICE)  # 9
    left = [line["message"] for line in of_type(await export(api), "message")]
    assert [m["seq"] for m in left if m["channel"] == "gm"] == [3, 4, 5, 7, 8, 9]


@pytest.mark.gen_test
async def test_changed_messages_appear_as_they_now_are(api, services):
    """models/recall.py rewrites the stored message in place; the export serialises what is stored."""
    recalled = await api.send_pm("Rose", "Jack", "wrong dose")
    edited = await api.send_pm("Rose", "Jack", "take 2 pills")
    await services.db.pm.update_one(
        {"_id": recalled["id"]},
        {"$set": {"content": "", "recalled": True, "recalledAt": utcnow(), "recalledBy": "Rose"}},
    )
    await services.db.pm.update_one(
        {"_id": edited["id"]}, {"$set": {"content": "take 1 pill", "editedAt": utcnow(), "editCount": 1}}
    )
    messages = {line["message"]["id"]: line["message"] for line in of_type(await export(api), "message")}
    assert messages[recalled["id"]]["recalled"] is True and messages[recalled["id"]]["content"] == ""
    assert messages[recalled["id"]]["recalledBy"] == "Rose"
    assert messages[edited["id"]]["content"] == "take 1 pill" and messages[edited["id"]]["editCount"] == 1


@pytest.mark.gen_test
async def test_a_large_record_streams_in_chunks(api, services):
    from bson import ObjectId

    from models.conversations import pm_conv

    start = utcnow()
    docs = [
        {
            "_id": str(ObjectId()),
            "conv": pm_conv("Rose", "Jack"),
            "channel": "pm",
            "from": "Rose",
            "to": "Jack",
            "contentType": 1,
            "content": f"note {n}",
            "seq": n + 1,
            "createdAt": start,
        }
        for n in range(1200)
    ]
    await services.db.pm.insert_many(docs)
    await api.send_pm("Rose", "Jack", "last")
    lines = await export(api)
    seqs = [line["message"]["seq"] for line in of_type(lines, "message")]
    assert seqs == list(range(1, 1202)) and lines[-1]["counts"]["messages"] == 1201


@pytest.mark.gen_test
@pytest.mark.parametrize("caller", [SERVICE, ADMIN])
async def test_staff_export_for_a_user_and_it_is_audited(api, services, caller):
    await api.send_pm("Rose", "Jack")
    lines = await export(api, "Jack", as_=caller)
    assert lines[-1]["counts"]["messages"] == 1
    entry = await services.db.audit.find_one({"action": "export.created"})
    assert (entry["actor"], entry["role"], entry["via"], entry["target"]) == (
        caller[0],
        caller[1],
        "rest",
        {"user": "Jack"},
    )


@pytest.mark.gen_test
async def test_the_user_itself_is_audited_too_and_a_doctor_exports_itself(api, services):
    await api.send_pm("Rose", "Jack")
    await export(api, "Jack", as_=PATIENT)
    assert (await services.db.audit.find_one({"action": "export.created"}))["actor"] == "Jack"
    assert of_type(await export(api, "Rose", as_=DOCTOR), "end")[0]["counts"]["messages"] == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("caller", [("Lily", "patient"), DOCTOR])
async def test_exporting_another_user_is_403_and_audited(api, services, caller):
    await api.send_pm("Rose", "Jack")
    assert_error(await api.get("/api/v1/users/Jack/export", as_=caller), 403, "forbidden")
    denied = await services.db.audit.find_one({"action": "access.denied", "actor": caller[0]})
    assert denied["target"] == {"user": "Jack"} and denied["outcome"] == "denied"
    assert await services.db.audit.find_one({"action": "export.created"}) is None


@pytest.mark.gen_test
async def test_bad_export_requests(api):
    assert_error(await api.get("/api/v1/users/Jack/export"), 401)
    assert_error(await api.get("/api/v1/users/%24gt/export", as_=SERVICE), 400, "invalid_field", "id")
    empty = await export(api, "Nobody", as_=SERVICE)
    assert empty == [
        {"type": "user", "id": "Nobody"},
        {"type": "end", "counts": {"conversations": 0, "messages": 0, "consultations": 0, "files": 0}},
    ]
