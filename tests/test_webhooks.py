"""Webhooks (SPEC §11): signed events from a durable outbox, to a real HTTP receiver on a free port."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import uuid
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.tcpserver import TCPServer

from server.config import ConfigError, load_settings
from tests.helpers import TEARDOWN_TIMEOUT_SECS, assert_error, make_group, wait_until
from tests.processes import free_port

SECRET = "whsec-0123456789abcdef"


def verify(secret: str, header: str, body: bytes) -> bool:
    """What a receiver does (the README's example): recompute HMAC-SHA256 over "<t>.<body>"."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


class Receiver:
    """A real HTTP receiver; `mode` decides the answer: ok, fail, redirect, hang."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.mode = "ok"
        self.arrived = asyncio.Event()
        receiver = self

        class Hook(tornado.web.RequestHandler):
            async def post(self) -> None:
                receiver.received.append((dict(self.request.headers), self.request.body))
                receiver.arrived.set()
                if receiver.mode == "fail":
                    self.set_status(500)
                elif receiver.mode == "redirect":
                    self.redirect("http://127.0.0.1:1/elsewhere")
                elif receiver.mode == "hang":
                    await asyncio.sleep(5)

        self.server = HTTPServer(tornado.web.Application([(r"/hook", Hook)]))
        self.server.listen(self.port, "127.0.0.1")

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(body) for _headers, body in self.received]
        return [e for e in out if type_ is None or e["type"] == type_]


class GarbageServer(TCPServer):
    """Answers every connection with bytes that are not HTTP, then closes."""

    async def handle_stream(self, stream: Any, address: Any) -> None:
        await stream.write(b"\x00\xffthis is not http\r\n\r\n")
        stream.close()


@pytest.fixture
def receiver(io_loop):
    made = Receiver()
    yield made
    made.server.stop()


@pytest.fixture
def webhook_options() -> dict[str, Any]:
    return {}


@pytest.fixture
def settings(mongo, receiver, webhook_options):
    base = load_settings({"IM_PROFILE": "test", "IM_MONGO_URI": mongo.uri, "IM_DB_NAME": f"t_{uuid.uuid4().hex[:12]}"})
    push = webhook_options.pop("push", {})
    reminders = webhook_options.pop("reminders", {})
    return dataclasses.replace(
        base,
        webhooks=dataclasses.replace(base.webhooks, url=receiver.url, secret=SECRET, **webhook_options),
        push=dataclasses.replace(base.push, **push),
        reminders=dataclasses.replace(base.reminders, **reminders),
    )


@pytest.fixture
def dispatcher(services, io_loop):
    assert services.webhooks is not None

    async def start() -> None:
        await services.webhooks.ensure_indexes()
        services.webhooks.start()

    io_loop.run_sync(start)
    yield services.webhooks
    io_loop.run_sync(services.webhooks.stop, timeout=TEARDOWN_TIMEOUT_SECS)


async def send_pm_over_rest(http_client: Any, base_url: str, token: str, to: str, content: str) -> str:
    """Rose's pm to a server process of its own; the stored message's id."""
    response = await http_client.fetch(
        f"{base_url}/api/v1/chats/pm",
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=json.dumps({"from": "Rose", "to": to, "contentType": 1, "content": content}),
    )
    return str(json.loads(response.body)["id"])


async def wait_for_event(receiver: Receiver, type_: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
    await wait_until(lambda: len(receiver.events(type_)) >= count, timeout=timeout, message=f"{type_} not received")
    return receiver.events(type_)


@pytest.mark.gen_test(timeout=30)
async def test_message_created_is_signed_and_a_tampered_body_fails(api, receiver, dispatcher):
    sent = await api.send_pm("Rose", "Jack", "take two tablets")
    [event] = await wait_for_event(receiver, "message.created")
    headers, body = next((h, b) for h, b in receiver.received if json.loads(b)["type"] == "message.created")
    assert set(event) == {"id", "type", "createdAt", "data"}
    assert event["data"]["message"] == sent
    assert headers["X-Im-Event-Id"] == event["id"] and headers["X-Im-Event-Type"] == "message.created"
    assert headers["X-Im-Attempt"] == "1" and headers["Content-Type"] == "application/json"
    assert verify(SECRET, headers["X-Im-Signature"], body)
    assert not verify(SECRET, headers["X-Im-Signature"], body.replace(b"two", b"ten"))
    assert not verify("another-secret-0123456789", headers["X-Im-Signature"], body)


@pytest.mark.gen_test(timeout=30)
async def test_message_created_is_stored_in_its_message_and_listed(api, services, receiver, dispatcher):
    """No second document per send: the message carries its event's state (models/outbox.py);
    Jack is connected (no push to plan), so the outbox holds nothing for it at all."""
    jack = await api.ws("Jack")
    try:
        sent = await api.send_pm("Rose", "Jack", "one document per send")
        await wait_for_event(receiver, "message.created")
        assert (await jack.recv_type("message"))["message"]["id"] == sent["id"]
    finally:
        jack.close()
    assert await services.db.webhook_events.count_documents({"type": "message.created"}) == 0
    # The delivery writes nothing to the message: the process's progress document settles it.
    stored = await services.db.pm.find_one({"_id": sent["id"]})
    assert stored["hook"] == "sent" and stored["hookClaim"] == dispatcher.claim_token
    assert stored["hookAttempts"] == 1 and "hookError" not in stored

    async def settled() -> bool:
        progress = await services.db.webhook_progress.find_one({"_id": dispatcher.claim_token})
        return progress is not None and progress["state"] == "open" and progress["below"] > stored["hookDue"]

    await wait_until(settled, timeout=10, message="delivery not settled in the progress document")
    assert (await services.db.pm.find_one({"_id": sent["id"]}))["hook"] == "sent"
    listed = (await api.get("/api/v1/webhooks/events?status=delivered", as_=("ops", "admin"))).json["events"]
    assert [e for e in listed if e["id"] == sent["id"]] == [
        {
            "id": sent["id"],
            "type": "message.created",
            "status": "delivered",
            "attempts": 1,
            "lastError": None,
            "nextAttemptAt": None,
            "createdAt": sent["createdAt"],
        }
    ]
    history = (await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose", as_=("Jack", "patient"))).json
    assert all(not key.startswith("hook") for message in history["messages"] for key in message)


@pytest.mark.gen_test(timeout=30)
async def test_read_consultation_and_group_events(api, receiver, dispatcher):
    await api.send_pm("Rose", "Jack", "hi")
    read = await api.post(
        "/api/v1/conversations/read",
        {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 1},
        as_=("Jack", "patient"),
    )
    assert read.code == 200, read.body
    [event] = await wait_for_event(receiver, "message.read")
    assert event["data"]["user"] == "Jack" and event["data"]["peer"] == "Rose" and event["data"]["seq"] == 1
    started = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=("Rose", "doctor"))
    assert started.code in (200, 201), started.body
    [consultation] = await wait_for_event(receiver, "consultation.started")
    assert consultation["data"]["consultation"]["id"] == started.json["id"]
    await make_group(api, "Rose", ["Jack", "Lily"])
    [group] = await wait_for_event(receiver, "group.created")
    assert group["data"]["by"] == "platform" and "Jack" in group["data"]["members"]
    # Event messages are messages: message.created for each.
    created = await wait_for_event(receiver, "message.created", 3)
    assert {e["data"]["message"].get("event") for e in created} >= {"consultation.started", "group.created"}


@pytest.mark.parametrize("webhook_options", [{"include_content": False, "events": ["message.created"]}])
@pytest.mark.gen_test(timeout=30)
async def test_include_content_false_and_events_filter(api, receiver, dispatcher):
    await api.post(
        "/api/v1/chats/sm",
        {"to": "Jack", "title": "Lab result", "summary": "HbA1c", "contentType": 1, "content": "6.1 %"},
        as_=("platform", "service"),
    )
    await api.send_pm("Rose", "Jack", "secret diagnosis")
    await api.post(
        "/api/v1/conversations/read",
        {"user_id": "Jack", "channel": "pm", "peer": "Rose", "seq": 1},
        as_=("Jack", "patient"),
    )
    events = await wait_for_event(receiver, "message.created", 2)
    await asyncio.sleep(0.5)
    assert {e["type"] for e in receiver.events()} == {"message.created"}  # message.read filtered out
    raw = b"".join(body for _h, body in receiver.received)
    for text in (b"Lab result", b"HbA1c", b"6.1 %", b"secret diagnosis"):
        assert text not in raw
    assert all("content" not in e["data"]["message"] and "title" not in e["data"]["message"] for e in events)


@pytest.mark.gen_test(timeout=30)
async def test_a_failing_receiver_is_retried_with_the_same_id_and_backoff(api, receiver, dispatcher):
    receiver.mode = "fail"
    await api.send_pm("Rose", "Jack")
    await wait_until(lambda: len(receiver.received) >= 2, timeout=10, message="no retry")
    receiver.mode = "ok"
    await wait_until(lambda: len(receiver.received) >= 3, timeout=10, message="no third attempt")
    attempts = [h["X-Im-Attempt"] for h, _b in receiver.received]
    ids = {h["X-Im-Event-Id"] for h, _b in receiver.received}
    assert attempts[:3] == ["1", "2", "3"] and len(ids) == 1
    listed = await api.get("/api/v1/webhooks/events?status=delivered", as_=("ops", "admin"))
    assert listed.code == 200 and listed.json["events"][0]["attempts"] == 3


@pytest.mark.parametrize("webhook_options", [{"max_age_hours": 0.0005, "timeout_secs": 0.5}])
@pytest.mark.parametrize("mode", ["fail", "redirect", "hang", "garbage", "refused"])
@pytest.mark.gen_test(timeout=40)
async def test_bad_receivers_fail_attempts_then_the_event_and_admin_retry_queues_it(
    api, receiver, dispatcher, services, mode
):
    garbage: GarbageServer | None = None
    if mode in ("garbage", "refused"):
        receiver.server.stop()
        if mode == "garbage":
            garbage = GarbageServer()
            garbage.listen(receiver.port, "127.0.0.1")
    else:
        receiver.mode = mode
    try:
        await api.send_pm("Rose", "Jack")

        async def failed() -> list[dict[str, Any]]:
            page = await api.get("/api/v1/webhooks/events?status=failed", as_=("ops", "admin"))
            return page.json["events"]  # type: ignore[no-any-return]

        found: list[dict[str, Any]] = []
        for _ in range(100):
            found = await failed()
            if found:
                break
            await asyncio.sleep(0.2)
        [event] = found
        assert event["type"] == "message.created" and event["attempts"] >= 1 and event["lastError"]
        assert event["nextAttemptAt"] is None
    finally:
        if garbage is not None:
            garbage.stop()
    retried = await api.post(f"/api/v1/webhooks/events/{event['id']}/retry", as_=("ops", "admin"))
    assert retried.code == 200 and retried.json["status"] == "pending" and retried.json["attempts"] == 0
    again = await api.post(f"/api/v1/webhooks/events/{event['id']}/retry", as_=("ops", "admin"))
    assert again.code in (200, 409)  # still pending (409) unless it already failed again


@pytest.mark.gen_test(timeout=30)
async def test_admin_api_is_admin_only_and_checks_its_input(api, dispatcher):
    assert_error(await api.get("/api/v1/webhooks/events", as_=("Rose", "doctor")), 403)
    assert_error(await api.get("/api/v1/webhooks/events"), 401)
    assert_error(await api.get("/api/v1/webhooks/events?status=lost", as_=("ops", "admin")), 400, field="status")
    assert_error(await api.get("/api/v1/webhooks/events?cursor=$x", as_=("ops", "admin")), 400, field="cursor")
    assert_error(await api.post("/api/v1/webhooks/events/0123456789abcdef01234567/retry", as_=("ops", "admin")), 404)
    await api.send_pm("Rose", "Jack")
    for _ in range(50):
        page = (await api.get("/api/v1/webhooks/events?status=delivered&limit=1", as_=("ops", "admin"))).json
        if page["events"]:
            break
        await asyncio.sleep(0.1)
    assert set(page["events"][0]) == {"id", "type", "status", "attempts", "lastError", "nextAttemptAt", "createdAt"}
    delivered = page["events"][0]["id"]
    assert_error(await api.post(f"/api/v1/webhooks/events/{delivered}/retry", as_=("ops", "admin")), 409)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IM_WEBHOOKS_URL": "ftp://example.org/hook"}, "IM_WEBHOOKS_URL"),
        ({"IM_WEBHOOKS_URL": "http://example.org/hook", "IM_WEBHOOKS_SECRET": "short"}, "IM_WEBHOOKS_SECRET"),
        (
            {"IM_PROFILE": "prod", "IM_AUTH_SECRET": "p" * 32, "IM_WEBHOOKS_URL": "https://example.org/hook"},
            "IM_WEBHOOKS_SECRET",
        ),
        ({"IM_PUSH_URL": "mailto:x"}, "IM_PUSH_URL"),
        ({"IM_PUSH_COALESCE_SECS": "-1"}, "IM_PUSH_COALESCE_SECS"),
    ],
)
def test_bad_webhook_configuration_stops_start_up_naming_the_setting(env, named):
    with pytest.raises(ConfigError) as raised:
        load_settings({"IM_PROFILE": "test", **env})
    assert named in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.gen_test(timeout=120)
async def test_receiver_down_and_kill_9_lose_no_event(mongo, tmp_path, http_client):
    """200 sends while the receiver is down, kill -9, restart, receiver up: every message.created arrives."""
    from server.auth import mint_token
    from tests.processes import ServerProcess

    port = free_port()
    hook_port = free_port()
    env = {
        "IM_WEBHOOKS_URL": f"http://127.0.0.1:{hook_port}/hook",
        "IM_WEBHOOKS_SECRET": SECRET,
        "IM_WEBHOOKS_RETRY_MAX_SECS": "2",
        "IM_PUSH_URL": f"http://127.0.0.1:{hook_port}/push",  # push.needed elsewhere: not counted here
    }
    process = ServerProcess(port, mongo.uri, f"k_{uuid.uuid4().hex[:10]}", tmp_path / "server.log", **env)
    await asyncio.get_running_loop().run_in_executor(None, process.start)
    token = mint_token("test-secret-0123456789abcdef0123456789", "Rose", "doctor")
    sent: set[str] = set()
    try:

        async def send(i: int) -> None:
            sent.add(await send_pm_over_rest(http_client, process.base_url, token, f"p{i % 20}", f"m{i}"))

        for start in range(0, 200, 20):
            await asyncio.gather(*(send(i) for i in range(start, start + 20)))
        process.kill()
        await asyncio.get_running_loop().run_in_executor(None, process.start)
        made = Receiver()  # the receiver comes up only now, on the port the server was told
        made.server.stop()
        made.server = HTTPServer(made.server.request_callback)
        made.server.listen(hook_port, "127.0.0.1")

        def got() -> set[str]:
            return {e["data"]["message"]["id"] for e in made.events("message.created")}

        await wait_until(lambda: got() >= sent, timeout=60, message="message.created events missing")
        assert len(sent) == 200 and not sent - got()
        made.server.stop()
    finally:
        process.stop()


@pytest.mark.gen_test(timeout=150)
async def test_events_in_flight_at_kill_9_are_taken_over_by_the_next_process(mongo, tmp_path, http_client):
    """A delivery writes nothing per message (its process's progress document settles it), so
    what settles the events a process was delivering when it died: the next process, once the
    dead one's heartbeat is stale, releases them and delivers every one (again, for those the
    receiver got but the dead process never settled)."""
    from server.auth import mint_token
    from tests.processes import ServerProcess

    receiver = Receiver()
    receiver.mode = "hang"  # every attempt is in flight when the process dies
    env = {"IM_WEBHOOKS_URL": receiver.url, "IM_WEBHOOKS_SECRET": SECRET, "IM_WEBHOOKS_EVENTS": '["message.created"]'}
    db_name = f"k_{uuid.uuid4().hex[:10]}"
    first = ServerProcess(free_port(), mongo.uri, db_name, tmp_path / "first.log", **env)
    second = ServerProcess(free_port(), mongo.uri, db_name, tmp_path / "second.log", **env)
    await asyncio.get_running_loop().run_in_executor(None, first.start)
    token = mint_token("test-secret-0123456789abcdef0123456789", "Rose", "doctor")
    try:
        sent = set(
            await asyncio.gather(
                *(send_pm_over_rest(http_client, first.base_url, token, f"p{i}", f"m{i}") for i in range(20))
            )
        )
        await wait_until(lambda: len(receiver.received) >= 20, timeout=10, message="attempts not in flight")
        first.kill()
        receiver.mode = "ok"
        await asyncio.get_running_loop().run_in_executor(None, second.start)

        def got() -> set[str]:
            return {e["data"]["message"]["id"] for e in receiver.events("message.created")[20:]}

        await wait_until(lambda: got() >= sent, timeout=90, message="events of the killed process not taken over")
        assert len(sent) == 20
    finally:
        second.stop()
        first.stop()
        receiver.server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_an_event_in_flight_is_listed_pending_then_delivered(api, services, receiver, dispatcher):
    receiver.mode = "hang"  # answers after 5 s, inside the timeout
    jack = await api.ws("Jack")  # online: no push.needed in the outbox, only the message's own event
    sent = await api.send_pm("Rose", "Jack", "in flight")
    await wait_for_event(receiver, "message.created")
    jack.close()

    async def listed(status: str) -> list[str]:
        page = await api.get(f"/api/v1/webhooks/events?status={status}", as_=("ops", "admin"))
        return [e["id"] for e in page.json["events"]]

    assert sent["id"] in await listed("pending") and sent["id"] not in await listed("delivered")
    metrics = (await api.get("/metrics", as_=("ops", "admin"))).body.decode()
    assert 'im_webhook_events{status="pending"} 1.0' in metrics

    async def delivered() -> bool:
        return sent["id"] in await listed("delivered")

    await wait_until(delivered, timeout=15, message="the delivered event is not listed as delivered")
    assert sent["id"] in await listed("delivered") and sent["id"] not in await listed("pending")
    assert (await services.db.pm.find_one({"_id": sent["id"]}))["hook"] == "sent"  # no write per delivery
