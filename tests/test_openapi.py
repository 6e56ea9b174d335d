"""The OpenAPI document is complete and true: schemathesis drives every operation of a real server.

The server runs as a real process (tests/processes.py) on the session's nx-27017, because
schemathesis calls it synchronously (requests) and would block an in-process IOLoop. Each
operation gets EXAMPLES_PER_OPERATION generated requests (valid and invalid bodies, queries and
paths) with a service token; every answer must be a non-5xx, a status code the document lists for
that operation, and a body that matches the documented schema (the error envelope included).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from handlers.openapi import OPENAPI_DOCUMENT
from handlers.routes import default_handlers
from server.auth import mint_token
from tests.processes import ServerProcess, free_port

TEST_SECRET = "test-secret-0123456789abcdef0123456789"
EXAMPLES_PER_OPERATION = 15
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_server(mongo, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("openapi")
    process = ServerProcess(free_port(), mongo.uri, f"oa_{uuid.uuid4().hex[:10]}", log_dir / "server.log")
    process.start()
    yield process
    process.stop()
    log = process.log_text()
    assert "Traceback" not in log and " [ERROR] " not in log, log[-4000:]  # no 5xx, no crash


@pytest.fixture(scope="module")
def http_session():
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {mint_token(TEST_SECRET, 'platform', 'service')}"
        yield session


# The document as the server module builds it; test_document_is_served_as_json checks that the
# server serves exactly this. (Loading it lazily from the live server through
# schemathesis.pytest.from_fixture needs a pytest attribute that pytest 9 removed.)
schema = schemathesis.openapi.from_dict(OPENAPI_DOCUMENT)


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_conforms_to_the_document(case, live_server, http_session):
    case.call_and_validate(base_url=live_server.base_url, session=http_session, checks=CHECKS, timeout=15)


def test_document_describes_every_rest_route():
    documented = {path for path in OPENAPI_DOCUMENT["paths"]}
    routed = set()
    for route in default_handlers(Path("sdk")):
        pattern = route[0]
        if not pattern.startswith("/api/"):
            continue
        if pattern == "/api/v1/chats/(sm|pm|gm)":
            routed.update(f"/api/v1/chats/{channel}" for channel in ("sm", "pm", "gm"))
            continue
        first, *rest = pattern.split("([^/]+)")  # path arguments are {id}, then {user}
        routed.add(first + "".join(name + part for name, part in zip(["{id}", "{user}"], rest, strict=False)))
    assert routed == documented


def test_document_is_served_as_json(live_server):
    response = requests.get(live_server.base_url + "/api/v1/openapi.json", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["openapi"].startswith("3.") and body == OPENAPI_DOCUMENT
    assert body["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
