"""Suspend, reactivate, revoke-tokens (SPEC §17): REST, the WebSocket handshake, open sockets, two processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid

import jwt
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from models.accounts import AccountState, TokenRevoked
from models.principal import Principal
from server.auth import mint_token
from server.db import create_client
from server.services import build_services
from tests.helpers import assert_error
from tests.processes import ROOT, ServerProcess, free_port

ADMIN = ("ops", "admin")
CLOSE_WITHIN_SECS = 2.0


async def closed_code(conn, timeout: float = CLOSE_WITHIN_SECS) -> int | None:
    """Read until the server closes the socket; its close code."""
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(conn.read_message(), max(0.01, deadline - time.monotonic()))
        if message is None:
            conn.close()  # the client side too: no unclosed connection left for the GC to warn about
            return conn.close_code


async def handshake_refusal(url: str) -> tuple[int, dict]:
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(url)
    response = refused.value.response
    assert response is not None
    return refused.value.code, json.loads(response.body)


def test_a_revoke_covers_its_whole_second_and_tokens_without_iat():
    state = AccountState(tokens_valid_from=1_000_001)  # revoked at 1_000_000.4
    with pytest.raises(TokenRevoked):
        state.check(1_000_000)  # minted in the revoke's second (before or after it): refused
    with pytest.raises(TokenRevoked):
        state.check(None)
    state.check(1_000_001)  # minted after the revoke answered


@pytest.mark.gen_test(timeout=30)
async def test_suspend_refuses_rest_and_handshake_closes_socket_4003_reactivate_undoes(api, base_url, token, services):
    jack_token = token("Jack", "patient")
    sock = await api.ws("Jack", token=jack_token)
    conversations = "/api/v1/status"  # authenticates a token when one is given
    assert (await api.get(conversations, headers={"Authorization": f"Bearer {jack_token}"})).code == 200  # cached

    response = await api.post("/api/v1/users/Jack/suspend", {"reason": "abusive messages"}, as_=ADMIN)
    assert response.code == 200, response.body
    assert response.json["suspended"] is True and response.json["reason"] == "abusive messages"
    assert await closed_code(sock.conn) == 4003

    refused = await api.get(conversations, headers={"Authorization": f"Bearer {jack_token}"})
    assert_error(refused, 401, "account_suspended")
    ws_url = base_url.replace("http", "ws", 1) + f"/ws?token={jack_token}"
    code, body = await handshake_refusal(ws_url)
    assert code == 401 and body["error"]["code"] == "account_suspended"

    response = await api.post("/api/v1/users/Jack/reactivate", as_=ADMIN)
    assert response.code == 200 and response.json["suspended"] is False
    assert (await api.get(conversations, headers={"Authorization": f"Bearer {jack_token}"})).code == 200
    audited = [e["action"] async for e in services.db.audit.find({"target.user": "Jack", "actor": "ops"})]
    assert {"user.suspended", "user.reactivated"} <= set(audited)
    again = await api.ws("Jack", token=jack_token)
    await again.send({"type": "ping"})
    assert (await again.recv_type("pong"))["type"] == "pong"


@pytest.mark.gen_test(timeout=30)
async def test_only_admins_act_on_accounts_and_bad_input_names_the_field(api):
    for who in (("platform", "service"), ("Rose", "doctor")):
        assert_error(await api.post("/api/v1/users/Jack/suspend", {"reason": "x"}, as_=who), 403, "forbidden")
        assert_error(await api.post("/api/v1/users/Jack/revoke-tokens", as_=who), 403, "forbidden")
    assert_error(await api.post("/api/v1/users/Jack/suspend", {}, as_=ADMIN), 400, "invalid_field", field="reason")
    assert_error(
        await api.post("/api/v1/users/Jack/suspend", {"reason": 5}, as_=ADMIN), 400, "invalid_field", field="reason"
    )
    assert_error(await api.post("/api/v1/users/$x/suspend", {"reason": "x"}, as_=ADMIN), 400)
    assert_error(await api.post("/api/v1/users/Jack/suspend", {"reason": "x"}), 401)


@pytest.mark.gen_test(timeout=30)
async def test_revoke_refuses_older_tokens_and_those_without_iat_closes_sockets_4001_newer_work(
    api, base_url, settings, services
):
    old = mint_token(settings.auth_secret, "Jack", "patient")
    no_iat = jwt.encode({"sub": "Jack", "role": "patient", "exp": int(time.time()) + 600}, settings.auth_secret)
    conversations = "/api/v1/status"  # authenticates a token when one is given
    for tok in (old, no_iat):  # both verified once: in the verifier's cache
        assert (await api.get(conversations, headers={"Authorization": f"Bearer {tok}"})).code == 200
    sock = await api.ws("Jack", token=old)
    rose = await api.ws("Rose", "doctor")  # another user's socket stays open

    response = await api.post("/api/v1/users/Jack/revoke-tokens", as_=ADMIN)
    assert response.code == 200, response.body
    assert response.json["tokensValidFrom"] is not None
    assert await closed_code(sock.conn) == 4001
    for tok in (old, no_iat):
        assert_error(await api.get(conversations, headers={"Authorization": f"Bearer {tok}"}), 401, "token_revoked")
    code, body = await handshake_refusal(base_url.replace("http", "ws", 1) + f"/ws?token={old}")
    assert code == 401 and body["error"]["code"] == "token_revoked"

    fresh = mint_token(settings.auth_secret, "Jack", "patient")  # minted after the answer: works
    assert (await api.get(conversations, headers={"Authorization": f"Bearer {fresh}"})).code == 200
    new_sock = await api.ws("Jack", token=fresh)
    await new_sock.send({"type": "ping"})
    await new_sock.recv_type("pong")
    await rose.send({"type": "ping"})
    await rose.recv_type("pong")
    stored = await services.db.accounts.find_one({"_id": "Jack"})
    assert stored["revokedBy"] == "ops" and stored["tokensValidFrom"] <= time.time()


def test_the_token_cli_sets_iat(settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IM_")} | {"IM_PROFILE": "test"}
    out = subprocess.run(
        [sys.executable, "-m", "server.tokens", "--sub", "Rose", "--role", "doctor"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    claims = jwt.decode(out.stdout.strip(), settings.auth_secret, algorithms=["HS256"])
    assert abs(claims["iat"] - time.time()) < 60 and claims["exp"] > claims["iat"]


# ---- two processes on one nx-27017 --------------------------------------------------------------


@pytest.fixture
def two_servers(mongo, tmp_path, settings):
    db_name = f"a_{uuid.uuid4().hex[:10]}"
    servers = [ServerProcess(free_port(), mongo.uri, db_name, tmp_path / f"server-{i}.log") for i in range(2)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


async def get_status(server: ServerProcess, tok: str) -> tuple[int, str]:
    request = HTTPRequest(server.base_url + "/api/v1/status", headers={"Authorization": f"Bearer {tok}"})
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    code = json.loads(response.body).get("error", {}).get("code", "") if response.code != 200 else ""
    return response.code, code


async def admin_post(server: ServerProcess, path: str, secret: str, body: dict | None = None) -> int:
    request = HTTPRequest(
        server.base_url + path,
        method="POST",
        body=json.dumps(body or {}),
        headers={"Authorization": f"Bearer {mint_token(secret, 'ops', 'admin')}"},
    )
    return (await AsyncHTTPClient().fetch(request, raise_error=False)).code


@pytest.mark.slow
@pytest.mark.gen_test(timeout=90)
async def test_suspend_and_revoke_on_one_process_take_effect_on_the_other_within_2s(two_servers, settings):
    a, b = two_servers
    secret = settings.auth_secret
    old = mint_token(secret, "Jack", "patient")
    assert await get_status(b, old) == (200, "")  # cached by B's verifier
    on_b = await websocket_connect(f"ws://127.0.0.1:{b.port}/ws?token={old}")

    started = time.monotonic()
    assert await admin_post(a, "/api/v1/users/Jack/suspend", secret, {"reason": "investigation"}) == 200
    assert await closed_code(on_b, CLOSE_WITHIN_SECS) == 4003
    deadline = started + CLOSE_WITHIN_SECS
    while (status := await get_status(b, old)) != (401, "account_suspended"):
        assert time.monotonic() < deadline, f"B answered {status} {time.monotonic() - started:.2f}s after suspend"
        await asyncio.sleep(0.05)

    assert await admin_post(a, "/api/v1/users/Jack/reactivate", secret) == 200
    deadline = time.monotonic() + CLOSE_WITHIN_SECS
    while await get_status(b, old) != (200, ""):
        assert time.monotonic() < deadline, "B still refuses a reactivated user"
        await asyncio.sleep(0.05)

    on_b = await websocket_connect(f"ws://127.0.0.1:{b.port}/ws?token={old}")
    started = time.monotonic()
    assert await admin_post(a, "/api/v1/users/Jack/revoke-tokens", secret) == 200
    assert await closed_code(on_b, CLOSE_WITHIN_SECS) == 4001
    assert time.monotonic() - started < CLOSE_WITHIN_SECS + 1.0  # the revoke answers once its second ends
    assert await get_status(b, old) == (401, "token_revoked")
    fresh = mint_token(secret, "Jack", "patient")
    assert await get_status(b, fresh) == (200, "")
    assert await get_status(a, fresh) == (200, "")


@pytest.mark.gen_test(timeout=30)
async def test_account_actions_are_webhook_events_stored_before_the_answer(settings):
    """With a webhook url set, each action is in the outbox (journaled) when its call returns."""
    configured = dataclasses.replace(
        settings,
        webhooks=dataclasses.replace(settings.webhooks, url="http://127.0.0.1:9/none", secret="s" * 32),
    )
    client = create_client(configured)
    services = build_services(configured, client)
    admin = Principal("ops", "admin")
    try:
        await services.account_admin.suspend(admin, "Jack", {"reason": "x"})
        await services.account_admin.reactivate(admin, "Jack")
        await services.account_admin.revoke_tokens(admin, "Jack")
        events = [e async for e in services.db.webhook_events.find({"data.user": "Jack"})]
        assert sorted(e["type"] for e in events) == ["user.reactivated", "user.suspended", "user.tokens_revoked"]
        assert all(e["data"] == {"user": "Jack", "by": "ops"} for e in events)
    finally:
        await client.drop_database(configured.db_name)
        await client.close()
