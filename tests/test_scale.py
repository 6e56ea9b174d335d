"""Issue 13, real sizes: the conversation list pages, unread is exact without counting, peerReadSeq,
and the backlog finds news without reading every conversation."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.conversations import ConversationRef
from models.principal import Principal
from tests.helpers import DOCTOR, PATIENT, SERVICE, assert_error, make_group


async def list_all(api, user, role, limit):
    """Every page of the user's conversation list, following next."""
    pages, cursor = [], None
    for _ in range(100):  # bounded: a cursor that never ends fails the test, not the run
        path = f"/api/v1/conversations?user_id={user}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = await api.get(path, as_=(user, role))
        assert response.code == 200, response.body
        pages.append(response.json["conversations"])
        cursor = response.json["next"]
        if cursor is None:
            return pages
    raise AssertionError("the list did not end")


@pytest.mark.gen_test
async def test_conversation_list_pages_newest_activity_first(api):
    for i in range(7):
        await api.send_pm("Rose", f"patient-{i}", f"hello {i}")
    await make_group(api, "care-9", members=("Rose", "Jack"))
    await api.send_pm("Rose", "patient-2", "newest pm")  # moves patient-2 up
    pages = await list_all(api, "Rose", "doctor", 3)
    assert [len(p) for p in pages] == [3, 3, 2]
    entries = [e for page in pages for e in page]
    names = [e.get("peer") or e.get("group") for e in entries]
    assert names == [
        "patient-2",
        "care-9",
        "patient-6",
        "patient-5",
        "patient-4",
        "patient-3",
        "patient-1",
        "patient-0",
    ]
    times = [e["lastMessage"]["createdAt"] for e in entries]
    assert times == sorted(times, reverse=True)
    # Without limit: the first page of 50 (existing callers), with next.
    for i in range(7, 52):
        await api.send_pm("Rose", f"patient-{i}", "hi")
    first = (await api.get("/api/v1/conversations?user_id=Rose", as_=DOCTOR)).json
    assert len(first["conversations"]) == 50 and first["next"]
    rest = (await api.get(f"/api/v1/conversations?user_id=Rose&cursor={first['next']}", as_=DOCTOR)).json
    assert len(rest["conversations"]) == 53 - 50 and rest["next"] is None
    big = (await api.get("/api/v1/conversations?user_id=Rose&limit=100000", as_=DOCTOR)).json
    assert len(big["conversations"]) == 53


@pytest.mark.gen_test
async def test_conversation_list_rejects_bad_limit_and_cursor(api):
    await api.send_pm("Rose", "Jack", "x")
    for bad in ("0", "-1", "abc", "1.5", ""):
        assert_error(await api.get(f"/api/v1/conversations?user_id=Rose&limit={bad}", as_=DOCTOR), 400, field="limit")
    for bad in ("zzz", "YWJj", "%24gt", "a" * 2000, "MjAyNi0xMS0yOFQwNjowMTowMi4zNDVa"):
        assert_error(await api.get(f"/api/v1/conversations?user_id=Rose&cursor={bad}", as_=DOCTOR), 400, field="cursor")


@pytest.mark.gen_test
async def test_pm_entry_shows_how_far_the_peer_has_read(api):
    for i in range(3):
        await api.send_pm("Rose", "Jack", f"advice {i}")
    await api.post(
        "/api/v1/conversations/read", {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 2}, as_=PATIENT
    )
    rose = (await api.get("/api/v1/conversations?user_id=Rose", as_=DOCTOR)).json["conversations"]
    assert rose[0]["peer"] == "Jack" and rose[0]["peerReadSeq"] == 2 and rose[0]["unread"] == 0
    jack = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"]
    assert jack[0]["peerReadSeq"] == 0 and jack[0]["readSeq"] == 2 and jack[0]["unread"] == 1
    await make_group(api, "care-2", members=("Rose", "Jack"))
    group = next(
        c
        for c in (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"]
        if c["channel"] == "gm"
    )
    assert "peerReadSeq" not in group


# ---- unread is exact under interleavings of sends and read moves --------------------------------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 2)),  # 0, 1: the parties; 2: a staff operator's event
        st.tuples(st.just("read"), st.integers(0, 1), st.integers(0, 12)),
    ),
    min_size=1,
    max_size=24,
)


async def check_unread_matches_a_count(services, channel: str, ops: list[tuple], rounds_of: int) -> None:
    tag = uuid.uuid4().hex[:8]
    users = [f"a-{tag}", f"b-{tag}"]
    group = f"g-{tag}"
    if channel == "gm":
        await services.groups.create(
            group_id=group, name="g", group_type=0, members=[*users, f"c-{tag}"], created_by="platform"
        )
    messages = services.messages

    async def run(op: tuple) -> None:
        if op[0] == "send":
            sender = users[op[1]] if op[1] < 2 else f"nurse-{tag}"
            principal = Principal(sender, "patient" if op[1] < 2 else "service")
            if channel == "pm":
                data = {
                    "from": sender,
                    "to": users[1 - op[1]] if op[1] < 2 else users[0],
                    "contentType": 1,
                    "content": "x",
                }
                if op[1] == 2:  # an event from a staff operator: a message from neither party
                    draft = await messages.draft_pm(Principal("platform", "service"), {**data, "from": users[1]})
                    draft.fields["from"] = sender
                else:
                    draft = await messages.draft_pm(principal, data)
            else:
                data = {"from": users[op[1] % 2], "group": group, "contentType": 1, "content": "x"}
                draft = await messages.draft_gm(Principal(users[op[1] % 2], "patient"), data)
                if op[1] == 2:
                    draft.fields["from"] = sender  # a notice from a non-member operator
            await messages.send(draft)
        else:
            user = users[op[1]]
            target = {
                "channel": channel,
                "seq": op[2],
                **({"peer": users[1 - op[1]]} if channel == "pm" else {"group": group}),
            }
            try:
                await services.inbox.mark(user, target, read=True)
            except Exception as exc:  # nothing to mark yet
                assert getattr(exc, "code", None) == "not_found", exc

    # Concurrent rounds: sends and read moves of a round race each other.
    for start in range(0, len(ops), rounds_of):
        await asyncio.gather(*(run(op) for op in ops[start : start + rounds_of]))
        ref = ConversationRef.pm(*users) if channel == "pm" else ConversationRef.gm(group)
        for user in users:
            page = await services.inbox.list_conversations(user, 200)
            entry = next((c for c in page["conversations"] if c.get("peer") in users or c.get("group") == group), None)
            if entry is None:
                continue
            counted = await services.db[channel].count_documents(
                {"conv": ref.conv, "seq": {"$gt": entry["readSeq"]}, "from": {"$ne": user}}
            )
            assert entry["unread"] == counted, (user, entry, ops)


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@fuzz(25)
@given(ops=OPERATIONS, rounds_of=st.integers(1, 6))
def test_pm_unread_is_exact_under_concurrent_sends_and_reads(services, io_loop, ops, rounds_of):
    io_loop.run_sync(lambda: check_unread_matches_a_count(services, "pm", ops, rounds_of), timeout=60)


@fuzz(15)
@given(ops=OPERATIONS, rounds_of=st.integers(1, 6))
def test_gm_unread_is_exact_under_concurrent_sends_and_reads(services, io_loop, ops, rounds_of):
    io_loop.run_sync(lambda: check_unread_matches_a_count(services, "gm", ops, rounds_of), timeout=60)


# ---- deferred delivery finds the news only ---------------------------------------------------------


@pytest.mark.gen_test
async def test_backlog_sends_only_the_news_and_live_messages_go_straight_out(api, services):
    for i in range(12):
        await api.send_pm("Rose", f"p{i}", f"m{i}")
    rose = await api.ws("Rose", "doctor")
    seen = [(await rose.recv_type("message"))["message"] for _ in range(12)]
    for message in seen:
        await rose.send({"type": "received", "channel": "pm", "peer": message["to"], "seq": message["seq"]})
    await rose.send({"type": "ping"})
    await rose.recv_type("pong")
    assert await services.conversations.find_pending("Rose") == []  # every flag cleared
    rose.close()
    news = [await api.send_pm(f"p{i}", "Rose", f"reply {i}", role="patient") for i in (3, 7)]
    plan = await services.inbox.backlog_plan("Rose")
    assert {ref.key for ref, received, newest in plan if newest > received} == {
        ConversationRef.pm("Rose", "p3").key,
        ConversationRef.pm("Rose", "p7").key,
    }
    again = await api.ws("Rose", "doctor")
    backlog = [(await again.recv_type("message"))["message"] for _ in range(2)]
    assert sorted(m["id"] for m in backlog) == sorted(m["id"] for m in news)
    await again.expect_silence()
    # A conversation without news has a baseline: its next message is not held as a gap (0.5 s).
    live = await api.send_pm("p5", "Rose", "later", role="patient")
    frame = await again.recv_type("message", timeout=0.4)
    assert frame["message"]["id"] == live["id"] and live["seq"] == 2


@pytest.mark.gen_test
async def test_summaries_from_before_issue_13_are_upgraded(api, services):
    await api.send_pm("Rose", "Jack", "old one")
    await api.send_pm("Jack", "Rose", "old two", role="patient")
    await api.post(
        "/api/v1/chats/sm",
        {"to": "Jack", "title": "t", "summary": "s", "contentType": 1, "content": "Your appointment"},
        as_=SERVICE,
    )
    await api.post(
        "/api/v1/conversations/read", {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 1}, as_=PATIENT
    )
    # Strip what issue 13 added, as a summary written by the earlier server looks.
    added = {f"{name}{side}": "" for name in ("activity", "pending", "received", "read", "own") for side in "AB"}
    await services.db.conversations.update_many({}, {"$unset": {**added, "activityAt": ""}})
    assert (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"] == []
    assert await services.conversations.upgrade_summaries() == 2
    listed = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"]
    pm = next(c for c in listed if c["channel"] == "pm")
    assert [c["channel"] for c in listed] == ["sm", "pm"]
    assert pm["unread"] == 0 and pm["readSeq"] == 1 and pm["peerReadSeq"] == 0
    rose = (await api.get("/api/v1/conversations?user_id=Rose", as_=DOCTOR)).json["conversations"]
    assert rose[0]["unread"] == 1 and rose[0]["peerReadSeq"] == 1
    assert await services.conversations.upgrade_summaries() == 0


@pytest.mark.gen_test
async def test_group_fan_out_frames_arrive_intact_at_every_size(api):
    await make_group(api, "care-big", members=("Rose", "Jack", "Lily"))
    jack, lily = await api.ws("Jack"), await api.ws("Lily")
    lily_too = await api.ws("Lily")
    for content in ("短", "x" * 125, "y" * 200, "今天感觉怎么样？🌡" * 888):  # 7-bit, 16-bit lengths
        response = await api.post(
            "/api/v1/chats/gm", {"from": "Rose", "group": "care-big", "contentType": 1, "content": content}, as_=DOCTOR
        )
        assert response.code == 201, response.body
        for socket in (jack, lily, lily_too):
            frame = await socket.recv_type("message")
            while frame["message"].get("event"):  # the group.created notice came first
                frame = await socket.recv_type("message")
            assert frame["message"] == response.json and frame["message"]["content"] == content
