"""WebSocket fuzzing with hypothesis against a real server process.

Whatever a client sends — random JSON, valid frames with one field of the wrong type, deep nesting,
huge frames, binary frames, text frames that are not UTF-8 — the server answers with `error` frames
(or an ack, for what happens to be a valid send) or closes that one connection cleanly, and never
crashes or wedges: after every example a connection answers ping with pong and /api/v1/status
still answers. The server runs as a process so the fuzzing client can be plain synchronous code.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import urllib.request
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from server.auth import mint_token
from tests.processes import ServerProcess, free_port

TEST_SECRET = "test-secret-0123456789abcdef0123456789"
FRAME_LIMIT_BYTES = 64 * 1024
REPLY_TIMEOUT_SECS = 5.0
SERVER_FRAME_TYPES = {"error", "ack", "pong", "message", "receipt"}


def fuzz(max_examples: int) -> settings:
    """Bounded, reproducible runs (derandomize) with no per-example deadline (real I/O)."""
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def server(mongo, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ws-fuzz")
    process = ServerProcess(free_port(), mongo.uri, f"fz_{uuid.uuid4().hex[:10]}", log_dir / "server.log")
    process.start()
    yield process
    process.stop()
    log = process.log_text()
    assert "Traceback" not in log and "failed" not in log, log[-4000:]  # nothing went unhandled


class Client:
    """One reusable connection for Jack; replaced only when the server closed it on purpose."""

    def __init__(self, server: ServerProcess):
        self.url = f"ws://127.0.0.1:{server.port}/ws?token={mint_token(TEST_SECRET, 'Jack', 'patient')}"
        self.conn: ClientConnection | None = None
        self.reconnects = 0

    def get(self) -> ClientConnection:
        if self.conn is None:
            self.conn = connect(self.url, max_size=None, open_timeout=5, close_timeout=2, legacy=True)
            self.reconnects += 1
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@pytest.fixture(scope="module")
def client(server):
    jack = Client(server)
    yield jack
    jack.drop()


def send_and_check(
    client: Client, payload: str | bytes, server: ServerProcess, allowed_close_codes: frozenset[int] = frozenset()
) -> list[dict]:
    """Send one frame, then a ping: every reply up to the pong must be a well-formed server frame.

    A close with one of allowed_close_codes is accepted (the next example reconnects). Returns the
    frames that came before the pong.
    """
    conn = client.get()
    try:
        conn.send(payload)
        conn.send(json.dumps({"type": "ping"}))
        replies = []
        while True:
            frame = json.loads(conn.recv(timeout=REPLY_TIMEOUT_SECS))
            assert frame.get("type") in SERVER_FRAME_TYPES, frame
            if frame["type"] == "pong":
                break
            if frame["type"] == "error":
                assert isinstance(frame["code"], str) and isinstance(frame["message"], str), frame
                assert frame["code"] != "internal_error", frame  # a bug, not bad input
            replies.append(frame)
    except ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd is not None else None
        client.drop()
        assert code in allowed_close_codes, f"closed with {code} after {payload[:80]!r}"
        replies = [{"type": "closed", "code": code}]
    assert_still_serving(client, server)
    return replies


def assert_still_serving(client: Client, server: ServerProcess) -> None:
    conn = client.get()
    conn.send(json.dumps({"type": "ping"}))
    while json.loads(conn.recv(timeout=REPLY_TIMEOUT_SECS))["type"] != "pong":
        pass
    with urllib.request.urlopen(server.base_url + "/api/v1/status", timeout=5) as response:
        assert response.status == 200
    assert server.process is not None and server.process.poll() is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
# Valid frames of every kind; the tests below break them one field at a time.
TEMPLATES = {
    "pm": {"type": "pm", "to": "Rose", "contentType": 1, "content": "hello", "clientMsgId": "c"},
    "gm": {
        "type": "gm",
        "group": "g1",
        "groupType": 1,
        "at": ["Rose"],
        "contentType": 1,
        "content": "hi",
        "clientMsgId": "g",
    },
    "read": {"type": "read", "channel": "pm", "peer": "Rose", "seq": 1},
    "received": {"type": "received", "channel": "gm", "group": "g1", "seq": 1},
    "ping": {"type": "ping"},
}


@fuzz(50)
@given(value=json_values)
def test_random_json_gets_error_frames_never_a_crash(server, client, value):
    replies = send_and_check(client, json.dumps(value), server)
    if not isinstance(value, dict):
        assert [r["type"] for r in replies] == ["error"] and replies[0]["code"] == "invalid_body"


@fuzz(50)
@given(kind=st.sampled_from(sorted(TEMPLATES)), data=st.data())
def test_wrong_type_in_any_field_gets_an_error_frame(server, client, kind, data):
    frame = dict(TEMPLATES[kind])
    field = data.draw(st.sampled_from(sorted(frame)), label="field")
    frame[field] = data.draw(json_values, label="value")
    frame["clientMsgId"] = frame.get("clientMsgId") if field == "clientMsgId" else uuid.uuid4().hex
    replies = send_and_check(client, json.dumps(frame), server)
    for reply in replies:
        if reply["type"] == "error" and isinstance(frame.get("clientMsgId"), str) and kind in ("pm", "gm"):
            assert reply.get("clientMsgId") == frame["clientMsgId"], (frame, reply)


@fuzz(20)
@given(depth=st.integers(min_value=1, max_value=60_000), opener=st.sampled_from(["[", '{"a":']))
@example(depth=60_000, opener="[")  # deeper than json's recursion limit: was an internal_error
def test_deeply_nested_frames_get_an_error_frame(server, client, depth, opener):
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + closer * depth
    if len(text.encode()) > FRAME_LIMIT_BYTES:
        text = opener * depth  # unterminated, still under the cap: invalid JSON
        text = text[: FRAME_LIMIT_BYTES // len(opener)]
    replies = send_and_check(client, text, server)
    assert replies and replies[0]["type"] == "error", replies


@fuzz(12)
@given(size=st.integers(min_value=FRAME_LIMIT_BYTES - 64, max_value=4 * FRAME_LIMIT_BYTES))
def test_huge_frames_error_or_close_with_1009(server, client, size):
    text = json.dumps({"type": "ping", "pad": "x" * size}).encode()
    sock = raw_websocket(server)  # raw: the client library's reader thread dislikes the reset below
    try:
        with contextlib.suppress(OSError):  # the server may close first: it reads the length first
            sock.sendall(masked_text_frame(text))
        outcome = read_close_or_eof(sock, until_pong=True)
    finally:
        sock.close()
    if len(text) > FRAME_LIMIT_BYTES:
        # 1009 as soon as the server reads the frame header. When the client is still writing the
        # rest of a large frame at that moment, its kernel answers the close with a reset and the
        # 1009 frame is lost: both end only this connection.
        assert outcome in (1009, None), outcome
    else:
        assert outcome == "pong"
    assert_still_serving(client, server)


@fuzz(30)
@given(payload=st.binary(max_size=2048))
def test_binary_frames_get_an_error_frame(server, client, payload):
    replies = send_and_check(client, payload, server)
    assert [r["code"] for r in replies if r["type"] == "error"] == ["invalid_field"], replies


# ---- text frames that are not UTF-8 (no client library sends them: a raw socket does) ---------------


def raw_websocket(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    token = mint_token(TEST_SECRET, "Jack", "patient")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def masked_text_frame(payload: bytes) -> bytes:
    """A client text frame (clients must mask), of any length."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes([0x81, 0x80 | length])
    elif length < 65536:
        header = bytes([0x81, 0x80 | 126]) + struct.pack(">H", length)
    else:
        header = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", length)
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return header + mask + masked


def read_close_or_eof(sock: socket.socket, until_pong: bool = False) -> int | str | None:
    """Skip server frames (the backlog) until a close frame (its code), EOF or a reset (None), or,
    with until_pong, a pong ("pong")."""
    buffer = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buffer += chunk
        while len(buffer) >= 2:
            opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                length, offset = struct.unpack(">H", buffer[2:4])[0], 4
            elif length == 127:
                length, offset = struct.unpack(">Q", buffer[2:10])[0], 10
            if len(buffer) < offset + length:
                break
            payload, buffer = buffer[offset : offset + length], buffer[offset + length :]
            if opcode == 0x8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
            if until_pong and opcode == 0x1 and json.loads(payload).get("type") == "pong":
                return "pong"


INVALID_UTF8 = st.one_of(
    st.sampled_from(
        [b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b'{"type":"ping","x":"\xc0\xaf"}']
    ),
    st.binary(min_size=1, max_size=100).map(lambda b: b + b"\xff"),
)


@fuzz(15)
@given(payload=INVALID_UTF8)
def test_text_frames_with_invalid_utf8_fail_only_that_connection(server, client, payload):
    sock = raw_websocket(server)
    try:
        sock.sendall(masked_text_frame(payload))
        # RFC 6455 §8.1: the endpoint fails the connection; Tornado drops it without a close frame
        # (a 1007 close frame would be allowed too). Either way only this connection ends.
        assert read_close_or_eof(sock) in (None, 1007)
    finally:
        sock.close()
    assert_still_serving(client, server)
