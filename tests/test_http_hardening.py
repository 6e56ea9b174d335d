"""HTTP-level hardening through real client libraries and raw sockets against the real server
(server.http_guard.make_http_server, as run.py listens): keep-alive after early refusals, anonymous
bodies, header and body timeouts, the connection cap, 431, security headers, log hygiene, token
lifetimes."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import socket
import time
from collections import Counter
from typing import Any

import aiohttp
import jwt
import psutil
import pytest
from tornado.testing import bind_unused_port

from server.http_guard import PAGE_CSP, RESOURCE_CSP, make_http_server
from tests.helpers import assert_error, assert_logged, wait_until

DOCTOR = ("Rose", "doctor")
HEADER_TIMEOUT_SECS = 1.0  # lowered for these tests; the profiles say 20
REFUSED_BODY_TIMEOUT_SECS = 1.0
OVERSIZE_BODY = b'{"content":"' + b"x" * 100_000 + b'"}'  # over the 64 KiB JSON cap, small enough to drain


@pytest.fixture
def settings(settings):
    """The test profile with [http] timeouts short enough to watch them act."""
    return settings.replace(
        http=dataclasses.replace(
            settings.http, header_timeout_secs=HEADER_TIMEOUT_SECS, refused_body_timeout_secs=REFUSED_BODY_TIMEOUT_SECS
        )
    )


@pytest.fixture
def http_server(app, settings, io_loop, _unused_port):
    """The production server (limits, timeouts, 431, lingering close) instead of a bare HTTPServer."""
    server = make_http_server(app, settings)
    server.add_socket(_unused_port[0])
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


@pytest.fixture
def port(http_server, http_port):
    return http_port


def pm_body(n: int) -> bytes:
    return json.dumps({"from": "Rose", "to": "Jack", "contentType": 1, "content": f"keep-alive {n}"}).encode()


def mixed_requests(token, count: int) -> list[tuple[str, str, str, dict[str, str], bytes, int]]:
    """(kind, method, path, headers, body, expected status), cycling through every early refusal."""
    good = {"Authorization": f"Bearer {token(*DOCTOR)}", "Content-Type": "application/json"}
    expired = {"Authorization": f"Bearer {token('Rose', 'doctor', -60)}", "Content-Type": "application/json"}
    bad = {"Authorization": "Bearer not-a-jwt", "Content-Type": "application/json"}
    members = json.dumps({"members": ["Jack"]}).encode()
    kinds = [
        ("valid", "POST", "/api/v1/chats/pm", good, None, 201),
        ("expired", "POST", "/api/v1/chats/pm", expired, None, 401),
        ("valid_get", "GET", "/api/v1/conversations?user_id=Rose", good, b"", 200),
        ("bad_token", "POST", "/api/v1/chats/pm", bad, None, 401),
        ("bad_path_id", "GET", "/api/v1/groups/$x", good, b"", 400),
        ("bad_path_id_with_body", "POST", "/api/v1/groups/$x/members", good, members, 400),
        ("expired_path_with_body", "POST", "/api/v1/groups/g1/members", expired, members, 401),
        ("oversize_body", "POST", "/api/v1/chats/pm", good, OVERSIZE_BODY, 413),
        ("unknown_path_with_body", "POST", "/api/v1/nowhere", good, members, 404),
        ("wrong_method_with_body", "PUT", "/api/v1/files", good, members, 405),
    ]
    out = []
    for n in range(count):
        kind, method, path, headers, body, status = kinds[n % len(kinds)]
        out.append((kind, method, path, headers, pm_body(n) if body is None else body, status))
    return out


@pytest.mark.gen_test(timeout=120)
async def test_aiohttp_keep_alive_pool_survives_1000_mixed_refusals(port, token, http_server):
    requests = mixed_requests(token, 1000)
    errors: list[str] = []
    wrong: Counter[str] = Counter()
    closing: Counter[str] = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for kind, method, path, headers, body, expected in requests:
            try:
                async with session.request(
                    method, f"http://127.0.0.1:{port}{path}", headers=headers, data=body
                ) as response:
                    payload = await response.read()
                    if response.status != expected:
                        wrong[f"{kind}: {response.status} {payload[:80]!r}"] += 1
                    elif expected >= 400:
                        assert set(json.loads(payload)) == {"error"}
                    if response.headers.get("Connection", "").lower() == "close":
                        closing[kind] += 1
            except aiohttp.ClientError as exc:
                errors.append(f"{kind}: {exc!r}")
    assert errors == [] and not wrong, (errors[:5], wrong)
    assert not closing, closing  # every refusal here was drained, so the connection stayed usable
    assert http_server.accepted_connections == 1


@pytest.mark.gen_test(timeout=120)
async def test_http_client_connection_survives_1000_mixed_refusals(port, token, http_server):
    requests = mixed_requests(token, 1000)

    def run_all() -> tuple[list[str], Counter[str]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        errors, wrong = [], Counter[str]()
        for kind, method, path, headers, body, expected in requests:
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != expected:
                    wrong[f"{kind}: {response.status}"] += 1
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{kind}: {exc!r}")
                conn.close()
        conn.close()
        return errors, wrong

    errors, wrong = await asyncio.to_thread(run_all)
    assert errors == [] and not wrong, (errors[:5], wrong)
    assert http_server.accepted_connections == 1


@pytest.mark.gen_test(timeout=60)
async def test_body_too_large_to_drain_is_refused_at_once_with_connection_close(port, token):
    """An anonymous 10 MiB upload gets its 401 before the body, and says the connection ends."""

    def upload_anonymously() -> tuple[int, str | None, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/api/v1/files")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(10 * 1024 * 1024))
        conn.endheaders()
        response = conn.getresponse()  # without sending a byte of the body
        body = response.read()
        conn.close()
        return response.status, response.getheader("Connection"), body

    status, connection, body = await asyncio.to_thread(upload_anonymously)
    assert (status, connection) == (401, "close")
    assert json.loads(body)["error"]["code"] == "unauthenticated"


def send_without_blocking(sock: socket.socket, data: memoryview) -> int:
    """Push what the kernel accepts now (so the bytes wait in kernel buffers, not in our RSS)."""
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent : sent + 65536])
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
    return sent


async def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    deadline = loop.time() + timeout
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), max(0.01, deadline - loop.time()))
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


@pytest.mark.gen_test(timeout=60)
async def test_30_anonymous_10mib_uploads_sending_all_but_one_byte_cost_no_memory(port):
    """Issue 12.3: each answered 401 at once, and the server's RSS does not grow (was 98 -> 388 MB)."""
    declared = 10 * 1024 * 1024
    head = (
        f"POST /api/v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    body = memoryview(bytes(declared - 1))
    process = psutil.Process()
    rss_before = process.memory_info().rss
    sockets = []
    for _ in range(30):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        sock.sendall(head)
        sockets.append(sock)
    for sock in sockets:
        send_without_blocking(sock, body)
    started = time.monotonic()
    answers = await asyncio.gather(*(read_until_closed(sock, 10) for sock in sockets))
    elapsed = time.monotonic() - started
    for sock in sockets:
        sock.close()
    rss_growth = process.memory_info().rss - rss_before
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b"\r\nConnection: close\r\n" in answer
    assert elapsed < 8  # answered at once, closed after a bounded linger
    assert rss_growth < 8 * 1024 * 1024, rss_growth


@pytest.mark.gen_test(timeout=30)
async def test_half_sent_request_line_is_closed_after_the_header_timeout(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/v1/sta")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_SECS + 5) == b""
    assert HEADER_TIMEOUT_SECS * 0.8 <= time.monotonic() - started < HEADER_TIMEOUT_SECS + 3
    writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_refused_request_whose_small_body_never_arrives_is_closed_after_its_timeout(port, token):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'POST /api/v1/chats/pm HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"from"')
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), REFUSED_BODY_TIMEOUT_SECS + 5) == b""
    assert time.monotonic() - started < REFUSED_BODY_TIMEOUT_SECS + 3
    writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_open_connections_are_capped_and_half_sent_ones_do_not_hold_the_cap(app, settings, caplog):
    cap = 5
    server = make_http_server(app, settings.replace(http=dataclasses.replace(settings.http, max_connections=cap)))
    listener, cap_port = bind_unused_port()
    server.add_socket(listener)
    try:
        stalled = []
        for _ in range(cap):
            reader, writer = await asyncio.open_connection("127.0.0.1", cap_port)
            writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")  # never finished
            stalled.append((reader, writer))
        await wait_until(lambda: server.open_connections == cap)
        reader, writer = await asyncio.open_connection("127.0.0.1", cap_port)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # beyond the cap: closed at once
        assert server.refused_connections == 1
        assert_logged(caplog, "HTTP connections open")
        writer.close()
        for reader, _writer in stalled:  # the header timeout frees the cap again
            assert await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_SECS + 5) == b""
        reader, writer = await asyncio.open_connection("127.0.0.1", cap_port)
        writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        for _reader, stalled_writer in stalled:
            stalled_writer.close()
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.mark.parametrize("header_bytes", [20_000, 1_000_000])
@pytest.mark.gen_test(timeout=30)
async def test_oversized_request_headers_get_a_431_envelope(port, header_bytes):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * header_bytes + b"\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"\r\nConnection: close" in head and b"\r\nServer: im-server" in head
    assert json.loads(body)["error"]["code"] == "headers_too_large"


@pytest.mark.gen_test
async def test_every_answer_carries_security_headers_and_no_tornado_version(api):
    answers = {
        "json": await api.get("/api/v1/status"),
        "error": await api.get("/api/v1/nowhere"),
        "sdk": await api.get("/sdk/im.client.js"),
        "page": await api.get("/sdk/pages/patient.html"),
        "refused_socket": await api.get(
            "/ws?token=bad",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        ),
    }
    for name, response in answers.items():
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff", name
        assert headers["X-Frame-Options"] == "DENY", name
        assert headers["Referrer-Policy"] == "no-referrer", name
        assert headers["Server"] == "im-server", name
        expected_csp = PAGE_CSP if name == "page" else RESOURCE_CSP
        assert headers["Content-Security-Policy"] == expected_csp, name
    assert answers["refused_socket"].code == 401


@pytest.mark.gen_test
async def test_a_revalidated_page_keeps_its_own_policy(api):
    """A reload revalidates: the 304 must not carry a policy the browser would merge into the page."""
    page = await api.get("/sdk/pages/patient.html")
    again = await api.get("/sdk/pages/patient.html", headers={"If-None-Match": page.headers["Etag"]})
    assert again.code == 304
    assert "Content-Security-Policy" not in again.headers
    assert again.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("path", ["/sdk/x%00", "/sdk/../server/config.py", "/sdk/missing.js", "/api/v1/nowhere"])
@pytest.mark.gen_test
async def test_failed_requests_answer_an_envelope_and_never_log_the_query_string(api, caplog, path):
    secret = "eyJSECRET.TOKEN.VALUE"
    caplog.set_level(logging.DEBUG)
    response = await api.get(f"{path}?token={secret}")
    assert_error(response, 404, "not_found")
    assert caplog.records, "the failure should be logged (by path)"
    for record in caplog.records:
        line = record.getMessage() + (record.exc_text or "")
        assert secret not in line and "?token" not in line, line


def unsigned_claims_token(settings, **claims: Any) -> str:
    return jwt.encode({"sub": "Rose", "role": "doctor", **claims}, settings.auth_secret, "HS256")


@pytest.mark.gen_test
async def test_token_lifetime_over_the_cap_is_refused_also_when_cached(api, settings):
    now = int(time.time())
    cap = settings.max_token_ttl_secs
    cases = {
        "within_cap": (unsigned_claims_token(settings, iat=now, exp=now + cap), 200),
        "over_cap": (unsigned_claims_token(settings, iat=now, exp=now + cap + 60), 401),
        # Issued long ago for a long time: still over the cap although it expires soon.
        "old_and_long": (unsigned_claims_token(settings, iat=now - 30 * 86400, exp=now + 3600), 401),
        "no_iat_within": (unsigned_claims_token(settings, exp=now + 3600), 200),
        "no_iat_over": (unsigned_claims_token(settings, exp=now + cap + 3600), 401),
    }
    for name, (jwt_text, expected) in cases.items():
        for _attempt in range(2):  # the second goes through the verifier's cache
            response = await api.get(
                "/api/v1/conversations?user_id=Rose", headers={"Authorization": f"Bearer {jwt_text}"}
            )
            assert response.code == expected, (name, response.body)
            if expected == 401:
                assert_error(response, 401, "token_lifetime_too_long")


@pytest.mark.gen_test
async def test_token_lifetime_cap_applies_to_websockets_too(api, settings):
    now = int(time.time())
    long_lived = unsigned_claims_token(settings, iat=now, exp=now + settings.max_token_ttl_secs + 60)
    response = await api.get(
        f"/ws?token={long_lived}",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert response.code == 401


@pytest.mark.gen_test
async def test_connections_keep_nagle_off_for_their_life() -> None:
    """Responses are written whole and WebSocket frames must not wait for an ACK: TCP_NODELAY is
    set once when the connection is accepted and Tornado's per-response toggling is ignored."""
    from server.http_guard import GuardedIOStream

    listener, port = bind_unused_port()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    stream = GuardedIOStream(accepted, b"")
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        stream.set_nodelay(False)  # what HTTP1Connection does after every response
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        stream.close()
        client.close()
        listener.close()
