"""Retention and legal hold (SPEC §15): the purge, its lease, holds, and what stays right afterwards.

Time is moved by storing old documents straight into the collections (messages, audit entries,
webhook events) in the shapes the server stores them, never by sleeping. This module keeps pm and
gm messages 30 days and audit entries 400 days (the test profile's own defaults are SPEC's, checked
below); sm keeps the default 365.
"""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import sys
import time

import pytest
from bson import ObjectId

from models.audit import time_key
from models.clock import unix_ms, utcnow
from models.conversations import ConversationRef, pm_conv
from models.principal import Principal
from models.retention import Purger, RetentionPolicy
from server.config import ConfigError, load_settings
from server.retention import LEASE_NAME, DatabaseLease
from server.services import build_services, retention_policy
from tests.helpers import DOCTOR, PATIENT, SERVICE, assert_error, make_group
from tests.processes import ROOT
from tests.test_files import uploaded_id

ADMIN = ("ops", "admin")
DAYS = datetime.timedelta(days=1)


@pytest.fixture
def settings(settings):
    retention = dataclasses.replace(settings.retention, pm_days=30, gm_days=30, audit_days=400)
    return settings.replace(retention=retention)


def days_ago(days: float) -> datetime.datetime:
    return utcnow() - datetime.timedelta(days=days)


async def store_old(services, channel, conv, fields, count, age_days, first_seq=1, **extra):
    """`count` messages as models/messages.py stores them, `age_days` old (a millisecond apart)."""
    start = days_ago(age_days)
    docs = [
        {
            "_id": str(ObjectId()),
            "conv": conv,
            "channel": channel,
            **fields,
            "contentType": 1,
            "content": f"old {n}",
            **extra,
            "seq": first_seq + n,
            "createdAt": start + datetime.timedelta(milliseconds=n),
            "createdMs": unix_ms(start + datetime.timedelta(milliseconds=n)),
        }
        for n in range(count)
    ]
    await services.db[channel].insert_many(docs)
    return docs


async def store_old_pm(services, sender, to, count, age_days=400, first_seq=1, **extra):
    return await store_old(
        services, "pm", pm_conv(sender, to), {"from": sender, "to": to}, count, age_days, first_seq, **extra
    )


async def seqs(services, channel, conv):
    return [doc["seq"] async for doc in services.db[channel].find({"conv": conv}).sort("seq", 1)]


async def purge(api):
    response = await api.post("/api/v1/retention/run", as_=ADMIN)
    assert response.code == 200, response.body
    return response.json["purged"]


async def hold(api, body, status=201):
    response = await api.post("/api/v1/holds", {"reason": "litigation 2026-17", **body}, as_=ADMIN)
    assert response.code == status, response.body
    return response.json


# ---- the profile -----------------------------------------------------------------------------------


def test_the_test_profile_keeps_spec_defaults():
    table = load_settings({"IM_PROFILE": "test"}).retention
    assert (table.sm_days, table.pm_days, table.gm_days, table.audit_days, table.webhook_days) == (365, 0, 0, 0, 7)
    assert table.interval_hours == 24


@pytest.mark.parametrize("key", ["SM_DAYS", "PM_DAYS", "GM_DAYS", "AUDIT_DAYS", "WEBHOOK_DAYS"])
def test_negative_days_are_refused_naming_the_variable(key):
    with pytest.raises(ConfigError, match=f"IM_RETENTION_{key}.*at least 0"):
        load_settings({"IM_PROFILE": "test", f"IM_RETENTION_{key}": "-1"})


def test_negative_days_stop_start_up_with_one_line(child_env):
    env = {**child_env, "IM_PROFILE": "test", "IM_RETENTION_PM_DAYS": "-5"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "run.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 2 and time.monotonic() - started < 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "IM_RETENTION_PM_DAYS" in lines[0], result.stderr


# ---- the purge -------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_purge_deletes_old_messages_and_keeps_recent_ones(api, services):
    await store_old_pm(services, "Rose", "Jack", 5, age_days=400)
    await store_old_pm(services, "Rose", "Jack", 2, age_days=10, first_seq=6)
    newest = await api.send_pm("Rose", "Jack", "today")
    assert newest["seq"] == 8
    counts = await purge(api)
    assert counts == {"sm": 0, "pm": 5, "gm": 0, "audit": 0, "webhook": 0, "files": 0}
    assert await seqs(services, "pm", pm_conv("Rose", "Jack")) == [6, 7, 8]
    assert (await purge(api))["pm"] == 0  # nothing left past its limit


@pytest.mark.gen_test
async def test_a_conversations_newest_message_is_kept_so_its_seq_is_never_reused(api, services, settings):
    """models/messages.py takes the next seq from the newest stored one: that one must stay."""
    conv = pm_conv("Rose", "Jack")
    await store_old_pm(services, "Rose", "Jack", 3, age_days=400)
    await api.send_pm("Rose", "Jack", "soon old")  # seq 4: the summary's lastSeq
    await services.db.pm.delete_many({"conv": conv, "seq": 4})  # ... and make it old as well
    await store_old_pm(services, "Rose", "Jack", 1, age_days=399, first_seq=4)
    assert (await purge(api))["pm"] == 3  # seq 4, the newest, stays however old
    assert await seqs(services, "pm", conv) == [4]
    # A restarted process (no seq cache) continues after it.
    restarted = build_services(settings, services.client)
    body = {"from": "Rose", "to": "Jack", "contentType": 1, "content": "after the purge"}
    message, created = await restarted.messages.send(
        await restarted.messages.draft_pm(Principal("Rose", "doctor"), body)
    )
    assert created and message["seq"] == 5


@pytest.mark.gen_test
async def test_sm_uses_its_own_limit_and_gm_too(api, services):
    await store_old(services, "sm", "Jack", {"from": "platform", "to": "Jack", "title": "t", "summary": ""}, 3, 400)
    await store_old(services, "sm", "Jack", {"from": "platform", "to": "Jack", "title": "t", "summary": ""}, 1, 300, 4)
    sent = await api.post(
        "/api/v1/chats/sm", {"to": "Jack", "title": "t", "summary": "s", "contentType": 1, "content": "c"}, as_=SERVICE
    )
    assert sent.json["seq"] == 5
    await make_group(api, gid="ward-1", members=("Rose", "Jack"))  # seq 1: group.created
    await store_old(services, "gm", "ward-1", {"from": "Rose", "group": "ward-1", "groupType": 1}, 3, 40, 2)
    await api.post(
        "/api/v1/chats/gm", {"from": "Rose", "group": "ward-1", "contentType": 1, "content": "hi"}, as_=DOCTOR
    )
    counts = await purge(api)
    assert (counts["sm"], counts["gm"]) == (3, 3)  # sm: 365 days (300 days old stays); gm: 30 days
    assert await seqs(services, "sm", "Jack") == [4, 5]
    assert await seqs(services, "gm", "ward-1") == [1, 5]


@pytest.mark.gen_test
async def test_pm_and_gm_are_kept_forever_by_default(services):
    await store_old_pm(services, "Rose", "Jack", 3, age_days=4000)
    await services.conversations.record_message(
        ConversationRef.pm("Rose", "Jack"), {"seq": 9, "createdAt": utcnow(), "from": "Rose"}, ["Jack", "Rose"]
    )
    defaults = retention_policy(load_settings({"IM_PROFILE": "test"}))
    counts = await Purger(services.db, defaults, services.holds).purge()
    assert counts["pm"] == 0 and len(await seqs(services, "pm", pm_conv("Rose", "Jack"))) == 3


@pytest.mark.gen_test
async def test_the_purge_is_audited_with_its_counts(api, services):
    await store_old_pm(services, "Rose", "Jack", 2)
    await api.send_pm("Rose", "Jack")
    await purge(api)
    entry = await services.db.audit.find_one({"action": "retention.purged"})
    assert (entry["actor"], entry["role"], entry["via"], entry["outcome"]) == ("ops", "admin", "rest", "ok")
    assert entry["target"] == {"purged": {"sm": 0, "pm": 2, "gm": 0, "audit": 0, "webhook": 0, "files": 0}}
    await services.retention.run_for_testing()  # the server's own schedule
    scheduled = await services.db.audit.find_one({"action": "retention.purged", "via": "system"})
    assert (scheduled["actor"], scheduled["role"]) == ("system", "system")


@pytest.mark.gen_test
@pytest.mark.parametrize("caller", [SERVICE, DOCTOR, PATIENT])
async def test_only_admins_run_a_purge_and_refusals_are_audited(api, services, caller):
    assert_error(await api.post("/api/v1/retention/run", as_=caller), 403, "forbidden")
    assert_error(await api.post("/api/v1/retention/run"), 401)
    denied = await services.db.audit.find_one({"action": "access.denied", "actor": caller[0]})
    assert denied is not None and denied["outcome"] == "denied"


@pytest.mark.gen_test
async def test_audit_entries_and_delivered_webhook_events_past_their_limit_go(api, services):
    old, recent = days_ago(500), days_ago(100)
    entries = [
        {"_id": f"{time_key(at)}-{ObjectId()}", "at": at, "actor": "a", "role": "doctor", "action": "file.read"}
        for at in (old, old, recent)
    ]
    for entry in entries:
        entry.update({"key": entry["_id"], "via": "rest", "target": {}, "outcome": "ok"})
    await services.db.audit.insert_many(entries)
    now = time.time()
    events = [
        {"_id": str(ObjectId()), "type": "message.created", "status": status, "deliveredAt": delivered, "data": {}}
        for status, delivered in (("delivered", now - 8 * 86400), ("delivered", now - 3600), ("pending", 0.0))
    ]
    events.append({"_id": str(ObjectId()), "type": "x", "status": "failed", "data": {}})
    await services.db.webhook_events.insert_many(events)
    counts = await purge(api)
    assert (counts["audit"], counts["webhook"]) == (2, 1)
    left = {doc["_id"] async for doc in services.db.audit.find({"action": "file.read"})}
    assert left == {entries[2]["_id"]}
    assert {doc["_id"] async for doc in services.db.webhook_events.find({})} == {e["_id"] for e in events[1:]}


@pytest.mark.gen_test
async def test_files_no_kept_message_carries_go_after_a_day(api, services):
    gone_with_message = await uploaded_id(api)
    kept_by_message = await uploaded_id(api)
    never_sent = await uploaded_id(api)
    await store_old_pm(services, "Rose", "Jack", 1, contentType=2, content=gone_with_message)
    # An old message carrying kept_by_message, then a recent one carrying it too.
    await store_old_pm(services, "Rose", "Jack", 1, first_seq=2, contentType=2, content=kept_by_message)
    await api.send_pm("Rose", "Jack", kept_by_message, contentType=2)
    # Uploads are younger than a day: nothing goes yet.
    first = await services.retention.run_for_testing()
    assert first is not None and (first["pm"], first["files"]) == (2, 0)
    later = await services.retention.run_for_testing(now=utcnow() + 2 * DAYS)
    assert later is not None and later["files"] == 2
    remaining = {str(doc["_id"]) async for doc in services.db["attachments.files"].find({})}
    assert kept_by_message in remaining and not {gone_with_message, never_sent} & remaining
    assert (await api.get(f"/api/v1/files/{kept_by_message}", as_=PATIENT)).code == 200


# ---- holds -----------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_user_hold_keeps_its_conversations_until_released(api, services):
    await store_old_pm(services, "Rose", "Jack", 3)
    await api.send_pm("Rose", "Jack")
    await store_old_pm(services, "Rose", "Lily", 3)
    await api.send_pm("Rose", "Lily")
    placed = await hold(api, {"user": "Jack"})
    assert set(placed) == {"id", "user", "reason", "createdAt", "createdBy"}
    assert (placed["user"], placed["createdBy"]) == ("Jack", "ops")
    assert (await purge(api))["pm"] == 3  # Rose–Lily only
    assert len(await seqs(services, "pm", pm_conv("Rose", "Jack"))) == 4
    listed = (await api.get("/api/v1/holds", as_=ADMIN)).json
    assert listed == {"holds": [placed]}
    released = await api.request("DELETE", f"/api/v1/holds/{placed['id']}", as_=ADMIN)
    assert released.code == 200 and released.json["releasedBy"] == "ops" and released.json["releasedAt"]
    assert (await api.get("/api/v1/holds", as_=ADMIN)).json == {"holds": []}
    assert_error(await api.request("DELETE", f"/api/v1/holds/{placed['id']}", as_=ADMIN), 404, "hold_not_found")
    assert (await purge(api))["pm"] == 3  # released: the next purge takes what is past its limit
    created = await services.db.audit.find_one({"action": "hold.created"})
    assert created["target"] == {"holdId": placed["id"], "user": "Jack"} and created["actor"] == "ops"
    assert (await services.db.audit.find_one({"action": "hold.released"}))["target"]["holdId"] == placed["id"]


@pytest.mark.gen_test
async def test_a_conversation_hold_and_a_group_hold(api, services):
    for peer in ("Jack", "Lily"):
        await store_old_pm(services, "Rose", peer, 2)
        await api.send_pm("Rose", peer)
    for gid in ("ward-1", "ward-2"):
        await make_group(api, gid=gid, members=("Rose", "Jack"))
        await store_old(services, "gm", gid, {"from": "Rose", "group": gid, "groupType": 1}, 2, 60, 2)
        await api.post("/api/v1/chats/gm", {"from": "Rose", "group": gid, "contentType": 1, "content": "x"}, as_=DOCTOR)
    pair = await hold(api, {"user": "Rose", "peer": "Jack"})
    assert (pair["user"], pair["peer"]) == ("Rose", "Jack")
    group = await hold(api, {"group": "ward-2"})
    assert set(group) == {"id", "group", "reason", "createdAt", "createdBy"}
    counts = await purge(api)
    assert (counts["pm"], counts["gm"]) == (2, 2)
    assert await seqs(services, "pm", pm_conv("Rose", "Jack")) == [1, 2, 3]
    assert await seqs(services, "pm", pm_conv("Rose", "Lily")) == [3]
    assert await seqs(services, "gm", "ward-1") == [1, 4]
    assert await seqs(services, "gm", "ward-2") == [1, 2, 3, 4]
    entry = await services.db.audit.find_one({"action": "hold.created", "target.group": "ward-2"})
    assert entry["target"] == {"holdId": group["id"], "channel": "gm", "group": "ward-2"}


@pytest.mark.gen_test
async def test_a_held_users_groups_and_files_are_kept(api, services):
    await make_group(api, gid="ward-3", members=("Rose", "Jack"))
    await store_old(services, "gm", "ward-3", {"from": "Rose", "group": "ward-3", "groupType": 1}, 2, 60, 2)
    await api.post(
        "/api/v1/chats/gm", {"from": "Rose", "group": "ward-3", "contentType": 1, "content": "x"}, as_=DOCTOR
    )
    jacks_file = await uploaded_id(api, as_=PATIENT)  # never sent
    await hold(api, {"user": "Jack"})
    counts = await services.retention.run_for_testing(now=utcnow() + 2 * DAYS)
    assert counts is not None and (counts["gm"], counts["files"]) == (0, 0)
    assert await services.db["attachments.files"].find_one({"_id": ObjectId(jacks_file)}) is not None


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body, status, code, field",
    [
        ({}, 400, "invalid_field", "user"),  # a hold on nothing
        ({"reason": "r"}, 400, "invalid_field", "user"),
        ({"user": "Rose"}, 400, "invalid_field", "reason"),
        ({"user": "Rose", "reason": "   "}, 400, "invalid_field", "reason"),
        ({"user": "Rose", "reason": 7}, 400, "invalid_field", "reason"),
        ({"user": 5, "reason": "r"}, 400, "invalid_field", "user"),
        ({"user": "$gt", "reason": "r"}, 400, "invalid_field", "user"),
        ({"user": ["Rose"], "reason": "r"}, 400, "invalid_field", "user"),
        ({"peer": "Jack", "reason": "r"}, 400, "invalid_field", "peer"),
        ({"user": "Rose", "peer": "Rose", "reason": "r"}, 400, "invalid_field", "peer"),
        ({"user": "Rose", "group": "ward-9", "reason": "r"}, 400, "invalid_field", "group"),
        ({"group": {"$ne": 1}, "reason": "r"}, 400, "invalid_field", "group"),
        ({"user": "Nobody", "reason": "r"}, 404, "unknown_hold_target", "user"),
        ({"user": "Rose", "peer": "Nobody", "reason": "r"}, 404, "unknown_hold_target", "peer"),
        ({"group": "no-such-group", "reason": "r"}, 404, "unknown_hold_target", "group"),
    ],
)
async def test_bad_holds_are_the_envelope_naming_the_field(api, services, body, status, code, field):
    await api.send_pm("Rose", "Jack")
    assert_error(await api.post("/api/v1/holds", body, as_=ADMIN), status, code, field)
    assert await services.db.holds.find_one({}) is None


@pytest.mark.gen_test
async def test_holds_are_admin_only_and_malformed_bodies_are_400(api, services):
    await api.send_pm("Rose", "Jack")
    for caller in (SERVICE, DOCTOR, PATIENT):
        assert_error(await api.post("/api/v1/holds", {"user": "Jack", "reason": "r"}, as_=caller), 403)
        assert_error(await api.get("/api/v1/holds", as_=caller), 403)
        assert_error(await api.request("DELETE", f"/api/v1/holds/{ObjectId()}", as_=caller), 403)
    assert_error(await api.post("/api/v1/holds", raw_body=b"{nope", as_=ADMIN), 400, "invalid_body")
    assert_error(await api.request("DELETE", "/api/v1/holds/not-an-id", as_=ADMIN), 404, "hold_not_found")
    assert await services.db.audit.find_one({"action": "access.denied", "actor": "Jack"}) is not None


# ---- what stays right ------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_after_a_purge_unread_backlog_and_history_stay_right(api, services):
    await store_old_pm(services, "Rose", "Jack", 5)  # never read by Jack
    await api.send_pm("Rose", "Jack", "six")
    await api.send_pm("Rose", "Jack", "seven")
    before = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"][0]
    assert (before["unread"], before["lastMessage"]["seq"]) == (7, 7)
    assert (await purge(api))["pm"] == 5
    after = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"][0]
    assert after["unread"] == 2 and after["lastMessage"] == before["lastMessage"]
    assert (after["receivedSeq"], after["readSeq"]) == (0, 0)
    doctor = (await api.get("/api/v1/conversations?user_id=Rose", as_=DOCTOR)).json["conversations"][0]
    assert doctor["unread"] == 0 and doctor["peerReadSeq"] == 0
    # The backlog of a reconnecting socket: what is left, in order, at once (no wait for the gap).
    sock = await api.ws("Jack")
    started = time.monotonic()
    got = [(await sock.recv_type("message", timeout=2))["message"] for _ in range(2)]
    assert [m["seq"] for m in got] == [6, 7] and time.monotonic() - started < 0.4
    await sock.expect_silence()
    # History pages over what is left.
    page = (await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose&limit=1", as_=PATIENT)).json
    assert [m["seq"] for m in page["messages"]] == [6]
    rest = (await api.get(f"/api/v1/chats/pm?user_id=Jack&peer=Rose&cursor={page['next']}", as_=PATIENT)).json
    assert [m["seq"] for m in rest["messages"]] == [7] and rest["next"] is None
    before_7 = (await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose&before=7", as_=PATIENT)).json
    assert [m["seq"] for m in before_7["messages"]] == [6]
    # Reading and new messages carry on from there.
    await sock.send({"type": "read", "channel": "pm", "peer": "Rose", "seq": 7})
    await sock.send({"type": "ping"})
    await sock.recv_type("pong")
    live = await api.send_pm("Rose", "Jack", "eight")
    assert live["seq"] == 8 and (await sock.recv_type("message"))["message"]["seq"] == 8
    final = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"][0]
    assert final["unread"] == 1


@pytest.mark.gen_test
async def test_group_backlog_after_a_purge(api, services):
    await make_group(api, gid="ward-5", members=("Rose", "Jack"))  # seq 1: group.created ...
    notice = await services.db.gm.find_one_and_delete({"conv": "ward-5", "seq": 1})
    made_old = days_ago(61)  # ... made 61 days old
    old_notice = {**notice, "createdAt": made_old, "createdMs": unix_ms(made_old)}
    await services.db.gm.insert_one(old_notice)
    await store_old(services, "gm", "ward-5", {"from": "Rose", "group": "ward-5", "groupType": 1}, 4, 60, 2)
    sent = await api.post(
        "/api/v1/chats/gm", {"from": "Rose", "group": "ward-5", "contentType": 1, "content": "now"}, as_=DOCTOR
    )
    assert sent.json["seq"] == 6
    assert (await purge(api))["gm"] == 5
    assert await seqs(services, "gm", "ward-5") == [6]
    unread = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"][0]["unread"]
    assert unread == 1
    sock = await api.ws("Jack")
    started = time.monotonic()
    assert (await sock.recv_type("message", timeout=2))["message"]["seq"] == 6
    assert time.monotonic() - started < 0.4  # no wait for the missing seqs 1..5
    await sock.expect_silence()


# ---- batches and the lease -------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_the_purge_deletes_in_bounded_batches_and_yields_between_them(api, services):
    for peer in ("Jack", "Lily", "Ann"):
        await store_old_pm(services, "Rose", peer, 7)
        await api.send_pm("Rose", peer)
    await hold(api, {"user": "Rose", "peer": "Lily"})
    pauses = []

    async def between():
        pauses.append(time.monotonic())

    purger = Purger(services.db, RetentionPolicy(pm_days=30, batch_size=3), services.holds)
    counts = await purger.purge(between_batches=between)
    assert counts["pm"] == 14 and len(pauses) >= 4
    assert len(await seqs(services, "pm", pm_conv("Rose", "Lily"))) == 8


@pytest.mark.gen_test
async def test_messages_stored_before_created_ms_existed_are_purged_by_their_created_at(api, services):
    """The purge walks `createdMs`; a message without it gets it from createdAt first."""
    old = await store_old_pm(services, "Rose", "Jack", 5)
    await services.db.pm.update_many({"_id": {"$in": [doc["_id"] for doc in old]}}, {"$unset": {"createdMs": ""}})
    unreadable = {**old[0], "_id": str(ObjectId()), "seq": 6, "createdAt": "not a time"}
    del unreadable["createdMs"]
    await services.db.pm.insert_one(unreadable)
    await api.send_pm("Rose", "Jack", "recent")
    purger = Purger(services.db, RetentionPolicy(pm_days=30, batch_size=2), services.holds)
    assert (await purger.purge())["pm"] == 5
    assert await seqs(services, "pm", pm_conv("Rose", "Jack")) == [6, 7]
    left = await services.db.pm.find_one({"_id": unreadable["_id"]})
    assert left["createdMs"] == 0  # never purged: its age is unknown


@pytest.mark.gen_test
async def test_many_kept_messages_in_one_second_do_not_stop_the_purge(api, services):
    """A batch of held messages all in one second (nx-27017 compares whole seconds) is stepped over."""
    at = days_ago(400).replace(microsecond=0)
    held = [
        {"_id": str(ObjectId()), "conv": pm_conv("Rose", "Lily"), "channel": "pm", "from": "Rose", "to": "Lily"}
        for _ in range(7)
    ]
    doomed = [
        {"_id": str(ObjectId()), "conv": pm_conv("Rose", "Jack"), "channel": "pm", "from": "Rose", "to": "Jack"}
        for _ in range(4)
    ]
    docs = [
        {**doc, "contentType": 1, "content": "x", "seq": n + 1, "createdAt": at}
        for group in (held, doomed)
        for n, doc in enumerate(group)
    ]
    await services.db.pm.insert_many(docs)
    for peer in ("Lily", "Jack"):
        await api.send_pm("Rose", peer)
    await hold(api, {"user": "Lily"})
    purger = Purger(services.db, RetentionPolicy(pm_days=30, batch_size=3), services.holds)
    assert (await purger.purge())["pm"] == 4
    assert len(await seqs(services, "pm", pm_conv("Rose", "Lily"))) == 8


@pytest.mark.gen_test
async def test_one_purge_at_a_time_through_the_lease(api, services):
    await store_old_pm(services, "Rose", "Jack", 2)
    await api.send_pm("Rose", "Jack")
    other_process = DatabaseLease(services.db, LEASE_NAME, owner="other-host:1:x")
    assert await other_process.acquire()
    assert_error(await api.post("/api/v1/retention/run", as_=ADMIN), 409, "purge_running")
    assert await services.retention.run_for_testing() is None  # the schedule skips it too
    assert len(await seqs(services, "pm", pm_conv("Rose", "Jack"))) == 3
    await other_process.release()
    assert (await purge(api))["pm"] == 2
    lease = await services.db.leases.find_one({"_id": LEASE_NAME})
    assert lease["until"] == 0.0 and lease["lastCounts"]["pm"] == 2


@pytest.mark.gen_test
async def test_an_expired_lease_is_taken_over_and_its_owner_stops(services):
    crashed = DatabaseLease(services.db, LEASE_NAME, lease_secs=60, owner="crashed:1:x")
    assert await crashed.acquire()
    await services.db.leases.update_one({"_id": LEASE_NAME}, {"$set": {"until": time.time() - 1}})
    successor = DatabaseLease(services.db, LEASE_NAME, owner="next:2:y")
    assert await successor.acquire()
    crashed._until = 0.0  # its next renewal is due (it stalled past its lease)
    with pytest.raises(Exception, match="taken over"):
        await crashed.renew()
    await successor.renew()
    assert (await services.db.leases.find_one({"_id": LEASE_NAME}))["owner"] == "next:2:y"


@pytest.mark.gen_test
async def test_the_purge_walks_indexes(services):
    """The purge's queries use indexes on nx-27017 (SQLite's plan says SEARCH … USING INDEX)."""
    shapes = [
        ("pm", {"createdMs": {"$lt": unix_ms(utcnow())}}),
        ("pm", {"createdMs": {"$gte": unix_ms(days_ago(2)), "$lt": unix_ms(utcnow())}}),
        ("pm", {"createdMs": {"$exists": False}}),
        ("audit", {"key": {"$lt": "e2026"}}),
        ("webhook_events", {"status": {"$eq": "delivered"}, "deliveredAt": {"$lt": 1.0}}),
        ("message_versions", {"content": {"$eq": "6b0a00000000000000000000"}}),
    ]
    for collection, filter_ in shapes:
        answer = await services.db.command("explain", {"find": collection, "filter": filter_})
        plan = [step["detail"] for step in answer["queryPlanner"]["winningPlan"]]
        assert plan and plan[0].startswith(f"SEARCH {collection} USING "), (collection, plan)


@pytest.mark.gen_test
async def test_a_recalled_messages_versions_and_file_follow_the_message(api, services):
    """models/recall.py keeps what a changed message was in message_versions (its file id too)."""
    kept_file, old_file = await uploaded_id(api), await uploaded_id(api)
    recent = await api.send_pm("Rose", "Jack", kept_file, contentType=2)
    [old] = await store_old_pm(services, "Rose", "Jack", 1, first_seq=recent["seq"] + 1, contentType=2, content="")
    await api.send_pm("Rose", "Jack", "newest")
    for message_id, file_id in ((recent["id"], kept_file), (old["_id"], old_file)):
        await services.db.pm.update_one({"_id": message_id}, {"$set": {"content": "", "recalled": True}})
        version = {"messageId": message_id, "action": "created", "content": file_id, "contentType": 2}
        await services.db.message_versions.insert_one({"_id": f"{message_id}:0", **version})
    counts = await services.retention.run_for_testing(now=utcnow() + 2 * DAYS)
    assert counts is not None and (counts["pm"], counts["files"]) == (1, 1)
    assert [doc["messageId"] async for doc in services.db.message_versions.find({})] == [recent["id"]]
    files = {str(doc["_id"]) async for doc in services.db["attachments.files"].find({})}
    assert files == {kept_file}  # the recalled message is kept, so is the original's file
