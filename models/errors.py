"""Domain errors: one class per condition a client may see, each carrying its code and HTTP status.

Raise sites name the condition (`raise GroupExists(...)`), never a code string; the class says
what the client sees. handlers/errors.py renders them (SPEC §5's envelope, SPEC §7's error frame)
for every path: REST answers, the refused WebSocket handshake, error frames, static files, and
the 431 that server/http_guard.py writes itself. Codes are a wire contract: clients and tests
match on them, so a class's code never changes.
"""

from __future__ import annotations

from typing import Any


class IMError(Exception):
    """Base of every error a client may see: an HTTP status, a snake_case code and a message."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# ---- 400 -----------------------------------------------------------------------------------------


class BadRequest(IMError):
    """A request Tornado could not take as it came (what its HTTPError(400) becomes)."""


class InvalidField(IMError):
    """Bad input in one named field; the message starts with the field's name."""

    code = "invalid_field"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidBody(IMError):
    """A body (or frame) that is not a JSON object, or holds what cannot be stored."""

    code = "invalid_body"


# ---- 401 / 403 -----------------------------------------------------------------------------------


class Unauthenticated(IMError):
    status = 401
    code = "unauthenticated"


class Forbidden(IMError):
    status = 403
    code = "forbidden"


class NotAMember(Forbidden):
    """The caller (or the `from` it names) is not a member of the group."""

    code = "not_a_member"


class WindowExpired(Forbidden):
    """A sender's recall or edit after [messages] recall_window_secs / edit_window_secs (SPEC §14)."""

    code = "window_expired"


# ---- 404 -----------------------------------------------------------------------------------------


class NotFound(IMError):
    status = 404
    code = "not_found"


# ---- 409 -----------------------------------------------------------------------------------------


class Conflict(IMError):
    status = 409
    code = "conflict"


class ClientMsgIdReused(Conflict):
    """A clientMsgId sent again with a different message (SPEC §4): a 409, never a silent drop."""

    code = "client_msg_id_reused"


class GroupExists(Conflict):
    """A group created with an id that is already taken."""

    code = "group_exists"


class GroupFull(Conflict):
    """Adding these members would take the group past [limits] max_group_members."""

    code = "group_full"


class GroupBusy(Conflict):
    """The membership kept changing under us (other processes); the caller may retry."""

    code = "group_busy"


class ConsultationOpen(Conflict):
    """The doctor and patient already have an open consultation."""

    code = "consultation_open"


class ConsultationClosed(Conflict):
    """The consultation has already ended."""

    code = "consultation_closed"


class NotADoctor(Conflict):
    """The `doctor` named is not known as a doctor (no doctor token seen, no staff declaration)."""

    code = "not_a_doctor"


class PatientIsDoctor(Conflict):
    """The `patient` named is known as a doctor."""

    code = "patient_is_doctor"


class NotEditable(Conflict):
    """An event message (consultation, group, recall or edit notice): never recalled or edited (SPEC §14)."""

    code = "not_editable"


class MessageRecalled(Conflict):
    """An edit of a message that has been recalled (SPEC §14)."""

    code = "message_recalled"


class MessageBusy(Conflict):
    """The message kept changing under an edit (other processes editing it); the caller may retry."""

    code = "message_busy"


# ---- 413 / 416 / 429 / 431 -----------------------------------------------------------------------


class TooLarge(IMError):
    status = 413
    code = "too_large"


class RangeNotSatisfiable(IMError):
    """A file download's Range selects nothing of the file (docs/files.md)."""

    status = 416
    code = "range_not_satisfiable"


class RateLimited(IMError):
    status = 429
    code = "rate_limited"


class TooManyConnections(RateLimited):
    """A WebSocket handshake over the per-user or server-wide connection cap."""

    code = "too_many_connections"


class HeadersTooLarge(IMError):
    """Request headers over [http] max_header_bytes (answered by server/http_guard.py)."""

    status = 431
    code = "headers_too_large"


# ---- 5xx -----------------------------------------------------------------------------------------


class InternalError(IMError):
    """A bug: the client learns nothing more than that (details go to the log only)."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str = "internal error"):
        super().__init__(message)


class DatabaseUnavailable(IMError):
    status = 503
    code = "database_unavailable"

    def __init__(self, message: str = "the database is unavailable; retry shortly"):
        super().__init__(message)


# ---- wire forms ----------------------------------------------------------------------------------
# Defined here, beside the errors, because server/http_guard.py renders a 431 itself and server/
# may not import handlers/ (pyproject's import contracts); handlers/errors.py is where every
# adapter takes them from.


def error_body(error: IMError) -> dict[str, Any]:
    """SPEC §5's envelope: {"error": {"code", "message"}}."""
    return {"error": {"code": error.code, "message": error.message}}


def error_frame(error: IMError, client_msg_id: str | None = None) -> dict[str, Any]:
    """SPEC §7's frame: {"type": "error", "code", "message", "clientMsgId"?} (the id of the send it answers)."""
    frame: dict[str, Any] = {"type": "error", "code": error.code, "message": error.message}
    if client_msg_id is not None:
        frame["clientMsgId"] = client_msg_id
    return frame
