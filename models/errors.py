"""Domain errors and the one error envelope shared by REST responses and WebSocket frames."""

from __future__ import annotations

from typing import Any


class IMError(Exception):
    """Base of every error a client may see: an HTTP status, a snake_case code and a message."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.code, self.message)


class InvalidField(IMError):
    """Bad input in one named field."""

    code = "invalid_field"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidBody(IMError):
    code = "invalid_body"


class Unauthenticated(IMError):
    status = 401
    code = "unauthenticated"


class Forbidden(IMError):
    status = 403
    code = "forbidden"


class NotFound(IMError):
    status = 404
    code = "not_found"


class Conflict(IMError):
    status = 409
    code = "conflict"


class TooLarge(IMError):
    status = 413
    code = "too_large"


class RateLimited(IMError):
    status = 429
    code = "rate_limited"


class DatabaseUnavailable(IMError):
    status = 503
    code = "database_unavailable"

    def __init__(self, message: str = "the database is unavailable; retry shortly"):
        super().__init__(message)


class ClientMsgIdReused(Conflict):
    """A clientMsgId sent again with a different message (SPEC §4): a 409, never a silent drop."""

    code = "client_msg_id_reused"


def error_envelope(code: str, message: str) -> dict[str, Any]:
    """SPEC §5: {"error": {"code", "message"}}."""
    return {"error": {"code": code, "message": message}}
