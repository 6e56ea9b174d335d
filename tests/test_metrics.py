"""GET /metrics (SPEC §17): the Prometheus exposition, parsed as Prometheus would, and who may read it."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import MetricsSettings
from server.metrics import route_label
from tests.helpers import DOCTOR, assert_error


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_routes_are_labelled_by_pattern_never_by_raw_path():
    assert route_label(r"/api/v1/groups/([^/]+)/members/([^/]+)") == "/api/v1/groups/{id}/members/{user}"
    assert route_label(r"/api/v1/chats/(sm|pm|gm)") == "/api/v1/chats/{channel}"
    assert route_label(r"/sdk/(.*)") == "/sdk/{path}"


@pytest.mark.gen_test(timeout=30)
async def test_metrics_count_stored_messages_connections_and_request_durations_by_route(api, services):
    await services.db.webhook_events.insert_many([{"status": "pending"}, {"status": "pending"}, {"status": "failed"}])
    sock = await api.ws("Jack")
    await api.send_pm("Rose", "Jack", "hello")
    await sock.recv_type("message")
    await api.get("/api/v1/groups/some-group-id", as_=DOCTOR)  # a 404 with an id in its path

    response = await api.get("/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.body.decode())

    stored = {s.labels["channel"]: s.value for s in found["im_messages_stored_total"]}
    assert stored["pm"] == 1
    assert found["im_websocket_connections"][0].value == 1
    durations = found["im_http_request_duration_seconds_count"]
    routes = {(s.labels["method"], s.labels["route"], s.labels["status"]) for s in durations}
    assert ("POST", "/api/v1/chats/{channel}", "201") in routes
    assert ("GET", "/api/v1/groups/{id}", "404") in routes
    assert not any("some-group-id" in s.labels["route"] for s in durations)
    outbox = {s.labels["status"]: s.value for s in found["im_webhook_events"]}
    assert outbox == {"pending": 2, "failed": 1, "delivered": 0}
    families = {f.name for f in text_string_to_metric_families(response.body.decode())}
    assert {"im_backlog_messages_sent", "im_rate_limit_refusals", "im_db_operation_duration_seconds"} <= families


@pytest.mark.gen_test(timeout=30)
async def test_closed_metrics_need_an_admin_token(api, services):
    services.settings = services.settings.replace(metrics=MetricsSettings(enabled=True, public=False))  # as in prod
    assert_error(await api.get("/metrics"), 401)
    assert_error(await api.get("/metrics", as_=DOCTOR), 403, "forbidden")
    assert (await api.get("/metrics", as_=("ops", "admin"))).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_disabled_metrics_observe_nothing_and_answer_404(api, services):
    services.settings = services.settings.replace(metrics=MetricsSettings(enabled=False, public=True))
    services.metrics.enabled = False
    await api.send_pm("Rose", "Jack", "hello")
    assert_error(await api.get("/metrics"), 404)
    assert services.metrics.messages_stored.labels("pm")._value.get() == 0
