"""The one error renderer: any exception → a typed IMError → SPEC §5's envelope or SPEC §7's frame.

Every path that answers a failure goes through here: REST `write_error` (handlers/base.py), the
refused WebSocket handshake and error frames (handlers/ws.py), /sdk/ files (handlers/sdk_files.py);
server/http_guard.py writes its 431 from the same error_body (see models/errors.py for why that
lives beside the errors). A client therefore sees the same code and message for the same error
whichever way it asked, and never a traceback.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus

import tornado.web
from pymongo.errors import PyMongoError

from models.errors import (
    BadRequest,
    Conflict,
    DatabaseUnavailable,
    Forbidden,
    IMError,
    InternalError,
    NotFound,
    error_body,
    error_frame,
)

__all__ = [
    "HTTPStatusError",
    "code_for_status",
    "MethodNotAllowed",
    "error_body",
    "error_for_status",
    "error_frame",
    "error_json",
    "finish_with_error",
    "reason_phrase",
    "to_im_error",
]


class MethodNotAllowed(IMError):
    """A verb the path does not take (Tornado's HTTPError(405))."""

    status = 405
    code = "method_not_allowed"


class HTTPStatusError(IMError):
    """A status Tornado raised that no condition above names: its code is derived from the status
    (reason phrase in snake_case), as it always was on the wire."""

    status = 500
    code = "internal_server_error"

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.code = code_for_status(status)


# Tornado's HTTPError statuses that a domain condition already names, with the same code.
STATUS_ERRORS: dict[int, type[IMError]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
}


def reason_phrase(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "error"


def code_for_status(status_code: int) -> str:
    """The reason phrase in snake_case ("Method Not Allowed" → method_not_allowed)."""
    return re.sub(r"[^a-z0-9]+", "_", reason_phrase(status_code).lower()).strip("_")


def error_for_status(status_code: int, message: str | None = None) -> IMError:
    """The typed error for an HTTP status (a Tornado HTTPError, or send_error without one)."""
    if status_code >= 500:
        return InternalError()  # a server fault: no details for the client
    error_class = STATUS_ERRORS.get(status_code)
    text = message or reason_phrase(status_code)
    return error_class(text) if error_class is not None else HTTPStatusError(status_code, text)


def to_im_error(exc: BaseException | None) -> IMError:
    """The error a client sees for exc: itself if typed, 503 for the database, the status's error for
    a Tornado HTTPError, InternalError (500, no details) for anything else."""
    if isinstance(exc, IMError):
        return exc
    if isinstance(exc, PyMongoError):
        return DatabaseUnavailable()
    if isinstance(exc, tornado.web.HTTPError):
        return error_for_status(exc.status_code, exc.log_message)
    return InternalError()


def error_json(error: IMError) -> str:
    """The envelope as the body of an HTTP answer."""
    return json.dumps(error_body(error), ensure_ascii=False)


def finish_with_error(handler: tornado.web.RequestHandler, error: IMError) -> None:
    """Answer an HTTP request (REST, /sdk/, a refused handshake) with error's status and envelope."""
    handler.set_status(error.status)
    handler.set_header("Content-Type", "application/json; charset=UTF-8")
    handler.finish(error_json(error))
