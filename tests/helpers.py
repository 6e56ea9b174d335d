"""Small clients for tests: REST calls as a given user, WebSocket connections that clean up."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

FRAME_TIMEOUT_SECS = 5.0
# A fixture's teardown that waits longer fails its test rather than stalling the whole run.
TEARDOWN_TIMEOUT_SECS = 30

# Who calls: as_=DOCTOR, as_=PATIENT, as_=SERVICE (the platform back end).
DOCTOR = ("Rose", "doctor")
PATIENT = ("Jack", "patient")
SERVICE = ("platform", "service")


class Response:
    def __init__(self, code: int, body: bytes, headers: Any):
        self.code = code
        self.body = body
        self.headers = headers

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """REST calls as a user: await api.post("/api/v1/chats/pm", body, as_=("Rose", "doctor"))."""

    def __init__(self, http_client: AsyncHTTPClient, base_url: str, token: Callable[..., str]):
        self.http_client = http_client
        self.base_url = base_url
        self.token = token
        self.sockets: list[WebSocketClientConnection] = []

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        as_: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
        raw_body: bytes | None = None,
    ) -> Response:
        all_headers = dict(headers or {})
        if as_ is not None:
            all_headers["Authorization"] = f"Bearer {self.token(*as_)}"
        if raw_body is None and body is not None:
            raw_body = json.dumps(body, ensure_ascii=False).encode()
            all_headers.setdefault("Content-Type", "application/json")
        if raw_body is None and method in ("POST", "PUT", "PATCH"):
            raw_body = b""
        request = HTTPRequest(
            self.base_url + path,
            method=method,
            headers=all_headers,
            body=raw_body,
            allow_nonstandard_methods=True,
            request_timeout=20,
        )
        response = await self.http_client.fetch(request, raise_error=False)
        return Response(response.code, response.body or b"", response.headers)

    async def get(self, path: str, as_: tuple[str, str] | None = None, **kwargs: Any) -> Response:
        return await self.request("GET", path, as_=as_, **kwargs)

    async def post(self, path: str, body: Any = None, as_: tuple[str, str] | None = None, **kwargs: Any) -> Response:
        return await self.request("POST", path, body, as_=as_, **kwargs)

    async def send_pm(
        self, sender: str, to: str, content: str = "hello", role: str = "doctor", **extra: Any
    ) -> dict[str, Any]:
        response = await self.post(
            "/api/v1/chats/pm",
            {"from": sender, "to": to, "contentType": 1, "content": content, **extra},
            as_=(sender, role),
        )
        assert response.code in (200, 201), response.body
        return response.json  # type: ignore[no-any-return]

    async def ws(
        self, user: str, role: str = "patient", token: str | None = None, headers: dict[str, str] | None = None
    ) -> Socket:
        url = self.base_url.replace("http", "ws", 1) + f"/ws?token={token or self.token(user, role)}"
        conn = await websocket_connect(HTTPRequest(url, headers=headers or {}))
        self.sockets.append(conn)
        return Socket(conn)


class Socket:
    """A WebSocket client that reads JSON frames with a timeout."""

    def __init__(self, conn: WebSocketClientConnection):
        self.conn = conn

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.write_message(json.dumps(frame, ensure_ascii=False))

    async def recv(self, timeout: float = FRAME_TIMEOUT_SECS) -> dict[str, Any] | None:
        """The next frame, or None when the server closed the connection."""
        text = await asyncio.wait_for(self.conn.read_message(), timeout)
        return None if text is None else json.loads(text)

    async def recv_type(self, kind: str, timeout: float = FRAME_TIMEOUT_SECS) -> dict[str, Any]:
        """Skip frames until one of the given type arrives."""
        while True:
            frame = await self.recv(timeout)
            assert frame is not None, f"connection closed while waiting for {kind!r}"
            if frame["type"] == kind:
                return frame

    async def expect_silence(self, timeout: float = 0.3) -> None:
        try:
            frame = await self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame!r}")

    async def send_and_ack(self, frame: dict[str, Any]) -> dict[str, Any]:
        await self.send(frame)
        while True:
            reply = await self.recv()
            assert reply is not None
            if reply["type"] in ("ack", "error") and reply.get("clientMsgId") == frame.get("clientMsgId"):
                return reply

    def close(self) -> None:
        self.conn.close()


def assert_error(response: Response, status: int, code: str | None = None, field: str | None = None) -> None:
    assert response.code == status, (response.code, response.body)
    body = response.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if field is not None:
        assert field in body["error"]["message"], body


async def make_group(
    api: Api, gid: str = "care-1", members: tuple[str, ...] = ("Rose", "Jack", "Lily"), group_type: int = 1
) -> Any:
    """A group created by the platform back end; its JSON."""
    response = await api.post(
        "/api/v1/groups",
        {"id": gid, "name": "Care team", "groupType": group_type, "members": list(members)},
        as_=SERVICE,
    )
    assert response.code == 201, response.body
    return response.json


async def wait_until(
    condition: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str = "condition not met in time",
) -> None:
    """Poll a condition (a function, or a coroutine function) until it is true; fail after `timeout` s.

    Only for state that offers nothing to await (the hub's registry, updated in a close callback; a
    value another process stores); prefer awaiting the frame, the close or the drain itself.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"{message} (within {timeout}s)"
        await asyncio.sleep(interval)  # the polling interval, bounded by the deadline


def assert_logged(caplog: Any, text: str, level: int = logging.WARNING) -> logging.LogRecord:
    """The server logged `text` (a substring of the message) at `level`: an expected error, checked."""
    for record in caplog.records:
        if record.levelno == level and text in record.getMessage():
            return record  # type: ignore[no-any-return]
    seen = [(r.levelname, r.getMessage()) for r in caplog.records]
    raise AssertionError(f"no {logging.getLevelName(level)} record containing {text!r} in {seen}")
