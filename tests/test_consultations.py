"""Consultations (SPEC §6) and presence."""

from __future__ import annotations

import pytest

from tests.helpers import DOCTOR, PATIENT, SERVICE, assert_error, make_group, wait_until


@pytest.mark.gen_test
async def test_doctor_starts_and_patient_ends_with_events_in_real_time(api):
    rose, jack = await api.ws("Rose", "doctor"), await api.ws("Jack")
    started = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=DOCTOR)
    assert started.code == 201, started.body
    consultation = started.json
    assert consultation["status"] == "open" and consultation["startedBy"] == "Rose"
    assert consultation["endedAt"] is None and consultation["endedBy"] is None
    for socket in (rose, jack):
        event = (await socket.recv_type("message"))["message"]
        assert event["channel"] == "pm" and event["event"] == "consultation.started"
        assert event["from"] == "Rose" and event["to"] == "Jack"
        assert event["consultationId"] == consultation["id"] and event["content"]

    ended = await api.post(f"/api/v1/consultations/{consultation['id']}/end", {}, as_=PATIENT)
    assert ended.code == 200 and ended.json["status"] == "closed" and ended.json["endedBy"] == "Jack"
    for socket in (rose, jack):
        event = (await socket.recv_type("message"))["message"]
        assert (event["event"], event["from"], event["to"]) == ("consultation.ended", "Jack", "Rose")
    again = await api.post(f"/api/v1/consultations/{consultation['id']}/end", {}, as_=DOCTOR)
    assert_error(again, 409, "consultation_closed")


@pytest.mark.gen_test
async def test_service_names_the_operator_and_events_reach_the_backlog(api):
    # Rose has used no token here: the platform declares her a doctor (models/directory.py).
    declared = await api.request("PUT", "/api/v1/users/Rose/role", {"role": "doctor"}, as_=SERVICE)
    assert declared.code == 200 and declared.json["role"] == "doctor"
    started = await api.post(
        "/api/v1/consultations", {"doctor": "Rose", "patient": "Jack", "operator": "nurse-amy"}, as_=SERVICE
    )
    assert started.code == 201 and started.json["startedBy"] == "nurse-amy"
    missing = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Lily"}, as_=SERVICE)
    assert_error(missing, 400, field="operator")
    jack = await api.ws("Jack")  # was offline: gets the event from the backlog
    event = (await jack.recv_type("message"))["message"]
    assert event["event"] == "consultation.started" and event["from"] == "nurse-amy"
    assert (event["to"], event["doctor"], event["patient"]) == ("Rose", "Rose", "Jack")
    conversations = (await api.get("/api/v1/conversations?user_id=Jack", as_=PATIENT)).json["conversations"]
    assert conversations[0]["peer"] == "Rose"


@pytest.mark.gen_test
async def test_consultation_rules(api):
    as_other = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=("Bob", "doctor"))
    assert_error(as_other, 403)
    named = await api.post(
        "/api/v1/consultations", {"doctor": "Rose", "patient": "Jack", "operator": "Bob"}, as_=DOCTOR
    )
    assert_error(named, 403, field="operator")
    assert_error(await api.post("/api/v1/consultations", {"doctor": "Rose"}, as_=DOCTOR), 400, field="patient")
    first = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=PATIENT)
    assert first.code == 201 and first.json["startedBy"] == "Jack"
    second = await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=DOCTOR)
    assert_error(second, 409, "consultation_open")
    stranger_end = await api.post(f"/api/v1/consultations/{first.json['id']}/end", {}, as_=("Bob", "doctor"))
    assert_error(stranger_end, 403)
    assert_error(await api.post("/api/v1/consultations/000000000000000000000000/end", {}, as_=DOCTOR), 404)
    assert_error(await api.post("/api/v1/consultations/..%2F/end", {}, as_=DOCTOR), 404)


@pytest.mark.gen_test
async def test_list_consultations_by_user_and_status(api):
    one = (await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=DOCTOR)).json
    await api.post(f"/api/v1/consultations/{one['id']}/end", {}, as_=DOCTOR)
    two = (await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Jack"}, as_=DOCTOR)).json
    await api.post("/api/v1/consultations", {"doctor": "Rose", "patient": "Lily"}, as_=DOCTOR)
    mine = (await api.get("/api/v1/consultations?user_id=Jack", as_=PATIENT)).json["consultations"]
    assert [c["id"] for c in mine] == [two["id"], one["id"]]
    open_ = (await api.get("/api/v1/consultations?user_id=Rose&status=open", as_=DOCTOR)).json["consultations"]
    assert len(open_) == 2 and all(c["status"] == "open" for c in open_)
    assert_error(await api.get("/api/v1/consultations?user_id=Rose", as_=PATIENT), 403)
    assert_error(await api.get("/api/v1/consultations?user_id=Jack&status=x", as_=PATIENT), 400, field="status")


@pytest.mark.gen_test
async def test_presence_follows_sockets_and_is_private_for_patients(api, services):
    offline = await api.get("/api/v1/users/Jack/presence", as_=DOCTOR)
    assert offline.json == {"user": "Jack", "online": False, "lastSeen": None}
    first, second = await api.ws("Jack"), await api.ws("Jack")
    assert (await api.get("/api/v1/users/Jack/presence", as_=DOCTOR)).json["online"] is True
    first.close()
    await wait_until(lambda: services.hub.count_sockets("Jack") == 1)  # the server has seen the close
    await services.presence.drain()
    assert (await api.get("/api/v1/users/Jack/presence", as_=DOCTOR)).json["online"] is True
    second.close()
    await wait_until(lambda: not services.hub.is_online("Jack"))
    await services.presence.drain()
    gone = (await api.get("/api/v1/users/Jack/presence", as_=DOCTOR)).json
    assert gone["online"] is False and gone["lastSeen"].endswith("Z")

    assert (await api.get("/api/v1/users/Jack/presence", as_=PATIENT)).code == 200
    assert_error(await api.get("/api/v1/users/Rose/presence", as_=PATIENT), 403)
    await api.send_pm("Rose", "Jack", "hello")
    await api.send_pm("Jack", "Rose", "hello doctor", role="patient")  # both took part
    assert (await api.get("/api/v1/users/Rose/presence", as_=PATIENT)).code == 200
    await make_group(api, members=("Jack", "Lily"))
    assert (await api.get("/api/v1/users/Lily/presence", as_=PATIENT)).code == 200
    assert_error(await api.get("/api/v1/users/%24ne/presence", as_=DOCTOR), 400, field="id")
