"""Group maintenance, membership notices, and who may do what."""

from __future__ import annotations

import pytest

from tests.helpers import DOCTOR, SERVICE, assert_error, make_group


@pytest.mark.gen_test
async def test_create_and_read_a_group(api):
    created = await make_group(api, gid="ward-7", members=("Rose", "Jack"), group_type="2")
    assert created["id"] == "ward-7" and created["groupType"] == 2 and created["members"] == ["Rose", "Jack"]
    assert created["createdBy"] == "platform" and created["createdAt"].endswith("Z")
    read = await api.get("/api/v1/groups/ward-7", as_=("Jack", "patient"))
    assert read.code == 200 and read.json == created
    assert_error(await api.get("/api/v1/groups/ward-7", as_=("Eve", "patient")), 403)
    assert_error(await api.get("/api/v1/groups/nope", as_=SERVICE), 404)
    dup = await api.post("/api/v1/groups", {"id": "ward-7", "name": "x", "groupType": 0, "members": ["a"]}, as_=SERVICE)
    assert_error(dup, 409, "group_exists")


@pytest.mark.gen_test
async def test_group_id_is_generated_and_a_doctor_creator_is_a_member(api):
    response = await api.post("/api/v1/groups", {"name": "Diabetes", "groupType": 0, "members": ["Jack"]}, as_=DOCTOR)
    assert response.code == 201
    assert response.json["id"] and response.json["members"] == ["Rose", "Jack"]
    patient = await api.post(
        "/api/v1/groups", {"name": "x", "groupType": 0, "members": ["Jack"]}, as_=("Jack", "patient")
    )
    assert_error(patient, 403)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body, field",
    [
        ({"groupType": 0, "members": ["a"]}, "name"),
        ({"name": "n", "members": ["a"]}, "groupType"),
        ({"name": "n", "groupType": -1, "members": ["a"]}, "groupType"),
        ({"name": "n", "groupType": 0}, "members"),
        ({"name": "n", "groupType": 0, "members": "a"}, "members"),
        ({"name": "n", "groupType": 0, "members": [{"$ne": 1}]}, "members"),
        ({"name": "n", "groupType": 0, "members": []}, "members"),
        ({"id": "$x", "name": "n", "groupType": 0, "members": ["a"]}, "id"),
    ],
)
async def test_bad_group_input(api, body, field):
    assert_error(await api.post("/api/v1/groups", body, as_=SERVICE), 400, field=field)


@pytest.mark.gen_test
async def test_members_are_added_and_removed_with_notices(api):
    await make_group(api, members=("Rose", "Jack"))
    jack = await api.ws("Jack")
    await jack.recv_type("message")  # group.created
    added = await api.post("/api/v1/groups/care-1/members", {"members": ["Lily", "Jack"]}, as_=DOCTOR)
    assert added.code == 200 and added.json["members"] == ["Rose", "Jack", "Lily"]
    notice = (await jack.recv_type("message"))["message"]
    assert notice["event"] == "group.members_added" and notice["members"] == ["Lily"]
    assert notice["from"] == "Rose" and notice["channel"] == "gm"
    removed = await api.request("DELETE", "/api/v1/groups/care-1/members/Jack", as_=DOCTOR)
    assert removed.code == 200 and removed.json["members"] == ["Rose", "Lily"]
    notice = (await jack.recv_type("message"))["message"]
    assert notice["event"] == "group.member_removed" and notice["members"] == ["Jack"]
    groups = await api.get("/api/v1/users/Lily/groups", as_=("Lily", "patient"))
    assert [g["id"] for g in groups.json["groups"]] == ["care-1"]
    assert (await api.get("/api/v1/users/Jack/groups", as_=("Jack", "patient"))).json["groups"] == []
    assert_error(await api.get("/api/v1/users/Lily/groups", as_=("Jack", "patient")), 403)


@pytest.mark.gen_test
async def test_removed_member_stops_receiving_at_once_on_an_open_socket(api):
    await make_group(api, members=("Rose", "Jack", "Lily"))
    jack = await api.ws("Jack")
    await jack.recv_type("message")
    await api.request("DELETE", "/api/v1/groups/care-1/members/Jack", as_=DOCTOR)
    await jack.recv_type("message")  # the removal notice
    sent = await api.post(
        "/api/v1/chats/gm", {"from": "Rose", "group": "care-1", "contentType": 1, "content": "not for Jack"}, as_=DOCTOR
    )
    assert sent.code == 201
    await jack.expect_silence(0.5)
    assert_error(await api.get("/api/v1/chats/gm?group=care-1", as_=("Jack", "patient")), 403)
    jack_send = await jack.send_and_ack(
        {"type": "gm", "group": "care-1", "contentType": 1, "content": "x", "clientMsgId": "x"}
    )
    assert jack_send["type"] == "error" and jack_send["code"] == "not_a_member"


@pytest.mark.gen_test
async def test_new_member_gets_messages_from_the_join_and_can_read_history(api):
    await make_group(api, members=("Rose", "Jack"))
    await api.post(
        "/api/v1/chats/gm", {"from": "Rose", "group": "care-1", "contentType": 1, "content": "before Lily"}, as_=DOCTOR
    )
    await api.post("/api/v1/groups/care-1/members", {"members": ["Lily"]}, as_=DOCTOR)
    await api.post(
        "/api/v1/chats/gm", {"from": "Rose", "group": "care-1", "contentType": 1, "content": "after Lily"}, as_=DOCTOR
    )
    lily = await api.ws("Lily")
    first = (await lily.recv_type("message"))["message"]
    second = (await lily.recv_type("message"))["message"]
    assert (first["event"], second["content"]) == ("group.members_added", "after Lily")
    await lily.expect_silence()
    history = await api.get("/api/v1/chats/gm?group=care-1", as_=("Lily", "patient"))
    assert "before Lily" in [m["content"] for m in history.json["messages"]]


@pytest.mark.gen_test
async def test_who_may_manage_members(api):
    await make_group(api, members=("Rose", "Jack"))
    assert_error(await api.post("/api/v1/groups/care-1/members", {"members": ["Eve"]}, as_=("Jack", "patient")), 403)
    assert_error(await api.post("/api/v1/groups/care-1/members", {"members": ["Eve"]}, as_=("Stranger", "doctor")), 403)
    assert_error(await api.request("DELETE", "/api/v1/groups/care-1/members/Rose", as_=("Jack", "patient")), 403)
    # A member may leave.
    left = await api.request("DELETE", "/api/v1/groups/care-1/members/Jack", as_=("Jack", "patient"))
    assert left.code == 200 and left.json["members"] == ["Rose"]
    assert_error(await api.post("/api/v1/groups/care-1/members", {"members": []}, as_=DOCTOR), 400, field="members")
    assert_error(await api.post("/api/v1/groups/nope/members", {"members": ["a"]}, as_=DOCTOR), 404)
