"""Limits: body cap (413), per-user send rate (429 / error frame), connection caps (429 at the
handshake), and a peer that stops reading is cut off (1008) without holding anyone else up.

The frame cap (1009) is tested in tests/test_websocket.py. Limits are lowered per module through the
`settings` fixture, as the test profile sets them high enough that other tests never meet them.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
from tornado.httpclient import HTTPClientError

from handlers.groups import MEMBER_LIST_BODY_BYTES
from server.auth import mint_token
from tests.helpers import DOCTOR, SERVICE, assert_error, assert_logged, make_group, wait_until
from tests.processes import ServerProcess, free_port

TEST_SECRET = "test-secret-0123456789abcdef0123456789"
RATE_PER_SEC = 2.0
BURST = 3
CONNECTIONS_PER_USER = 2
CONNECTIONS_TOTAL = 5
MAX_PENDING_WRITE_BYTES = 4 * 1024 * 1024  # server/transport.py: a socket past this is closed with 1008


@pytest.fixture
def settings(settings):
    return settings.replace(
        limits=dataclasses.replace(
            settings.limits,
            send_rate_per_sec=RATE_PER_SEC,
            send_burst=BURST,
            max_connections_per_user=CONNECTIONS_PER_USER,
            max_connections_total=CONNECTIONS_TOTAL,
        )
    )


def pm(sender: str, to: str, content: str = "hi", **extra) -> dict:
    return {"from": sender, "to": to, "contentType": 1, "content": content, **extra}


# ---- body size ------------------------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/chats/pm",
        "/api/v1/chats/gm",
        "/api/v1/chats/sm",
        "/api/v1/conversations/read",
        "/api/v1/groups",
        "/api/v1/groups/g/members",
        "/api/v1/consultations",
        "/api/v1/consultations/0123456789abcdef01234567/end",
    ],
)
async def test_json_body_over_the_cap_is_413_with_the_envelope(api, settings, path):
    limit = settings.limits.max_json_body_bytes
    if path.startswith("/api/v1/groups"):  # member lists of a full group have a larger cap
        limit = max(limit, MEMBER_LIST_BODY_BYTES)
    body = json.dumps(pm("Rose", "Jack", "x" * limit)).encode()
    response = await api.post(path, raw_body=body, as_=SERVICE, headers={"Content-Type": "application/json"})
    assert_error(response, 413, "too_large", "body")
    listed = await api.get("/api/v1/chats/pm?user_id=Rose", as_=SERVICE)
    assert listed.json["messages"] == []


@pytest.mark.gen_test
async def test_body_just_under_the_cap_is_accepted(api, settings):
    limit = settings.limits.max_json_body_bytes
    content = "y" * settings.limits.max_content_chars
    body = json.dumps(pm("Rose", "Jack", content)).encode()
    assert len(body) < limit
    response = await api.post("/api/v1/chats/pm", raw_body=body, as_=DOCTOR)
    assert response.code == 201


@pytest.mark.gen_test
async def test_deeply_nested_json_body_is_400_not_500(api):
    body = b"[" * 60_000  # fits the body cap; deeper than the JSON decoder's recursion limit
    response = await api.post("/api/v1/chats/pm", raw_body=body, as_=SERVICE)
    assert_error(response, 400, "invalid_body", "body")


def test_json_body_over_the_upload_cap_is_413_too(mongo, tmp_path):
    server = ServerProcess(free_port(), mongo.uri, f"l_{uuid.uuid4().hex[:10]}", tmp_path / "server.log")
    server.start()
    try:
        token = mint_token(TEST_SECRET, "Rose", "doctor")
        body = json.dumps(pm("Rose", "Jack", "x" * 3_000_000)).encode()  # over 2 MiB + 64 KiB (test)
        request = urllib.request.Request(
            server.base_url + "/api/v1/chats/pm", data=body, headers={"Authorization": f"Bearer {token}"}
        )
        try:
            urllib.request.urlopen(request, timeout=10)
            status, answer = 200, b""
        except urllib.error.HTTPError as error:
            status = error.code
            try:
                answer = error.read()
            except OSError:
                answer = b""
            finally:
                error.close()
        except OSError:
            status, answer = 0, b""
        assert status == 413 and json.loads(answer)["error"]["code"] == "too_large"
    finally:
        server.stop()


# ---- per-user send rate ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_rest_sends_over_the_rate_get_429_and_store_nothing(api):
    codes = []
    for i in range(BURST + 2):
        response = await api.post("/api/v1/chats/pm", pm("Rose", "Jack", f"m{i}", clientMsgId=f"r{i}"), as_=DOCTOR)
        codes.append(response.code)
        if response.code == 429:
            assert_error(response, 429, "rate_limited")
    assert codes[:BURST] == [201] * BURST and 429 in codes[BURST:]
    # Other users have buckets of their own.
    assert (await api.post("/api/v1/chats/pm", pm("Lily", "Jack"), as_=("Lily", "doctor"))).code == 201
    stored = await api.get("/api/v1/chats/pm?user_id=Rose&peer=Jack", as_=SERVICE)
    assert len(stored.json["messages"]) == codes.count(201)
    await asyncio.sleep(1.2 / RATE_PER_SEC)  # the refill rate is what is tested: a token is back
    retry = await api.post("/api/v1/chats/pm", pm("Rose", "Jack", "later", clientMsgId="r-late"), as_=DOCTOR)
    assert retry.code == 201 and retry.json["seq"] == codes.count(201) + 1  # no gap from refusals


@pytest.mark.gen_test
async def test_ws_sends_over_the_rate_get_a_rate_limited_error_frame(api):
    jack = await api.ws("Jack")
    replies = []
    for i in range(BURST + 2):
        replies.append(
            await jack.send_and_ack(
                {"type": "pm", "to": "Rose", "contentType": 1, "content": f"w{i}", "clientMsgId": f"w{i}"}
            )
        )
    assert [r["type"] for r in replies[:BURST]] == ["ack"] * BURST
    limited = [r for r in replies[BURST:] if r["type"] == "error"]
    assert limited, replies
    for reply in limited:
        assert reply["code"] == "rate_limited" and reply["clientMsgId"].startswith("w"), reply
    await jack.send({"type": "ping"})
    assert await jack.recv_type("pong") == {"type": "pong"}  # the socket stays open
    stored = await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose", as_=SERVICE)
    assert len(stored.json["messages"]) == sum(r["type"] == "ack" for r in replies)


@pytest.mark.gen_test
async def test_rest_and_ws_share_one_bucket_per_user(api):
    for i in range(BURST):
        assert (await api.post("/api/v1/chats/pm", pm("Jack", "Rose", f"r{i}"), as_=("Jack", "patient"))).code == 201
    jack = await api.ws("Jack")
    reply = await jack.send_and_ack(
        {"type": "pm", "to": "Rose", "contentType": 1, "content": "x", "clientMsgId": "after-rest"}
    )
    assert reply["type"] == "error" and reply["code"] == "rate_limited"


# ---- connection caps ------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_connections_over_the_per_user_cap_are_refused_with_429(api):
    first = [await api.ws("Jack") for _ in range(CONNECTIONS_PER_USER)]
    with pytest.raises(HTTPClientError) as refused:
        await api.ws("Jack")
    assert refused.value.code == 429
    assert json.loads(refused.value.response.body)["error"]["code"] == "too_many_connections"
    other = await api.ws("Lily")  # another user is not affected
    await other.send({"type": "ping"})
    await other.recv_type("pong")
    first[0].close()
    await wait_until(lambda: api_connections(api, "Jack") < CONNECTIONS_PER_USER)  # the server saw the close
    again = await api.ws("Jack")
    await again.send({"type": "ping"})
    await again.recv_type("pong")


def api_connections(api, user: str) -> int:
    return api.app_services.hub.count_sockets(user) if hasattr(api, "app_services") else 0


@pytest.fixture
def api(api, services):
    api.app_services = services  # lets tests look at the hub of the in-process server
    return api


@pytest.mark.gen_test
async def test_connections_over_the_total_cap_are_refused_with_429(api):
    users = [f"u{i}" for i in range(CONNECTIONS_TOTAL)]
    for user in users:
        await api.ws(user)
    with pytest.raises(HTTPClientError) as refused:
        await api.ws("late-comer")
    assert refused.value.code == 429


# ---- a peer that stops reading --------------------------------------------------------------------


async def open_raw_websocket(base_url: str, token: str) -> socket.socket:
    """A WebSocket handshake over a plain socket with a tiny receive buffer; the caller never reads."""
    url = urllib.parse.urlsplit(base_url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (url.hostname, url.port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask)."""
    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    length = len(payload)
    if length < 126:
        header += bytes([0x80 | length])
    elif length < 65536:
        header += bytes([0x80 | 126]) + struct.pack(">H", length)
    else:
        header += bytes([0x80 | 127]) + struct.pack(">Q", length)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class TestSlowPeer:
    @pytest.fixture
    def settings(self, settings):
        return settings.replace(limits=dataclasses.replace(settings.limits, send_rate_per_sec=1e6, send_burst=10**6))

    @pytest.mark.gen_test(timeout=60)
    async def test_a_peer_that_stops_reading_is_closed_without_blocking_others(self, api, token, services, caplog):
        await check_slow_peer_is_cut_off(api, token, services)
        assert_logged(caplog, "closing a slow socket of Jack")


async def check_slow_peer_is_cut_off(api, token, services):
    await make_group(api, "ward", members=("Rose", "Jack", "Lily"))
    lily = await api.ws("Lily")
    await lily.recv_type("message")  # group.created
    slow = await open_raw_websocket(api.base_url, token("Jack", "patient"))
    try:
        assert services.hub.count_sockets("Jack") == 1
        jack_socket = services.hub.sockets_of("Jack")[0]
        content = "\U0001f600" * 8000  # 8,000 characters, 32,000 bytes of UTF-8 per frame
        sent = 0
        started = time.monotonic()
        while not is_closing(jack_socket) and sent < 600:
            response = await api.post(
                "/api/v1/chats/gm", {"from": "Rose", "group": "ward", "contentType": 1, "content": content}, as_=DOCTOR
            )
            assert response.code == 201, response.body
            sent += 1
            # Lily reads as she goes and gets every message, in order, while Jack's socket backs up.
            frame = await lily.recv_type("message", timeout=5)
            assert frame["message"]["seq"] == sent + 1
        assert is_closing(jack_socket), f"still open after {sent} messages"
        assert sent * 32_000 > MAX_PENDING_WRITE_BYTES  # it took more than the cap to get there
        assert time.monotonic() - started < 45
        # The 1008 close frame is queued behind what Jack never read: a peer that reads again
        # within the server's close grace (5 s) finds it at the end.
        assert await read_until_close(slow) == 1008
        slow.close()
        await wait_until(lambda: services.hub.count_sockets("Jack") == 0)
        assert services.hub.count_sockets("Jack") == 0  # unregistered: no more fan-out to it
        # Everyone else is still served.
        await lily.send({"type": "ping"})
        assert await lily.recv_type("pong") == {"type": "pong"}
    finally:
        slow.close()


def is_closing(session) -> bool:
    return session.closed


async def read_until_close(sock: socket.socket, timeout: float = 20.0) -> int | None:
    """Read server frames until a close frame (its code) or EOF (None)."""
    loop = asyncio.get_running_loop()
    buffer = b""
    deadline = time.monotonic() + timeout

    async def need(n: int) -> bool:
        nonlocal buffer
        while len(buffer) < n:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), max(0.1, deadline - time.monotonic()))
            if not chunk:
                return False
            buffer += chunk
        return True

    while True:
        if not await need(2):
            return None
        opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
        if length == 126:
            if not await need(4):
                return None
            length, offset = struct.unpack(">H", buffer[2:4])[0], 4
        elif length == 127:
            if not await need(10):
                return None
            length, offset = struct.unpack(">Q", buffer[2:10])[0], 10
        if not await need(offset + length):
            return None
        payload, buffer = buffer[offset : offset + length], buffer[offset + length :]
        if opcode == 0x8:
            return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
