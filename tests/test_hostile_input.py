"""Hostile and careless input in messages: text BSON cannot store, reused idempotency keys,
invisible characters in ids, URLs that do not parse cleanly (RELIABILITY "hostile input")."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
from pymongo import UpdateOne, WriteConcern

from models.batching import ENCODING_ERRORS, BatchedInserts, BatchedUpdates
from server.auth import mint_token
from tests.helpers import DOCTOR, PATIENT, SERVICE, Api, assert_error, make_group

LONE = "\ud800"  # an unpaired surrogate: json.loads gives it from the escape "\ud800"
PARALLEL_SENDS = 600
POISON_EVERY = 10


def raw_json(body: dict[str, Any]) -> bytes:
    """The body as a client writes it: json.dumps escapes a lone surrogate as \\ud800 (valid JSON)."""
    return json.dumps(body).encode()


async def post_raw(api: Api, path: str, body: dict[str, Any], as_: tuple[str, str]) -> Any:
    return await api.post(path, raw_body=raw_json(body), as_=as_, headers={"Content-Type": "application/json"})


async def assert_nothing_stored(services: Any) -> None:
    for channel in ("sm", "pm", "gm"):
        assert await services.db[channel].count_documents({}) == 0


# ---- 12.1: text that cannot be stored is a 400 naming the field, decided before the write ---------

PM = {"from": "Rose", "to": "Jack", "contentType": 1, "content": "hello"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**PM, "content": LONE}, "content"),
        ({**PM, "content": "fever " + LONE + " today"}, "content"),
        ({**PM, "to": LONE}, "to"),
        ({**PM, "to": "Ja" + LONE}, "to"),
        ({**PM, "clientMsgId": "c-" + LONE}, "clientMsgId"),
        ({**PM, "contentType": 4, "content": "https://clinic.example/" + LONE}, "content"),
    ],
)
@pytest.mark.gen_test
async def test_unstorable_pm_text_is_a_400_naming_the_field(api, services, body, field):
    response = await post_raw(api, "/api/v1/chats/pm", body, DOCTOR)
    assert_error(response, 400, "invalid_field", field=field)
    await assert_nothing_stored(services)


@pytest.mark.gen_test
async def test_unstorable_from_sm_and_gm_fields_are_400s(api, services):
    await make_group(api)
    cases = [
        ("/api/v1/chats/pm", {**PM, "from": "R" + LONE}, SERVICE, "from"),
        ("/api/v1/chats/sm", {"to": LONE, "title": "t", "contentType": 1, "content": "x"}, SERVICE, "to"),
        ("/api/v1/chats/sm", {"to": "Jack", "title": LONE, "contentType": 1, "content": "x"}, SERVICE, "title"),
        (
            "/api/v1/chats/sm",
            {"to": "Jack", "title": "t", "summary": LONE, "contentType": 1, "content": "x"},
            SERVICE,
            "summary",
        ),
        ("/api/v1/chats/gm", {"from": "Rose", "group": LONE, "contentType": 1, "content": "x"}, DOCTOR, "group"),
        (
            "/api/v1/chats/gm",
            {"from": "Rose", "group": "care-1", "at": [LONE], "contentType": 1, "content": "x"},
            DOCTOR,
            "at",
        ),
        ("/api/v1/chats/gm", {"from": "Rose", "group": "care-1", "contentType": 1, "content": LONE}, DOCTOR, "content"),
    ]
    for path, body, as_, field in cases:
        assert_error(await post_raw(api, path, body, as_), 400, "invalid_field", field=field)
    for channel in ("sm", "pm"):
        assert await services.db[channel].count_documents({}) == 0
    assert await services.db.gm.count_documents({"event": {"$exists": False}}) == 0


@pytest.mark.gen_test
async def test_unstorable_group_read_and_consultation_fields_are_400s(api, services):
    cases = [
        ("/api/v1/groups", {"id": "g" + LONE, "name": "n", "groupType": 1, "members": ["Rose"]}, "id"),
        ("/api/v1/groups", {"name": "Care " + LONE, "groupType": 1, "members": ["Rose"]}, "name"),
        ("/api/v1/groups", {"name": "n", "groupType": 1, "members": ["Rose", LONE]}, "members"),
        ("/api/v1/conversations/read", {"user_id": "Rose", "channel": "pm", "peer": LONE, "seq": 1}, "peer"),
        ("/api/v1/consultations", {"doctor": "Rose", "patient": LONE, "operator": "Rose"}, "patient"),
        ("/api/v1/consultations", {"doctor": LONE, "patient": "Jack", "operator": "Rose"}, "doctor"),
        ("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack", "operator": LONE}, "operator"),
    ]
    for path, body, field in cases:
        assert_error(await post_raw(api, path, body, SERVICE), 400, "invalid_field", field=field)
    assert await services.db.groups.count_documents({}) == 0
    assert await services.db.consultations.count_documents({}) == 0
    # In a query string an encoded surrogate is not UTF-8 at all.
    assert_error(await api.get("/api/v1/chats/pm?user_id=Rose&peer=%ED%A0%80", as_=DOCTOR), 400, field="peer")


@pytest.mark.gen_test(timeout=60)
async def test_a_poisoned_send_never_fails_the_valid_sends_batched_with_it(api, base_url, token):
    """600 parallel sends of different conversations (so they share insert batches), every 10th
    poisoned: each valid one is 201, each bad one 400 (the original code gave 511 x 500)."""
    headers = {"Authorization": f"Bearer {token('platform', 'service')}", "Content-Type": "application/json"}

    async def send(session: aiohttp.ClientSession, i: int) -> int:
        content = f"note {i} " + (LONE if i % POISON_EVERY == 0 else "ok")
        body = raw_json({"from": "Rose", "to": f"patient-{i}", "contentType": 1, "content": content})
        async with session.post(f"{base_url}/api/v1/chats/pm", data=body, headers=headers) as response:
            payload = await response.json()
            if response.status == 400:
                assert payload["error"]["code"] == "invalid_field" and "content" in payload["error"]["message"]
            return response.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=PARALLEL_SENDS)) as session:
        codes = await asyncio.gather(*[send(session, i) for i in range(PARALLEL_SENDS)])
    bad = [codes[i] for i in range(PARALLEL_SENDS) if i % POISON_EVERY == 0]
    good = [codes[i] for i in range(PARALLEL_SENDS) if i % POISON_EVERY != 0]
    assert bad == [400] * len(bad)
    assert good == [201] * len(good)
    listed = await api.get("/api/v1/chats/pm?user_id=Rose&limit=200", as_=SERVICE)
    assert listed.code == 200


@pytest.mark.gen_test
async def test_batched_inserts_attribute_an_unencodable_document_to_its_own_caller(services):
    collection = services.db.get_collection("batch_poison", write_concern=WriteConcern(j=True))
    inserts = BatchedInserts(collection)
    docs: list[dict[str, Any]] = [{"_id": f"d{i}", "text": f"t{i}"} for i in range(40)]
    docs[17]["text"] = "bad " + LONE
    docs[30]["n"] = 2**70  # BSON has no integer that large
    results = await asyncio.gather(*[inserts.insert(doc) for doc in docs], return_exceptions=True)
    assert isinstance(results[17], ENCODING_ERRORS), results[17]
    assert isinstance(results[30], ENCODING_ERRORS), results[30]
    assert [r for i, r in enumerate(results) if i not in (17, 30)] == [None] * 38
    stored = {d["_id"] async for d in collection.find({}, {"_id": 1})}
    assert stored == {f"d{i}" for i in range(40)} - {"d17", "d30"}


@pytest.mark.gen_test
async def test_batched_updates_attribute_an_unencodable_update_to_its_own_caller(services):
    updates = BatchedUpdates(services.db.batch_poison_updates)
    operations = [UpdateOne({"_id": f"k{i}"}, {"$set": {"v": f"v{i}"}}, upsert=True) for i in range(20)]
    operations[5] = UpdateOne({"_id": "k5"}, {"$set": {"v": LONE}}, upsert=True)
    results = await asyncio.gather(*[updates.update(op) for op in operations], return_exceptions=True)
    assert isinstance(results[5], ENCODING_ERRORS), results[5]
    assert [r for i, r in enumerate(results) if i != 5] == [None] * 19
    assert await services.db.batch_poison_updates.count_documents({}) == 19


@pytest.mark.gen_test
async def test_websocket_frame_with_a_surrogate_client_msg_id_gets_an_error_frame_and_stays_open(api):
    jack = await api.ws("Jack")
    frame = {"type": "pm", "to": "Rose", "contentType": 1, "content": "x", "clientMsgId": "p-" + LONE}
    await jack.conn.write_message(json.dumps(frame))
    error = await jack.recv_type("error")
    assert error["code"] == "invalid_field" and "clientMsgId" in error["message"]
    assert error["clientMsgId"] == "p-" + LONE  # echoed as a JSON escape, so the client can match it
    for bad, field in (({"to": LONE}, "to"), ({"content": LONE}, "content")):
        await jack.conn.write_message(json.dumps({**frame, "clientMsgId": f"p-{field}", **bad}))
        error = await jack.recv_type("error")
        assert (error["code"], error["clientMsgId"]) == ("invalid_field", f"p-{field}")
        assert field in error["message"]
    await jack.conn.write_message(json.dumps({"type": "read", "channel": "pm", "peer": LONE, "seq": 1}))
    error = await jack.recv_type("error")
    assert error["code"] == "invalid_field" and "peer" in error["message"]
    await jack.send({"type": "ping"})
    assert (await jack.recv_type("pong"))["type"] == "pong"
    ack = await jack.send_and_ack({**frame, "clientMsgId": "p-ok"})
    assert ack["type"] == "ack"


# ---- 12.6: system events have a key space of their own ----------------------------------------


@pytest.mark.gen_test
async def test_a_patient_cannot_suppress_consultation_ended_by_pre_claiming_its_key(api, services):
    started = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=DOCTOR)
    consultation_id = started.json["id"]
    claim = await api.post(
        "/api/v1/chats/pm",
        {
            "from": "Jack",
            "to": "Rose",
            "contentType": 1,
            "content": "gotcha",
            "clientMsgId": f"consultation.ended:{consultation_id}",
        },
        as_=PATIENT,
    )
    assert claim.code == 201
    ended = await api.post(f"/api/v1/consultations/{consultation_id}/end", {}, as_=PATIENT)
    assert ended.code == 200
    listed = (await api.get("/api/v1/chats/pm?user_id=Rose&peer=Jack", as_=DOCTOR)).json["messages"]
    assert [m.get("event") for m in listed] == ["consultation.started", None, "consultation.ended"]
    assert [m["seq"] for m in listed] == [1, 2, 3]
    for message in listed:
        assert "eventKey" not in message
        assert message.get("clientMsgId") in (None, f"consultation.ended:{consultation_id}")
    assert "clientMsgId" not in listed[0] and "clientMsgId" not in listed[2]


@pytest.mark.gen_test
async def test_a_retried_announcement_stores_one_event(api, services):
    started = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=DOCTOR)
    consultation = await services.db.consultations.find_one({"_id": started.json["id"]})
    await services.consultations._announce(consultation, "Rose", "consultation.started", "Consultation started by Rose")
    await asyncio.gather(
        *[
            services.consultations._announce(
                consultation, "Rose", "consultation.started", "Consultation started by Rose"
            )
            for _ in range(3)
        ]
    )
    assert await services.db.pm.count_documents({"event": "consultation.started"}) == 1


# ---- 12.8: a reused clientMsgId with another body is a 409 --------------------------------------


@pytest.mark.gen_test
async def test_reused_client_msg_id_with_a_different_body_is_a_409(api, services):
    await make_group(api)
    body = {"from": "Rose", "to": "Jack", "contentType": 1, "content": "once", "clientMsgId": "c-1"}
    first = await api.post("/api/v1/chats/pm", body, as_=DOCTOR)
    same = await api.post("/api/v1/chats/pm", {**body, "contentType": "1"}, as_=DOCTOR)
    assert (first.code, same.code) == (201, 200) and same.json == first.json
    for changed in ({"content": "twice?"}, {"to": "Lily"}, {"contentType": 4, "content": "https://a.example/"}):
        response = await api.post("/api/v1/chats/pm", {**body, **changed}, as_=DOCTOR)
        assert_error(response, 409, "client_msg_id_reused", field="clientMsgId")
    assert await services.db.pm.count_documents({}) == 1

    gm = {"from": "Rose", "group": "care-1", "contentType": 1, "content": "hi", "at": ["Jack"], "clientMsgId": "g-1"}
    assert (await api.post("/api/v1/chats/gm", gm, as_=DOCTOR)).code == 201
    assert (await api.post("/api/v1/chats/gm", {**gm, "at": "Jack"}, as_=DOCTOR)).code == 200
    assert_error(await api.post("/api/v1/chats/gm", {**gm, "at": ["Lily"]}, as_=DOCTOR), 409, "client_msg_id_reused")
    await make_group(api, gid="care-2")
    assert_error(await api.post("/api/v1/chats/gm", {**gm, "group": "care-2"}, as_=DOCTOR), 409, "client_msg_id_reused")

    sm = {"to": "Jack", "title": "Reminder", "summary": "s", "contentType": 1, "content": "x", "clientMsgId": "s-1"}
    assert (await api.post("/api/v1/chats/sm", sm, as_=SERVICE)).code == 201
    assert (await api.post("/api/v1/chats/sm", sm, as_=SERVICE)).code == 200
    for changed in ({"title": "Other"}, {"summary": "other"}):
        assert_error(await api.post("/api/v1/chats/sm", {**sm, **changed}, as_=SERVICE), 409, "client_msg_id_reused")
    assert await services.db.sm.count_documents({}) == 1


@pytest.mark.gen_test
async def test_reused_client_msg_id_over_websocket_is_an_error_frame(api):
    jack = await api.ws("Jack")
    frame = {"type": "pm", "to": "Rose", "contentType": 1, "content": "first", "clientMsgId": "w-1"}
    ack = await jack.send_and_ack(frame)
    assert ack["type"] == "ack"
    again = await jack.send_and_ack(frame)
    assert again["type"] == "ack" and again["message"]["id"] == ack["message"]["id"]
    reused = await jack.send_and_ack({**frame, "content": "second"})
    assert (reused["type"], reused["code"], reused["clientMsgId"]) == ("error", "client_msg_id_reused", "w-1")


# ---- 12.10: ids with invisible, control or ambiguous characters ---------------------------------

BAD_IDS = [
    "Rose\u200b",  # zero-width space
    "Ro\u0085se",  # C1 control (NEL)
    "Rose\u009f",
    "\u202eesoR",  # right-to-left override
    "Ro\u2066se\u2069",  # bidi isolate
    "Ro\u00adse",  # soft hyphen (Cf)
    "\ufeffRose",  # BOM
    "Ro\u2028se",  # line separator
    " Rose",
    "Rose ",
    "Rose\u00a0",
    "Ro\u00a0se",  # a no-break space looks like a space
    "Jose\u0301",  # not NFC (José decomposed)
    "Ro" + LONE,
]


@pytest.mark.parametrize("bad_id", BAD_IDS)
@pytest.mark.gen_test
async def test_ids_with_invisible_or_ambiguous_characters_are_400s(api, services, bad_id):
    response = await post_raw(api, "/api/v1/chats/pm", {**PM, "to": bad_id}, DOCTOR)
    assert_error(response, 400, "invalid_field", field="to")
    group = await post_raw(
        api, "/api/v1/groups", {"id": "g", "name": "n", "groupType": 1, "members": ["Rose", bad_id]}, SERVICE
    )
    assert_error(group, 400, "invalid_field", field="members")
    await assert_nothing_stored(services)


@pytest.mark.gen_test
async def test_ordinary_ids_still_work(api):
    for to in ("Jack", "张三", "José", "Rose Smith", "user-42_x.y@clinic"):
        assert (await api.post("/api/v1/chats/pm", {**PM, "to": to}, as_=DOCTOR)).code == 201, to


@pytest.mark.parametrize("bad_sub", ["Rose\u200b", "Ro\u202ese", "Rose ", "Jose\u0301"])
@pytest.mark.gen_test
async def test_a_token_whose_sub_holds_invisible_characters_is_a_401(api, settings, bad_sub):
    forged = jwt.encode(
        {"sub": bad_sub, "role": "doctor", "exp": int(time.time()) + 600}, settings.auth_secret, "HS256"
    )
    response = await api.get("/api/v1/conversations?user_id=Rose", headers={"Authorization": f"Bearer {forged}"})
    assert_error(response, 401, "unauthenticated")
    with pytest.raises(ValueError):
        mint_token(settings.auth_secret, bad_sub, "doctor")


# ---- 12.11: hyperlinks and media URLs must parse cleanly -----------------------------------------

BAD_URLS = [
    "https://clinic.example/a\tb",
    "https://clinic.example/a\nb",
    "https://clinic.example/a\rb",
    'https://clinic.example/"onmouseover="alert(1)',
    "https://clinic.example/<script>",
    "https://clinic.example/a b",
    "https://clinic.example/a\\b",
    "https://clinic.example/a^b",
    "https://clinic.example/a`b",
    "https://clinic.example/{a}",
    "https://clinic.example/a|b",
    "https://clinic.example/\u202egpj.exe",
    "https://clinic.example/\u0085",
    "https://clinic.example/\u00a0",
    "https://clinic.example@evil.example/",
    "https://clinic.example:99999/",
    "https:///no-host",
    "https:clinic.example",
    "ftp://clinic.example/x",
    " https://clinic.example/",
]


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.gen_test
async def test_urls_that_do_not_parse_cleanly_are_400s(api, services, url):
    for content_type in (4, 2, 3):
        response = await api.post("/api/v1/chats/pm", {**PM, "contentType": content_type, "content": url}, as_=DOCTOR)
        assert_error(response, 400, "invalid_field", field="content")
    await assert_nothing_stored(services)


@pytest.mark.gen_test
async def test_clean_urls_and_iris_are_accepted(api):
    for url in (
        "https://clinic.example/advice?x=1&y=%20#top",
        "http://clinic.example:8080/a/b",
        "https://例子.测试/路径?问=医生",
        "HTTPS://Clinic.Example/",
        "http://[::1]:3000/x",
    ):
        response = await api.post("/api/v1/chats/pm", {**PM, "contentType": 4, "content": url}, as_=DOCTOR)
        assert response.code == 201, (url, response.body)
