"""One typed error per condition, one renderer (handlers/errors.py) for every path (SPEC §5, §7)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import tornado.web
from pymongo.errors import AutoReconnect
from tornado.httpclient import HTTPClientError

import handlers
import models
import server
from handlers.errors import HTTPStatusError, MethodNotAllowed, error_body, error_frame, to_im_error
from models.errors import (
    BadRequest,
    DatabaseUnavailable,
    HeadersTooLarge,
    IMError,
    InternalError,
    InvalidField,
    NotFound,
)
from server.http_guard import headers_too_large_answer
from tests.helpers import SERVICE
from tests.processes import ROOT

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# SPEC §5's statuses; plus 405 (a verb a path does not take, Tornado's), 416 (a file Range that
# selects nothing, docs/files.md) and 500 (a bug: InternalError, no details).
ALLOWED_STATUSES = {400, 401, 403, 404, 409, 413, 429, 431, 503} | {405, 416, 500}
# The wire codes clients and tests match on: a class's code never changes.
PINNED_CODES = {
    "IMError": "bad_request",
    "BadRequest": "bad_request",
    "InvalidField": "invalid_field",
    "InvalidBody": "invalid_body",
    "Unauthenticated": "unauthenticated",
    "TokenLifetimeTooLong": "token_lifetime_too_long",
    "Forbidden": "forbidden",
    "NotAMember": "not_a_member",
    "NotFound": "not_found",
    "Conflict": "conflict",
    "ClientMsgIdReused": "client_msg_id_reused",
    "GroupExists": "group_exists",
    "GroupFull": "group_full",
    "GroupBusy": "group_busy",
    "ConsultationOpen": "consultation_open",
    "ConsultationClosed": "consultation_closed",
    "NotADoctor": "not_a_doctor",
    "PatientIsDoctor": "patient_is_doctor",
    "TooLarge": "too_large",
    "RangeNotSatisfiable": "range_not_satisfiable",
    "RateLimited": "rate_limited",
    "TooManyConnections": "too_many_connections",
    "HeadersTooLarge": "headers_too_large",
    "MethodNotAllowed": "method_not_allowed",
    "InternalError": "internal_error",
    "HTTPStatusError": "internal_server_error",
    "DatabaseUnavailable": "database_unavailable",
    "AccountSuspended": "account_suspended",  # SPEC §17
    "EventNotFound": "event_not_found",  # SPEC §11 admin retry
    "EventNotFailed": "event_not_failed",
    "TokenRevoked": "token_revoked",  # SPEC §17
    "WindowExpired": "window_expired",  # SPEC §14
    "NotEditable": "not_editable",
    "MessageRecalled": "message_recalled",
    "MessageBusy": "message_busy",
    "HoldNotFound": "hold_not_found",  # SPEC §15
    "UnknownHoldTarget": "unknown_hold_target",
    "PurgeRunning": "purge_running",
    "LeaseLost": "purge_running",  # the purge lost its lease to another process
}


def every_error_class() -> list[type[IMError]]:
    """IMError and every subclass defined anywhere in models/, server/ and handlers/."""
    for package in (models, server, handlers):
        for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found: list[type[IMError]] = [IMError]
    for cls in found:
        found.extend(sub for sub in cls.__subclasses__() if sub not in found)
    return [cls for cls in found if cls.__module__.split(".")[0] in ("models", "server", "handlers")]


def test_every_error_class_has_a_snake_case_code_and_a_spec_status():
    classes = every_error_class()
    assert {cls.__name__ for cls in classes} == set(PINNED_CODES), "a new error class: pin its code here"
    for cls in classes:
        assert SNAKE_CASE.match(cls.code), cls
        assert cls.status in ALLOWED_STATUSES, cls
        assert cls.code == PINNED_CODES[cls.__name__], cls


def test_no_raise_site_passes_a_code_string():
    """Each condition is its own class; `raise Conflict(..., code="x")` is the pattern this replaced."""
    raise_with_code = re.compile(r"raise \w+\((?:[^()]|\([^()]*\))*\b(code|status)=", re.DOTALL)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("models", "server", "handlers")
        for path in (Path(ROOT) / folder).glob("*.py")
        if raise_with_code.search(path.read_text())
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "error",
    [
        InvalidField("to", "must not start with '$'"),
        NotFound("no such file: /sdk/x.js"),
        DatabaseUnavailable(),
        HeadersTooLarge("request headers: larger than 8192 bytes"),
        InternalError(),
    ],
)
def test_body_and_frame_carry_the_same_code_and_message(error):
    assert error_body(error) == {"error": {"code": error.code, "message": error.message}}
    assert error_frame(error) == {"type": "error", **error_body(error)["error"]}
    assert error_frame(error, "c-1") == {"type": "error", **error_body(error)["error"], "clientMsgId": "c-1"}


def test_to_im_error_types_every_exception():
    typed = InvalidField("limit", "must be an integer")
    assert to_im_error(typed) is typed
    assert isinstance(to_im_error(AutoReconnect("down")), DatabaseUnavailable)
    assert isinstance(to_im_error(tornado.web.HTTPError(405)), MethodNotAllowed)
    assert error_body(to_im_error(tornado.web.HTTPError(405))) == {
        "error": {"code": "method_not_allowed", "message": "Method Not Allowed"}
    }
    assert isinstance(to_im_error(tornado.web.HTTPError(400, "Missing argument x")), BadRequest)
    assert to_im_error(tornado.web.HTTPError(404)).code == "not_found"
    unnamed = to_im_error(tornado.web.HTTPError(418))
    assert isinstance(unnamed, HTTPStatusError) and unnamed.status == 418 and SNAKE_CASE.match(unnamed.code)
    bug = to_im_error(KeyError("secret-field"))
    assert isinstance(bug, InternalError) and "secret" not in json.dumps(error_body(bug))
    assert to_im_error(tornado.web.HTTPError(500, "at /srv/secret")).message == "internal error"


def test_the_431_answer_is_the_same_envelope():
    answer = headers_too_large_answer(8192)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert json.loads(body) == error_body(HeadersTooLarge("request headers: larger than 8192 bytes"))


@pytest.mark.gen_test
async def test_rest_and_websocket_answer_one_error_alike(api):
    """The same bad send over REST and over the socket: one code, one message."""
    bad = {"to": "$where", "contentType": 1, "content": "hi"}
    rest = await api.post("/api/v1/chats/pm", {"from": "Jack", **bad}, as_=("Jack", "patient"))
    assert rest.code == 400
    assert rest.json == error_body(InvalidField("to", "must not start with '$'"))
    jack = await api.ws("Jack")
    await jack.send({"type": "pm", "clientMsgId": "c-1", **bad})
    frame = await jack.recv_type("error")
    assert frame == error_frame(InvalidField("to", "must not start with '$'"), "c-1")


@pytest.mark.gen_test
async def test_refused_handshake_and_rest_answer_one_error_alike(api):
    rest = await api.get("/api/v1/conversations?user_id=Jack", headers={"Authorization": "Bearer not-a-jwt"})
    with pytest.raises(HTTPClientError) as refused:
        await api.ws("Jack", token="not-a-jwt")
    assert (rest.code, refused.value.code) == (401, 401)
    assert json.loads(refused.value.response.body) == rest.json
    assert rest.json["error"]["code"] == "unauthenticated"


@pytest.mark.gen_test
async def test_static_files_and_unknown_paths_answer_the_envelope(api):
    missing = await api.get("/sdk/no-such.js")
    assert missing.code == 404
    assert missing.json == error_body(NotFound("no such file: /sdk/no-such.js"))
    unknown = await api.get("/api/v1/nope", as_=SERVICE)
    assert unknown.code == 404
    assert unknown.json == error_body(NotFound("no such endpoint: GET /api/v1/nope"))
    verb = await api.request("DELETE", "/api/v1/status", as_=SERVICE)
    assert verb.code == 405
    assert verb.json == error_body(MethodNotAllowed("Method Not Allowed"))
