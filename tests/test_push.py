"""push.needed and unread reminders (SPEC §12): only for the offline, never with message text."""

from __future__ import annotations

import asyncio

import pytest

from tests import test_webhooks as hooks
from tests.helpers import make_group, wait_until
from tests.test_webhooks import wait_for_event

# The webhook tests' fixtures: a real receiver, the test profile pointed at it, a running dispatcher.
receiver, settings, webhook_options, dispatcher = (
    hooks.receiver,
    hooks.settings,
    hooks.webhook_options,
    hooks.dispatcher,
)

TEXTS = ("blood pressure 180/110", "Lab result", "HbA1c summary")


@pytest.mark.parametrize("webhook_options", [{"push": {"coalesce_secs": 0.8}}])
@pytest.mark.gen_test(timeout=30)
async def test_push_needed_is_coalesced_free_of_text_and_only_for_the_offline(api, receiver, dispatcher):
    online = await api.ws("Lily")
    for text in TEXTS:
        await api.send_pm("Rose", "Jack", text)
    await api.send_pm("Rose", "Lily", TEXTS[0])
    await api.post(
        "/api/v1/chats/sm",
        {"to": "Jack", "title": TEXTS[1], "summary": TEXTS[2], "contentType": 1, "content": TEXTS[0]},
        as_=("platform", "service"),
    )
    pushes = await wait_for_event(receiver, "push.needed", 2)
    await asyncio.sleep(1.5)  # a second window would have closed by now
    pushes = receiver.events("push.needed")
    by_channel = {p["data"]["channel"]: p["data"] for p in pushes}
    assert len(pushes) == 2, pushes  # one per (user, conversation) window; none for Lily (online)
    pm = by_channel["pm"]
    assert pm["user"] == "Jack" and pm["peer"] == "Rose" and pm["seq"] == 3 and pm["unread"] == 4
    assert set(pm) == {"user", "channel", "peer", "messageId", "seq", "unread"}
    assert set(by_channel["sm"]) == {"user", "channel", "messageId", "seq", "unread"}
    raw = b"".join(body for headers, body in receiver.received if headers["X-Im-Event-Type"] == "push.needed")
    for text in TEXTS:
        assert text.encode() not in raw
    online.close()


@pytest.mark.parametrize("webhook_options", [{"push": {"coalesce_secs": 0.3}}])
@pytest.mark.gen_test(timeout=30)
async def test_group_push_says_mentioned(api, receiver, dispatcher):
    group = await make_group(api, "clinic", ["Rose", "Jack", "Lily"])
    body = {"from": "Rose", "group": group["id"], "contentType": 1, "content": "see me", "at": ["Jack"]}
    assert (await api.post("/api/v1/chats/gm", body, as_=("Rose", "doctor"))).code == 201
    await wait_until(
        lambda: (
            {p["data"]["user"] for p in receiver.events("push.needed") if p["data"].get("group")} >= {"Jack", "Lily"}
        ),
        timeout=10,
    )
    mentioned = {
        p["data"]["user"]: p["data"]["mentioned"] for p in receiver.events("push.needed") if "group" in p["data"]
    }
    assert mentioned["Jack"] is True and mentioned["Lily"] is False


@pytest.mark.parametrize("webhook_options", [{"events": ["message.unread_reminder"], "reminders": {"after_secs": 0.5}}])
@pytest.mark.gen_test(timeout=30)
async def test_one_reminder_per_unread_conversation_none_once_read(api, receiver, dispatcher):
    await api.send_pm("Rose", "Jack", "first")
    await api.send_pm("Rose", "Jack", "second")
    await api.send_pm("Jack", "Lily", "read soon", role="patient")
    read = {"user_id": "Lily", "channel": "pm", "peer": "Jack", "seq": 1}
    assert (await api.post("/api/v1/conversations/read", read, as_=("Lily", "patient"))).code == 200
    [reminder] = await wait_for_event(receiver, "message.unread_reminder")
    await asyncio.sleep(1.0)
    assert len(receiver.events("message.unread_reminder")) == 1  # not repeated, none for Lily
    data = reminder["data"]
    assert data["user"] == "Jack" and data["peer"] == "Rose" and data["seq"] == 1 and data["unreadSince"]
    assert "first" not in str(receiver.received)
    # Jack reads; a later unread message may start the next reminder.
    mark = {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 2}
    assert (await api.post("/api/v1/conversations/read", mark, as_=("Jack", "patient"))).code == 200
    await api.send_pm("Rose", "Jack", "third")
    reminders = await wait_for_event(receiver, "message.unread_reminder", 2)
    assert reminders[1]["data"]["seq"] == 3
