"""Messaging over REST: the three channels, seq, idempotency, paging, conversations, validation."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.helpers import DOCTOR, PATIENT, SERVICE, assert_error, make_group

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.mark.gen_test
async def test_pm_send_returns_the_stored_message(api):
    response = await api.post(
        "/api/v1/chats/pm",
        {"from": "Rose", "to": "Jack", "contentType": "1", "content": "Take the pills twice a day"},
        as_=DOCTOR,
    )
    assert response.code == 201
    message = response.json
    assert message["channel"] == "pm" and message["from"] == "Rose" and message["to"] == "Jack"
    assert message["contentType"] == 1  # "1" on input, integer on output
    assert message["seq"] == 1
    assert isinstance(message["id"], str) and message["id"]
    assert ISO_MS.match(message["createdAt"])
    assert "clientMsgId" not in message


@pytest.mark.gen_test
async def test_system_message_from_service_only(api):
    body = {
        "to": "Rose",
        "title": "System Message",
        "summary": "You have new job",
        "contentType": "1",
        "content": "The patient has been followed in the scheduler.",
    }
    response = await api.post("/api/v1/chats/sm", body, as_=SERVICE)
    assert response.code == 201
    assert response.json["from"] == "platform"
    assert response.json["title"] == "System Message" and response.json["summary"] == "You have new job"
    assert_error(await api.post("/api/v1/chats/sm", body, as_=DOCTOR), 403, "forbidden")
    listed = await api.get("/api/v1/chats/sm?user_id=Rose", as_=DOCTOR)
    assert [m["content"] for m in listed.json["messages"]] == [body["content"]]


@pytest.mark.gen_test
async def test_seq_counts_per_conversation_without_gaps(api):
    for i in range(3):
        assert (await api.send_pm("Rose", "Jack", f"a{i}"))["seq"] == i + 1
    assert (await api.send_pm("Rose", "Lily", "b"))["seq"] == 1
    assert (await api.send_pm("Jack", "Rose", "reply", role="patient"))["seq"] == 4


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_sends_from_both_sides_never_share_a_seq(api):
    sends = [api.send_pm("Rose", "Jack", f"d{i}") for i in range(40)]
    sends += [api.send_pm("Jack", "Rose", f"p{i}", role="patient") for i in range(40)]
    results = await asyncio.gather(*sends)
    assert sorted(m["seq"] for m in results) == list(range(1, 81))


@pytest.mark.gen_test
async def test_repeated_client_msg_id_returns_the_original(api):
    body = {"from": "Rose", "to": "Jack", "contentType": 1, "content": "once", "clientMsgId": "c-1"}
    first = await api.post("/api/v1/chats/pm", body, as_=DOCTOR)
    again = await api.post("/api/v1/chats/pm", body, as_=DOCTOR)  # another body: 409 (test_hostile_input)
    assert first.code == 201 and again.code == 200
    assert again.json == first.json
    listed = await api.get("/api/v1/chats/pm?user_id=Rose&peer=Jack", as_=DOCTOR)
    assert len(listed.json["messages"]) == 1
    # Another sender may use the same clientMsgId.
    other = await api.post("/api/v1/chats/pm", {**body, "from": "Jack", "to": "Rose"}, as_=PATIENT)
    assert other.code == 201 and other.json["seq"] == 2


@pytest.mark.gen_test
async def test_concurrent_retries_store_one_message(api):
    body = {"from": "Rose", "to": "Jack", "contentType": 1, "content": "x", "clientMsgId": "race"}
    responses = await asyncio.gather(*[api.post("/api/v1/chats/pm", body, as_=DOCTOR) for _ in range(8)])
    assert sorted(r.code for r in responses) == [200] * 7 + [201]
    assert len({r.json["id"] for r in responses}) == 1


@pytest.mark.gen_test
async def test_chinese_and_emoji_round_trip_byte_for_byte(api):
    text = "医生您好，我头疼 🤒🩺 — ‘quotes’ \u200d👩‍⚕️"
    sent = await api.send_pm("Jack", "Rose", text, role="patient")
    assert sent["content"] == text
    listed = await api.get("/api/v1/chats/pm?user_id=Rose&peer=Jack", as_=DOCTOR)
    assert listed.json["messages"][0]["content"] == text
    assert text.encode() in listed.body


@pytest.mark.gen_test
async def test_group_message_for_members_only(api):
    await make_group(api)
    body = {
        "from": "Rose",
        "group": "care-1",
        "groupType": "1",
        "at": "Jack",
        "contentType": 1,
        "content": "Morning round",
    }
    response = await api.post("/api/v1/chats/gm", body, as_=DOCTOR)
    assert response.code == 201, response.body
    assert response.json["groupType"] == 1 and response.json["at"] == ["Jack"]
    stranger = await api.post("/api/v1/chats/gm", {**body, "from": "Eve"}, as_=("Eve", "doctor"))
    assert_error(stranger, 403, "not_a_member")
    assert_error(await api.get("/api/v1/chats/gm?group=care-1", as_=("Eve", "patient")), 403)
    listed = await api.get("/api/v1/chats/gm?group=care-1", as_=("Lily", "patient"))
    assert [m["content"] for m in listed.json["messages"]][-1] == "Morning round"
    wrong_type = await api.post("/api/v1/chats/gm", {**body, "groupType": 7}, as_=DOCTOR)
    assert_error(wrong_type, 400, field="groupType")
    assert_error(await api.post("/api/v1/chats/gm", {**body, "group": "nope"}, as_=DOCTOR), 404)


@pytest.mark.gen_test
async def test_only_the_token_user_sends_and_reads_its_conversations(api):
    impostor = await api.post(
        "/api/v1/chats/pm", {"from": "Rose", "to": "Jack", "contentType": 1, "content": "x"}, as_=("Mallory", "doctor")
    )
    assert_error(impostor, 403, "forbidden", field="from")
    await api.send_pm("Rose", "Jack", "private")
    assert_error(await api.get("/api/v1/chats/pm?user_id=Jack", as_=("Mallory", "patient")), 403)
    assert_error(await api.get("/api/v1/conversations?user_id=Jack", as_=("Mallory", "patient")), 403)
    read = {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 1}
    assert_error(await api.post("/api/v1/conversations/read", read, as_=("Mallory", "patient")), 403)
    # The platform back end acts for users.
    on_behalf = await api.post(
        "/api/v1/chats/pm", {"from": "Rose", "to": "Jack", "contentType": 1, "content": "via service"}, as_=SERVICE
    )
    assert on_behalf.code == 201 and on_behalf.json["from"] == "Rose"
    assert (await api.get("/api/v1/chats/pm?user_id=Jack", as_=SERVICE)).code == 200


@pytest.mark.gen_test
async def test_unauthenticated_calls_get_401(api):
    assert_error(await api.get("/api/v1/chats/pm?user_id=Jack"), 401, "unauthenticated")
    bad = await api.get("/api/v1/chats/pm?user_id=Jack", headers={"Authorization": "Bearer not.a.jwt"})
    assert_error(bad, 401, "unauthenticated")


@pytest.mark.gen_test
async def test_paging_after_before_and_cursor(api):
    for i in range(1, 8):
        await api.send_pm("Rose", "Jack", f"m{i}")
    base = "/api/v1/chats/pm?user_id=Jack&peer=Rose"
    first = (await api.get(base + "&limit=3", as_=PATIENT)).json
    assert [m["seq"] for m in first["messages"]] == [1, 2, 3] and first["next"]
    second = (await api.get(base + f"&limit=3&cursor={first['next']}", as_=PATIENT)).json
    assert [m["seq"] for m in second["messages"]] == [4, 5, 6]
    third = (await api.get(base + f"&limit=3&cursor={second['next']}", as_=PATIENT)).json
    assert [m["seq"] for m in third["messages"]] == [7] and third["next"] is None
    after = (await api.get(base + "&after=5", as_=PATIENT)).json
    assert [m["seq"] for m in after["messages"]] == [6, 7]
    before = (await api.get(base + "&before=6&limit=2", as_=PATIENT)).json
    assert [m["seq"] for m in before["messages"]] == [4, 5]  # just below 6, oldest first
    older = (await api.get(base + f"&limit=2&cursor={before['next']}", as_=PATIENT)).json
    assert [m["seq"] for m in older["messages"]] == [2, 3]
    window = (await api.get(base + "&after=2&before=5", as_=PATIENT)).json
    assert [m["seq"] for m in window["messages"]] == [3, 4]


@pytest.mark.gen_test
async def test_listing_all_pm_conversations_oldest_first(api):
    await api.send_pm("Rose", "Jack", "1")
    await api.send_pm("Lily", "Jack", "2")
    await api.send_pm("Rose", "Jack", "3")
    await api.send_pm("Rose", "Lily", "not Jack's")
    page = (await api.get("/api/v1/chats/pm?user_id=Jack&limit=2", as_=PATIENT)).json
    rest = (await api.get(f"/api/v1/chats/pm?user_id=Jack&cursor={page['next']}", as_=PATIENT)).json
    assert [m["content"] for m in page["messages"] + rest["messages"]] == ["1", "2", "3"]
    assert rest["next"] is None
    assert_error(await api.get("/api/v1/chats/pm?user_id=Jack&after=1", as_=PATIENT), 400, field="after")


@pytest.mark.gen_test
async def test_limit_is_capped_and_validated(api):
    for i in range(3):
        await api.send_pm("Rose", "Jack", str(i))
    big = await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose&limit=100000", as_=PATIENT)
    assert big.code == 200 and len(big.json["messages"]) == 3
    for bad in ("0", "-1", "abc", "1.5"):
        assert_error(await api.get(f"/api/v1/chats/pm?user_id=Jack&limit={bad}", as_=PATIENT), 400, field="limit")
    assert_error(await api.get("/api/v1/chats/pm?user_id=Jack&cursor=zzz", as_=PATIENT), 400, field="cursor")


@pytest.mark.gen_test
async def test_conversations_with_unread_and_read_marker(api):
    await api.send_pm("Rose", "Jack", "one")
    await api.send_pm("Rose", "Jack", "two")
    await api.send_pm("Jack", "Rose", "mine", role="patient")
    await make_group(api, members=("Rose", "Jack"))
    await api.post(
        "/api/v1/chats/gm", {"from": "Rose", "group": "care-1", "contentType": 1, "content": "hi all"}, as_=DOCTOR
    )
    await api.post(
        "/api/v1/chats/sm",
        {"to": "Jack", "title": "t", "summary": "s", "contentType": 1, "content": "Your appointment"},
        as_=SERVICE,
    )
    listed = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"]
    by_channel = {c["channel"]: c for c in listed}
    assert set(by_channel) == {"pm", "gm", "sm"}
    pm = by_channel["pm"]
    assert pm["peer"] == "Rose" and pm["unread"] == 2 and pm["readSeq"] == 0
    assert pm["lastMessage"]["content"] == "mine"
    # The group.created notice and Rose's message.
    assert by_channel["gm"]["group"] == "care-1" and by_channel["gm"]["unread"] == 2
    assert by_channel["sm"]["unread"] == 1
    assert listed[0]["channel"] == "sm"  # newest activity first

    marked = await api.post(
        "/api/v1/conversations/read", {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 1}, as_=PATIENT
    )
    assert marked.code == 200 and marked.json["readSeq"] == 1
    pm = next(
        c
        for c in (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"]
        if c["channel"] == "pm"
    )
    assert pm["unread"] == 1 and pm["readSeq"] == 1 and pm["receivedSeq"] == 1
    # A marker never goes back and never passes the newest message.
    await api.post(
        "/api/v1/conversations/read", {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 0}, as_=PATIENT
    )
    far = await api.post(
        "/api/v1/conversations/read", {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 999}, as_=PATIENT
    )
    assert far.json["readSeq"] == 3


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body, field",
    [
        ({"to": "Jack", "contentType": 1}, "content"),
        ({"to": "Jack", "contentType": 1, "content": ""}, "content"),
        ({"to": "Jack", "contentType": 1, "content": "   "}, "content"),
        ({"to": "Jack", "contentType": 1, "content": 5}, "content"),
        ({"to": "Jack", "contentType": 5, "content": "x"}, "contentType"),
        ({"to": "Jack", "contentType": "x", "content": "x"}, "contentType"),
        ({"to": "Jack", "contentType": True, "content": "x"}, "contentType"),
        ({"to": "Jack", "content": "x"}, "contentType"),
        ({"to": "Jack", "contentType": 4, "content": "javascript:alert(1)"}, "content"),
        ({"to": "Jack", "contentType": 2, "content": "not a url"}, "content"),
        ({"contentType": 1, "content": "x"}, "to"),
        ({"to": {"$gt": ""}, "contentType": 1, "content": "x"}, "to"),
        ({"to": "$where", "contentType": 1, "content": "x"}, "to"),
        ({"to": 42, "contentType": 1, "content": "x"}, "to"),
        ({"to": ["Jack"], "contentType": 1, "content": "x"}, "to"),
        ({"to": "x" * 129, "contentType": 1, "content": "x"}, "to"),
        ({"to": "", "contentType": 1, "content": "x"}, "to"),
        ({"to": "Rose", "contentType": 1, "content": "x"}, "to"),
        ({"to": "Jack", "contentType": 1, "content": "x", "clientMsgId": 7}, "clientMsgId"),
        ({"to": "Jack", "contentType": 1, "content": "x" * 8001}, "content"),
    ],
)
async def test_bad_pm_input_is_a_400_naming_the_field(api, body, field):
    response = await api.post("/api/v1/chats/pm", {"from": "Rose", **body}, as_=DOCTOR)
    assert_error(response, 400, field=field)
    listed = await api.get("/api/v1/chats/pm?user_id=Rose", as_=DOCTOR)
    assert listed.json["messages"] == []  # nothing half-written


@pytest.mark.gen_test
async def test_bad_bodies_and_queries(api):
    for raw in (b"not json", b"[1,2]", b'"string"', b"\xff\xfe"):
        response = await api.post("/api/v1/chats/pm", raw_body=raw, as_=DOCTOR)
        assert_error(response, 400, "invalid_body")
    huge = await api.post("/api/v1/chats/pm", raw_body=b'{"content":"' + b"x" * 70000 + b'"}', as_=DOCTOR)
    assert_error(huge, 413, "too_large")
    assert_error(await api.get("/api/v1/chats/pm?user_id[$ne]=x", as_=DOCTOR), 400, field="user_id")
    assert_error(await api.get("/api/v1/chats/pm?user_id=%24gt", as_=SERVICE), 400, field="user_id")
    assert_error(await api.get("/api/v1/chats/gm", as_=DOCTOR), 400, field="group")
    assert_error(await api.get("/api/v1/chats/pm?user_id=a&user_id=b", as_=SERVICE), 400, field="user_id")
    assert_error(await api.get("/api/v1/nowhere"), 404, "not_found")
    assert_error(await api.request("DELETE", "/api/v1/chats/pm", as_=DOCTOR), 405)


@pytest.mark.gen_test
async def test_hyperlink_and_media_urls_are_accepted(api):
    for content_type, content in (
        (4, "https://clinic.example/advice"),
        (2, "https://cdn.example/x.png"),
        (3, "http://cdn.example/v.amr"),
    ):
        response = await api.post(
            "/api/v1/chats/pm",
            {"from": "Rose", "to": "Jack", "contentType": content_type, "content": content},
            as_=DOCTOR,
        )
        assert response.code == 201 and response.json["contentType"] == content_type


def _at_offset(iso_utc: str, hours: int) -> str:
    """The same instant written with another UTC offset (+08:00 for China)."""
    import datetime

    moment = datetime.datetime.fromisoformat(iso_utc.replace("Z", "+00:00"))
    return moment.astimezone(datetime.timezone(datetime.timedelta(hours=hours))).isoformat()


@pytest.mark.gen_test
async def test_messages_by_time_since_inclusive_until_exclusive(api):
    from urllib.parse import quote

    sent = [await api.send_pm("Rose", "Jack", f"t{i}") for i in range(4)]
    await api.send_pm("Rose", "Lily", "other conversation")
    since, until = sent[1]["createdAt"], sent[3]["createdAt"]
    expected = [m["seq"] for m in sent if since <= m["createdAt"] < until]
    assert 1 in [s - 1 for s in expected]  # sent[1] itself: since is inclusive
    for since_text, until_text in ((since, until), (_at_offset(since, 8), _at_offset(until, -5))):
        base = f"/api/v1/chats/pm?user_id=Jack&peer=Rose&since={quote(since_text)}&until={quote(until_text)}"
        page = (await api.get(base, as_=PATIENT)).json
        assert [m["seq"] for m in page["messages"]] == expected
    # An unencoded "+08:00" arrives as " 08:00": still understood.
    raw = (await api.get(f"/api/v1/chats/pm?user_id=Jack&peer=Rose&since={_at_offset(since, 8)}", as_=PATIENT)).json
    assert [m["seq"] for m in raw["messages"]] == [m["seq"] for m in sent if m["createdAt"] >= since]
    # Across all of Jack's pm conversations, and beside seq bounds.
    across = (await api.get(f"/api/v1/chats/pm?user_id=Jack&until={quote(until)}", as_=PATIENT)).json
    assert [m["content"] for m in across["messages"]] == [m["content"] for m in sent if m["createdAt"] < until]
    both = (await api.get(f"/api/v1/chats/pm?user_id=Jack&peer=Rose&after=2&since={quote(since)}", as_=PATIENT)).json
    assert [m["seq"] for m in both["messages"]] == [m["seq"] for m in sent if m["seq"] > 2 and m["createdAt"] >= since]
    gm_since = await api.get(f"/api/v1/chats/sm?user_id=Jack&since={quote(since)}", as_=PATIENT)
    assert gm_since.code == 200 and gm_since.json["messages"] == []


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2026-11-28",
        "2026-11-28T06:00:00",
        "2026-13-01T00:00:00Z",
        "2026-11-28T06:00:00+25:00",
        "9999-12-31T23:59:59-10:00",
        "1" * 100,
        "",
    ],
)
async def test_malformed_time_bound_is_a_400_naming_the_field(api, value):
    from urllib.parse import quote

    for field in ("since", "until"):
        response = await api.get(f"/api/v1/chats/pm?user_id=Jack&peer=Rose&{field}={quote(value)}", as_=PATIENT)
        assert_error(response, 400, "invalid_field", field=field)


@pytest.mark.gen_test(timeout=30)
async def test_a_summary_already_past_a_message_still_learns_its_senders_own_seq(services):
    """Another process stored seq 2 first: seq 1's summary update loses (the summary is newer),
    yet Rose's own seq must be kept, or her unread would count her own message."""
    from models.clock import utcnow
    from models.conversations import ConversationRef

    ref = ConversationRef.pm("Jack", "Rose")
    side = "AB"[ref.parties().index("Rose")]
    newer = {"_id": "m2", "from": "Jack", "to": "Rose", "seq": 2, "createdAt": utcnow()}
    older = {"_id": "m1", "from": "Rose", "to": "Jack", "seq": 1, "createdAt": utcnow()}
    await services.conversations.record_message(ref, newer, None)
    await services.conversations.record_message(ref, older, None)
    summary = await services.conversations.get_summary(ref)
    assert summary["lastSeq"] == 2 and summary["lastMessage"]["_id"] == "m2"
    assert summary[f"own{side}"] == [1]
    await services.conversations.record_message(ref, older, None)  # a repeat changes nothing
    assert (await services.conversations.get_summary(ref))[f"own{side}"] == [1]


async def unread_of(api, user: str, role: str) -> dict[str, int]:
    listed = (await api.get(f"/api/v1/conversations?user_id={user}", as_=(user, role))).json["conversations"]
    return {c.get("peer") or c.get("group"): c["unread"] for c in listed}


async def mark_read(api, user: str, role: str, seq: int, **where: str) -> None:
    response = await api.post("/api/v1/conversations/read", {"user_id": user, "seq": seq, **where}, as_=(user, role))
    assert response.code == 200, response.body


@pytest.mark.gen_test(timeout=120)
async def test_a_party_that_sends_for_long_without_reading_keeps_a_bounded_summary_and_exact_unread(api, services):
    """The summary every send rewrites keeps only the latest OWN_SEQS_KEPT own seqs; once older
    ones are dropped, unread is counted from the messages and stays exact."""
    from models.conversations import OWN_SEQS_KEPT, ConversationRef

    many = OWN_SEQS_KEPT + 20
    for i in range(3):
        await api.send_pm("Jack", "Rose", f"question {i}", role="patient")  # seqs 1-3
    for i in range(many):
        await api.send_pm("Rose", "Jack", f"advice {i}")  # seqs 4 .. many + 3
    for i in range(2):
        await api.send_pm("Jack", "Rose", f"thanks {i}", role="patient")
    last = many + 5
    ref = ConversationRef.pm("Jack", "Rose")
    summary = await services.conversations.get_summary(ref)
    rose_side = "AB"[ref.parties().index("Rose")]
    assert summary["lastSeq"] == last
    assert summary[f"own{rose_side}"] == list(range(last - 2 - OWN_SEQS_KEPT + 1, last - 1))
    assert (await unread_of(api, "Rose", "doctor"))["Jack"] == 5
    assert (await unread_of(api, "Jack", "patient"))["Rose"] == many
    await mark_read(api, "Rose", "doctor", 10, channel="pm", peer="Jack")  # the array is still full
    assert (await unread_of(api, "Rose", "doctor"))["Jack"] == 2
    await mark_read(api, "Rose", "doctor", 60, channel="pm", peer="Jack")  # no longer full
    assert len((await services.conversations.get_summary(ref))[f"own{rose_side}"]) < OWN_SEQS_KEPT
    assert (await unread_of(api, "Rose", "doctor"))["Jack"] == 2

    await make_group(api, "care-long", members=("Rose", "Jack"))
    for i in range(many):
        response = await api.post(
            "/api/v1/chats/gm", {"from": "Rose", "group": "care-long", "contentType": 1, "content": f"n{i}"}, as_=DOCTOR
        )
        assert response.code == 201, response.body
    response = await api.post(
        "/api/v1/chats/gm", {"from": "Jack", "group": "care-long", "contentType": 1, "content": "ok"}, as_=PATIENT
    )
    assert response.code == 201, response.body
    cursor = await services.db.cursors.find_one({"user": "Rose", "channel": "gm", "conv": "care-long"})
    assert cursor is not None and len(cursor["own"]) == OWN_SEQS_KEPT
    group_last = (await services.conversations.get_summary(ConversationRef.gm("care-long")))["lastSeq"]
    notices = group_last - many - 1  # the group's own system messages (created, members)
    assert (await unread_of(api, "Rose", "doctor"))["care-long"] == notices + 1
    assert (await unread_of(api, "Jack", "patient"))["care-long"] == notices + many
