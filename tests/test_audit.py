"""The audit trail (SPEC §13): one entry per action, stored before the answer; the admin query."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import DOCTOR, PATIENT, SERVICE, assert_error, make_group
from tests.test_files import uploaded_id

ADMIN = ("ops", "admin")
ROOT = Path(__file__).resolve().parent.parent


async def entries(services, **filter_):
    """The stored entries (newest first) matching filter_ — read straight from MongoDB: the action's
    answer has come back, so its entry must already be there."""
    docs = await services.db.audit.find(filter_).sort("_id", -1).to_list()
    return docs


async def one(services, action, **target):
    found = [
        d for d in await entries(services, action=action) if all(d["target"].get(k) == v for k, v in target.items())
    ]
    assert found, (action, target, await entries(services))
    return found[0]


@pytest.mark.gen_test
async def test_messages_read_records_the_range_returned(api, services):
    for n in range(3):
        await api.send_pm("Rose", "Jack", f"m{n}")
    response = await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose", as_=PATIENT)
    assert response.code == 200
    entry = await one(services, "messages.read")
    assert entry["actor"] == "Jack" and entry["role"] == "patient" and entry["via"] == "rest"
    assert entry["outcome"] == "ok"
    assert entry["target"] == {"channel": "pm", "user": "Jack", "peer": "Rose", "fromSeq": 1, "toSeq": 3}


@pytest.mark.gen_test
async def test_conversations_read(api, services):
    await api.send_pm("Rose", "Jack")
    assert (await api.get("/api/v1/conversations?user_id=Rose", as_=DOCTOR)).code == 200
    entry = await one(services, "conversations.read")
    assert (entry["actor"], entry["target"], entry["outcome"]) == ("Rose", {"user": "Rose"}, "ok")


@pytest.mark.gen_test
async def test_marker_read_over_rest_and_received_over_ws(api, services):
    await api.send_pm("Rose", "Jack")
    await api.send_pm("Rose", "Jack")
    sock = await api.ws("Jack")
    await sock.recv_type("message")
    await sock.send({"type": "received", "channel": "pm", "peer": "Rose", "seq": 2})
    await sock.send({"type": "ping"})
    await sock.recv_type("pong")  # frames are answered in order: the marker move is done
    received = await one(services, "marker.received")
    assert received["actor"] == "Jack" and received["via"] == "ws" and received["outcome"] == "ok"
    assert received["target"] == {"channel": "pm", "user": "Jack", "peer": "Rose", "fromSeq": 0, "toSeq": 2}
    body = {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 1}
    assert (await api.post("/api/v1/conversations/read", body, as_=PATIENT)).code == 200
    read = await one(services, "marker.read")
    assert read["via"] == "rest" and read["target"]["fromSeq"] == 0 and read["target"]["toSeq"] == 1


@pytest.mark.gen_test
async def test_file_read_and_the_404_that_hides_a_forbidden_file(api, services):
    file_id = await uploaded_id(api)
    assert (await api.get(f"/api/v1/files/{file_id}", as_=DOCTOR)).code == 200
    entry = await one(services, "file.read", fileId=file_id)
    assert (entry["actor"], entry["outcome"]) == ("Rose", "ok")
    assert_error(await api.get(f"/api/v1/files/{file_id}", as_=("Eve", "patient")), 404)
    denied = await one(services, "access.denied", fileId=file_id)
    assert (denied["actor"], denied["role"], denied["outcome"]) == ("Eve", "patient", "denied")


@pytest.mark.gen_test
async def test_consultation_started_and_ended(api, services):
    await api.post("/api/v1/users/Rose/role", {"role": "doctor"}, as_=SERVICE)
    started = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=DOCTOR)
    assert started.code == 201, started.body
    cid = started.json["id"]
    entry = await one(services, "consultation.started")
    assert entry["actor"] == "Rose" and entry["outcome"] == "ok"
    assert entry["target"] == {"channel": "pm", "user": "Jack", "peer": "Rose", "consultationId": cid}
    assert (await api.post(f"/api/v1/consultations/{cid}/end", {}, as_=PATIENT)).code == 200
    ended = await one(services, "consultation.ended", consultationId=cid)
    assert ended["actor"] == "Jack" and ended["role"] == "patient"


@pytest.mark.gen_test
async def test_group_created_members_added_member_removed(api, services):
    await make_group(api, gid="ward-1", members=("Rose", "Jack"))
    created = await one(services, "group.created")
    assert (created["actor"], created["target"], created["outcome"]) == (
        "platform",
        {"channel": "gm", "group": "ward-1"},
        "ok",
    )
    assert (await api.post("/api/v1/groups/ward-1/members", {"members": ["Lily"]}, as_=SERVICE)).code == 200
    added = await one(services, "group.members_added")
    assert added["target"] == {"channel": "gm", "group": "ward-1", "user": "Lily"}
    assert (await api.request("DELETE", "/api/v1/groups/ward-1/members/Jack", as_=SERVICE)).code == 200
    removed = await one(services, "group.member_removed")
    assert removed["target"] == {"channel": "gm", "group": "ward-1", "user": "Jack"}


@pytest.mark.gen_test
async def test_access_denied_on_rest_403(api, services):
    response = await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose", as_=("Eve", "patient"))
    assert_error(response, 403)
    denied = await one(services, "access.denied")
    assert (denied["actor"], denied["via"], denied["outcome"]) == ("Eve", "rest", "denied")
    assert denied["target"] == {"channel": "pm", "user": "Jack", "peer": "Rose"}


@pytest.mark.gen_test
async def test_access_denied_on_websocket(api, services):
    await make_group(api, gid="ward-2", members=("Rose", "Jack"))
    sock = await api.ws("Eve")
    frame = {"type": "gm", "group": "ward-2", "contentType": 1, "content": "hi", "clientMsgId": "c1"}
    reply = await sock.send_and_ack(frame)
    assert reply["type"] == "error" and reply["code"] == "not_a_member"
    denied = await one(services, "access.denied", group="ward-2")
    assert (denied["actor"], denied["via"], denied["outcome"]) == ("Eve", "ws", "denied")
    assert denied["target"]["channel"] == "gm"


@pytest.mark.gen_test
async def test_audit_query_filters_pages_and_records_itself(api, services):
    for n in range(5):
        await api.send_pm("Rose", "Jack", f"m{n}")
        await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose", as_=PATIENT)
    await api.get("/api/v1/conversations?user_id=Lily", as_=("Lily", "patient"))
    first = await api.get("/api/v1/audit?user=Jack&action=messages.read&limit=3", as_=ADMIN)
    assert first.code == 200, first.body
    page = first.json
    assert len(page["entries"]) == 3 and page["next"]
    assert all(e["action"] == "messages.read" and "Jack" in e["target"].values() for e in page["entries"])
    assert set(page["entries"][0]) == {"id", "at", "actor", "role", "action", "via", "target", "outcome"}
    second = (
        await api.get(f"/api/v1/audit?user=Jack&action=messages.read&limit=3&cursor={page['next']}", as_=ADMIN)
    ).json
    assert len(second["entries"]) == 2 and second["next"] is None
    ids = [e["id"] for e in page["entries"] + second["entries"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5  # newest first, no repeats
    # user matches the peer side too; actor filters by who acted.
    by_peer = (await api.get("/api/v1/audit?user=Rose&action=messages.read", as_=ADMIN)).json["entries"]
    assert len(by_peer) == 5
    lily = (await api.get("/api/v1/audit?actor=Lily", as_=ADMIN)).json["entries"]
    assert [e["action"] for e in lily] == ["conversations.read"]
    # since/until bound the time; the queries above were audited themselves.
    at = page["entries"][-1]["at"]
    since = (await api.get(f"/api/v1/audit?action=messages.read&since={at}", as_=ADMIN)).json["entries"]
    assert [e["id"] for e in since] == ids[:3]
    until = (await api.get(f"/api/v1/audit?action=messages.read&until={at}", as_=ADMIN)).json["entries"]
    assert [e["id"] for e in until] == ids[3:]
    reads = await entries(services, action="audit.read")
    assert len(reads) == 6 and reads[0]["actor"] == "ops" and reads[-1]["target"] == {"user": "Jack"}


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "query, field",
    [
        ("action=nope", "action"),
        ("since=yesterday", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("actor=%24gt", "actor"),
        ("user=%24ne", "user"),
        ("channel=xm", "channel"),
        ("limit=0", "limit"),
        ("cursor=abc", "cursor"),
        ("sort=1", "sort"),
    ],
)
async def test_bad_audit_queries_are_400_naming_the_field(api, query, field):
    assert_error(await api.get(f"/api/v1/audit?{query}", as_=ADMIN), 400, "invalid_field", field)


@pytest.mark.gen_test
async def test_only_admins_read_the_audit_trail_and_the_refusal_is_audited(api, services):
    for caller in (SERVICE, DOCTOR, PATIENT):
        assert_error(await api.get("/api/v1/audit", as_=caller), 403)
    assert_error(await api.get("/api/v1/audit"), 401)
    denied = await entries(services, action="access.denied")
    assert {d["actor"] for d in denied} == {"platform", "Rose", "Jack"}
    assert not await entries(services, action="audit.read")


def test_no_code_path_updates_or_deletes_audit_entries():
    """Append-only (SPEC §13): nothing updates an audit entry, nothing but retention deletes one."""
    pattern = re.compile(
        r"""(\baudit\b|["']audit["']|_audit\b)[\w\]\["'.()]*\.(update_one|update_many|replace_one|"""
        r"""find_one_and_update|find_one_and_replace|find_one_and_delete|delete_one|delete_many|drop|bulk_write)"""
    )
    offenders = []
    for folder in ("models", "server", "handlers"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for number, line in enumerate(text.splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    audit_source = (ROOT / "models" / "audit.py").read_text()
    for verb in ("update_one", "update_many", "replace_one", "delete_one", "delete_many", "bulk_write", "drop("):
        if verb in audit_source:
            offenders.append(f"models/audit.py uses {verb}")
    assert not offenders, offenders
