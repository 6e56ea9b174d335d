"""A connection that answers no ping is closed and cleaned up (SPEC §7)."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from tests.helpers import wait_until


@pytest.fixture
def settings(settings):
    return settings.replace(ping_interval_secs=0.3, ping_timeout_secs=0.3)


async def silent_client(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Completes the WebSocket handshake, then never reads or answers anything (a dead peer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    status = await reader.readline()
    assert b" 101 " in status, status
    return reader, writer


@pytest.mark.gen_test(timeout=20)
async def test_a_peer_that_answers_no_ping_is_closed_and_forgotten(services, http_port, token, api):
    _reader, writer = await silent_client(http_port, token("Jack", "patient"))
    await wait_until(lambda: services.hub.is_online("Jack"), timeout=2.5)  # registered after the 101
    healthy = await api.ws("Lily")  # a client that answers pings stays
    # The ping interval and timeout (0.3 s each, above) are what is under test: closed within 6 s.
    await wait_until(lambda: not services.hub.is_online("Jack"), timeout=6, message="the silent peer is still open")
    assert services.hub.is_online("Lily")
    await healthy.send({"type": "ping"})
    assert await healthy.recv_type("pong") == {"type": "pong"}
    writer.close()
