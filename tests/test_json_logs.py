"""log_format = "json" (SPEC §17): one object per line with the request fields; never a token or content."""

from __future__ import annotations

import json
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from server.auth import mint_token
from server.config import load_settings
from tests.processes import ServerProcess, free_port


@pytest.fixture
def json_server(mongo, tmp_path):
    server = ServerProcess(
        free_port(),
        mongo.uri,
        f"j_{uuid.uuid4().hex[:10]}",
        tmp_path / "server.log",
        IM_LOG_FORMAT="json",
        IM_ACCESS_LOG="true",
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_json_logs_are_one_object_per_line_with_request_fields_and_no_tokens_or_content(json_server):
    secret = load_settings({"IM_PROFILE": "test"}).auth_secret
    doctor, patient = mint_token(secret, "Rose", "doctor"), mint_token(secret, "Jack", "patient")
    content = f"distinctive-{uuid.uuid4().hex}"
    base = json_server.base_url
    conn = await websocket_connect(f"ws://127.0.0.1:{json_server.port}/ws?token={patient}")
    client = AsyncHTTPClient()
    for n in range(3):
        body = {"from": "Rose", "to": "Jack", "contentType": 1, "content": f"{content}-{n}", "clientMsgId": f"c{n}"}
        response = await client.fetch(
            HTTPRequest(
                base + "/api/v1/chats/pm",
                method="POST",
                body=json.dumps(body),
                headers={"Authorization": f"Bearer {doctor}"},
            )
        )
        assert response.code == 201
    await conn.write_message(
        json.dumps({"type": "pm", "to": "Rose", "contentType": 1, "content": content + "-ws", "clientMsgId": "w1"})
    )
    while json.loads(await conn.read_message())["type"] != "ack":
        pass
    bad = await client.fetch(
        HTTPRequest(base + "/api/v1/chats/pm", method="POST", body="{", headers={"Authorization": f"Bearer {doctor}"}),
        raise_error=False,
    )
    assert bad.code == 400
    conn.close()
    json_server.stop()

    text = json_server.log_text()
    assert content not in text and doctor not in text and patient not in text
    assert secret not in text
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one object
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    assert records[0]["message"].startswith("Starting IM server, version ")
    sends = [r for r in records if r.get("path") == "/api/v1/chats/pm" and r.get("status") == 201]
    assert len(sends) == 3
    assert all(r["method"] == "POST" and isinstance(r["duration"], float) for r in sends)
    assert any(r.get("path") == "/ws" for r in records)  # the handshake, without its query string
