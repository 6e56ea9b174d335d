"""Security: bad tokens are refused everywhere, users stay inside their own data, ids cannot smuggle
MongoDB operators, tokens never reach the logs, and browser Origins are checked at the handshake."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
import uuid

import jwt
import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from server.auth import mint_token
from tests.helpers import PATIENT, SERVICE, assert_error, make_group
from tests.processes import ServerProcess, free_port

OTHER_SECRET = "another-secret-0123456789abcdef0123"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**overrides) -> dict:
    now = int(time.time())
    claims = {"sub": "Jack", "role": "patient", "iat": now, "exp": now + 600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _signed_hs512(claims: dict, secret: str) -> str:
    """Right secret, algorithm the server does not pin (built by hand: PyJWT warns on short keys)."""
    signing_input = f"{_b64({'alg': 'HS512', 'typ': 'JWT'})}.{_b64(claims)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha512).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def bad_tokens(secret: str) -> dict[str, str]:
    """Every kind of token the server must refuse, by name."""
    valid = jwt.encode(_claims(), secret, "HS256")
    head, body, signature = valid.split(".")
    return {
        "expired": jwt.encode(_claims(exp=int(time.time()) - 30), secret, "HS256"),
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.",
        "alg_none_with_signature": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.{signature}",
        "tampered_signature": f"{head}.{body}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}",
        "tampered_claims": f"{head}.{_b64(_claims(role='admin'))}.{signature}",
        "other_secret": jwt.encode(_claims(), OTHER_SECRET, "HS256"),
        "hs512_same_secret": _signed_hs512(_claims(), secret),
        "missing_exp": jwt.encode(_claims(exp=None), secret, "HS256"),
        "missing_sub": jwt.encode(_claims(sub=None), secret, "HS256"),
        "missing_role": jwt.encode(_claims(role=None), secret, "HS256"),
        "unknown_role": jwt.encode(_claims(role="superuser"), secret, "HS256"),
        "operator_sub": jwt.encode(_claims(sub="$gt"), secret, "HS256"),
        "object_sub": jwt.encode(_claims(sub={"$gt": ""}), secret, "HS256"),
        "garbage": "not-a-token",
        "empty_segments": "..",
    }


BAD_TOKEN_NAMES = list(bad_tokens("x" * 32))


@pytest.mark.gen_test
@pytest.mark.parametrize("kind", BAD_TOKEN_NAMES)
async def test_bad_token_is_401_on_rest(api, settings, kind):
    token = bad_tokens(settings.auth_secret)[kind]
    for method, path, body in [
        ("GET", "/api/v1/conversations?user_id=Jack", None),
        ("POST", "/api/v1/chats/pm", {"from": "Jack", "to": "Rose", "contentType": 1, "content": "x"}),
        ("GET", "/api/v1/status", None),  # public, but a token that is given must be good
    ]:
        response = await api.request(method, path, body, headers={"Authorization": f"Bearer {token}"})
        assert_error(response, 401, "unauthenticated")
    listed = await api.get("/api/v1/chats/pm?user_id=Jack", as_=SERVICE)
    assert listed.json["messages"] == []  # nothing was written


@pytest.mark.gen_test
@pytest.mark.parametrize("kind", BAD_TOKEN_NAMES)
async def test_bad_token_is_401_at_the_websocket_handshake(api, settings, kind):
    token = bad_tokens(settings.auth_secret)[kind]
    with pytest.raises(HTTPClientError) as refused:
        await api.ws("Jack", token=urllib.parse.quote(token, safe=""))
    assert refused.value.code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "unauthenticated"


@pytest.mark.gen_test
@pytest.mark.parametrize("header", ["Basic amFjazpzZWNyZXQ=", "Bearer", "Bearer ", "Token abc", "bearer"])
async def test_malformed_authorization_header_is_401(api, header):
    response = await api.get("/api/v1/conversations?user_id=Jack", headers={"Authorization": header})
    assert_error(response, 401, "unauthenticated")


# ---- users stay inside their own data ---------------------------------------------------------


@pytest.mark.gen_test
async def test_patient_cannot_read_or_mark_another_users_conversations(api):
    await api.send_pm("Rose", "Lily", "Lily's results")
    for path in (
        "/api/v1/chats/pm?user_id=Lily",
        "/api/v1/chats/pm?user_id=Lily&peer=Rose",
        "/api/v1/chats/sm?user_id=Lily",
        "/api/v1/conversations?user_id=Lily",
        "/api/v1/consultations?user_id=Lily",
        "/api/v1/users/Lily/groups",
    ):
        assert_error(await api.get(path, as_=PATIENT), 403, "forbidden")
    mark = {"user_id": "Lily", "channel": "pm", "peer": "Rose", "seq": 1}
    assert_error(await api.post("/api/v1/conversations/read", mark, as_=PATIENT), 403, "forbidden")
    # The conversation between Rose and Lily, seen from Jack's side, is simply not his.
    own = await api.get("/api/v1/chats/pm?user_id=Jack&peer=Rose", as_=PATIENT)
    assert own.code == 200 and own.json["messages"] == []
    lily = await api.get("/api/v1/conversations?user_id=Lily", as_=("Lily", "patient"))
    assert lily.json["conversations"][0]["readSeq"] == 0  # Jack's attempt moved nothing


@pytest.mark.gen_test
async def test_nobody_posts_as_someone_else(api):
    for role in ("patient", "doctor"):
        forged = {"from": "Lily", "to": "Rose", "contentType": 1, "content": "forged", "clientMsgId": "f"}
        assert_error(await api.post("/api/v1/chats/pm", forged, as_=("Jack", role)), 403, "forbidden", "from")
        system = {"to": "Lily", "title": "t", "summary": "s", "contentType": 1, "content": "x"}
        assert_error(await api.post("/api/v1/chats/sm", system, as_=("Jack", role)), 403, "forbidden")
    consultation = {"doctor": "Rose", "patient": "Lily"}
    assert_error(await api.post("/api/v1/consultations", consultation, as_=PATIENT), 403, "forbidden")
    listed = await api.get("/api/v1/chats/pm?user_id=Lily", as_=SERVICE)
    assert listed.json["messages"] == []
    jack = await api.ws("Jack")
    ack = await jack.send_and_ack(
        {"type": "pm", "from": "Lily", "to": "Rose", "contentType": 1, "content": "over ws", "clientMsgId": "w1"}
    )
    assert ack["type"] == "ack" and ack["message"]["from"] == "Jack"  # `from` is the token's, always


@pytest.mark.gen_test
async def test_non_member_cannot_read_or_write_a_group(api):
    await make_group(api, "ward-7", members=("Rose", "Lily"))
    assert_error(await api.get("/api/v1/groups/ward-7", as_=PATIENT), 403, "not_a_member")
    assert_error(await api.get("/api/v1/chats/gm?group=ward-7", as_=PATIENT), 403, "not_a_member")
    send = {"from": "Jack", "group": "ward-7", "contentType": 1, "content": "let me in"}
    assert_error(await api.post("/api/v1/chats/gm", send, as_=PATIENT), 403, "not_a_member")
    mark = {"user_id": "Jack", "channel": "gm", "group": "ward-7", "seq": 1}
    assert_error(await api.post("/api/v1/conversations/read", mark, as_=PATIENT), 403, "not_a_member")
    add = {"members": ["Jack"]}
    assert_error(await api.post("/api/v1/groups/ward-7/members", add, as_=PATIENT), 403)
    assert_error(await api.request("DELETE", "/api/v1/groups/ward-7/members/Lily", as_=PATIENT), 403)
    assert_error(await api.get("/api/v1/users/Lily/presence", as_=PATIENT), 403, "forbidden")
    jack = await api.ws("Jack")
    error = await jack.send_and_ack(
        {"type": "gm", "group": "ward-7", "contentType": 1, "content": "hi", "clientMsgId": "g1"}
    )
    assert error["type"] == "error" and error["code"] == "not_a_member"
    await jack.send({"type": "read", "channel": "gm", "group": "ward-7", "seq": 1})
    assert (await jack.recv_type("error"))["code"] == "not_a_member"
    group = await api.get("/api/v1/groups/ward-7", as_=SERVICE)
    assert group.json["members"] == ["Rose", "Lily"]
    history = await api.get("/api/v1/chats/gm?group=ward-7", as_=SERVICE)
    assert [m.get("event") for m in history.json["messages"]] == ["group.created"]  # nothing else got in
    await jack.expect_silence()  # and Jack heard nothing of the group


# ---- no operator injection ------------------------------------------------------------------------

INJECTIONS = [
    {"$gt": ""},
    {"$ne": None},
    {"$where": "sleep(1000)"},
    ["Rose"],
    7,
    True,
    "$gt",
    "$where",
    "",
    "x" * 129,
    "bad\x00id",
]


@pytest.mark.gen_test
@pytest.mark.parametrize("value", INJECTIONS, ids=repr)
async def test_operator_ids_in_bodies_are_400(api, value):
    await make_group(api, "care-1", members=("Rose", "Jack"))
    cases = [
        ("/api/v1/chats/pm", {"from": "Rose", "to": value, "contentType": 1, "content": "x"}, "to"),
        ("/api/v1/chats/pm", {"from": value, "to": "Jack", "contentType": 1, "content": "x"}, "from"),
        ("/api/v1/chats/gm", {"from": "Rose", "group": value, "contentType": 1, "content": "x"}, "group"),
        (
            "/api/v1/chats/gm",
            {"from": "Rose", "group": "care-1", "at": [value], "contentType": 1, "content": "x"},
            "at",
        ),
        ("/api/v1/chats/sm", {"to": value, "title": "t", "contentType": 1, "content": "x"}, "to"),
        ("/api/v1/conversations/read", {"user_id": value, "channel": "pm", "peer": "Rose", "seq": 1}, "user_id"),
        ("/api/v1/conversations/read", {"user_id": "Jack", "channel": "pm", "peer": value, "seq": 1}, "peer"),
        ("/api/v1/groups", {"id": value, "name": "n", "groupType": 1, "members": ["Rose"]}, "id"),
        ("/api/v1/groups", {"name": "n", "groupType": 1, "members": [value]}, "members"),
        ("/api/v1/groups/care-1/members", {"members": [value]}, "members"),
        ("/api/v1/consultations", {"doctor": value, "patient": "Jack", "operator": "Rose"}, "doctor"),
        ("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack", "operator": value}, "operator"),
    ]
    for path, body, field in cases:
        response = await api.post(path, body, as_=SERVICE)
        assert_error(response, 400, "invalid_field", field)
    listed = await api.get("/api/v1/chats/pm?user_id=Rose", as_=SERVICE)
    assert listed.json["messages"] == []  # nothing half-written


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "query, field",
    [
        ("user_id=%24gt", "user_id"),
        ("user_id=%24where&peer=Rose", "user_id"),
        ("user_id=Jack&peer=%24ne", "peer"),
        ("user_id=Jack&user_id=Rose", "user_id"),
        ("user_id[%24gt]=", "user_id"),
        ("user_id=" + "x" * 129, "user_id"),
        ("user_id=a%00b", "user_id"),
        ("user_id=Jack&peer=Rose&after=%7B%22%24gt%22%3A0%7D", "after"),
        ("user_id=Jack&peer=Rose&cursor=%7B%22%24gt%22%3A0%7D", "cursor"),
    ],
)
async def test_operator_ids_in_queries_are_400(api, query, field):
    await api.send_pm("Rose", "Jack", "hello")
    assert_error(await api.get(f"/api/v1/chats/pm?{query}", as_=SERVICE), 400, "invalid_field", field)


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/conversations?user_id=%24gt",
        "/api/v1/chats/gm?group=%24in",
        "/api/v1/consultations?user_id=%24ne",
        "/api/v1/chats/sm?user_id=%24gt",
    ],
)
async def test_operator_ids_in_other_queries_are_400(api, path):
    assert_error(await api.get(path, as_=SERVICE), 400, "invalid_field")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/api/v1/groups/%24gt"),
        ("GET", "/api/v1/groups/%24where"),
        ("POST", "/api/v1/groups/%24gt/members"),
        ("DELETE", "/api/v1/groups/care-1/members/%24ne"),
        ("DELETE", "/api/v1/groups/%24gt/members/Jack"),
        ("GET", "/api/v1/users/%24gt/groups"),
        ("GET", "/api/v1/users/%24gt/presence"),
        ("POST", "/api/v1/consultations/%24gt/end"),
        ("GET", "/api/v1/groups/" + "x" * 129),
    ],
)
async def test_operator_ids_in_paths_are_400(api, method, path):
    await make_group(api, "care-1", members=("Rose", "Jack"))
    body = {"members": ["Lily"], "operator": "Rose"} if method == "POST" else None
    assert_error(await api.request(method, path, body, as_=SERVICE), 400, "invalid_field")
    group = await api.get("/api/v1/groups/care-1", as_=SERVICE)
    assert group.json["members"] == ["Rose", "Jack"]


@pytest.mark.gen_test
async def test_operator_values_in_websocket_frames_are_errors(api):
    jack = await api.ws("Jack")
    for field, frame in [
        ("to", {"type": "pm", "to": {"$gt": ""}, "contentType": 1, "content": "x", "clientMsgId": "a"}),
        ("group", {"type": "gm", "group": {"$ne": None}, "contentType": 1, "content": "x", "clientMsgId": "b"}),
        ("peer", {"type": "read", "channel": "pm", "peer": {"$gt": ""}, "seq": 1}),
        ("peer", {"type": "received", "channel": "pm", "peer": "$where", "seq": 1}),
        ("seq", {"type": "read", "channel": "pm", "peer": "Rose", "seq": {"$gt": 0}}),
    ]:
        await jack.send(frame)
        error = await jack.recv_type("error")
        assert error["code"] == "invalid_field" and field in error["message"], error


# ---- tokens never reach the logs ----------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_tokens_never_reach_the_server_log(mongo, tmp_path, settings):
    server = ServerProcess(free_port(), mongo.uri, f"s_{uuid.uuid4().hex[:10]}", tmp_path / "server.log")
    server.start()
    try:
        good = mint_token(settings.auth_secret, "Rose", "doctor")
        patient = mint_token(settings.auth_secret, "Jack", "patient")
        bad = bad_tokens(settings.auth_secret)
        from tornado.httpclient import AsyncHTTPClient

        client = AsyncHTTPClient()
        for token in [good, *bad.values()]:
            for url, method, body in [
                (
                    "/api/v1/chats/pm",
                    "POST",
                    json.dumps({"from": "Rose", "to": "Jack", "contentType": 1, "content": "secret content"}),
                ),
                ("/api/v1/conversations?user_id=Rose", "GET", None),
                ("/api/v1/nowhere", "GET", None),
            ]:
                await client.fetch(
                    HTTPRequest(
                        server.base_url + url, method=method, body=body, headers={"Authorization": f"Bearer {token}"}
                    ),
                    raise_error=False,
                )
        ws_base = f"ws://127.0.0.1:{server.port}/ws?token="
        conn = await websocket_connect(ws_base + patient)
        await conn.write_message(json.dumps({"type": "ping"}))
        while (frame := json.loads(await conn.read_message()))["type"] != "pong":
            assert frame["type"] == "message"  # Jack's backlog comes first
        conn.close()
        for token in bad.values():
            with pytest.raises(HTTPClientError):
                await websocket_connect(ws_base + urllib.parse.quote(token, safe=""))
        # A token in the query string of a REST call (a client mistake) is not logged either.
        await client.fetch(server.base_url + f"/api/v1/status?token={good}", raise_error=False)
    finally:
        server.stop()
    log = server.log_text()
    assert "socket opened for Jack" in log and "POST /api/v1/chats/pm" in log  # the calls were logged
    for token in [good, patient, *bad.values()]:
        if len(token) > 8:
            for piece in token.split("."):
                if len(piece) > 16:
                    assert piece not in log, f"a token fragment reached the log: {piece[:12]}..."
    assert "secret content" not in log  # nor message content


# ---- browser Origin allow-list --------------------------------------------------------------------


class TestOriginAllowList:
    @pytest.fixture
    def settings(self, settings):
        return settings.replace(allowed_origins=("https://clinic.example",))

    async def _connect(self, api, origin: str | None):
        headers = {"Origin": origin} if origin is not None else {}
        return await api.ws("Jack", headers=headers)

    @pytest.mark.gen_test
    @pytest.mark.parametrize(
        "origin",
        [
            "https://evil.example",
            "http://clinic.example",
            "https://clinic.example.evil.example",
            "https://clinic.example:8443",
            "null",
            "file://",
        ],
    )
    async def test_browser_origin_not_on_the_list_is_refused_with_403(self, api, origin):
        with pytest.raises(HTTPClientError) as refused:
            await self._connect(api, origin)
        assert refused.value.code == 403

    @pytest.mark.gen_test
    @pytest.mark.parametrize("origin", ["https://clinic.example", "https://CLINIC.example", None])
    async def test_allowed_origin_or_no_origin_is_accepted(self, api, origin):
        jack = await self._connect(api, origin)
        await jack.send({"type": "ping"})
        assert await jack.recv_type("pong") == {"type": "pong"}

    @pytest.mark.gen_test
    async def test_bad_token_is_still_401_before_the_origin_check(self, api):
        with pytest.raises(HTTPClientError) as refused:
            await api.ws("Jack", token="garbage", headers={"Origin": "https://evil.example"})
        assert refused.value.code in (401, 403)
