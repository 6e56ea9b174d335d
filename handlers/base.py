"""The base of every REST handler: auth, JSON in and out, and the one error envelope."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import tornado.web
from pymongo.errors import ConnectionFailure, PyMongoError
from tornado.httputil import HTTPServerRequest

from models.validation import check_id, parse_json_object
from server.auth import Principal, verify_token
from server.errors import (
    DatabaseUnavailable,
    IMError,
    NotFound,
    TooLarge,
    Unauthenticated,
    error_envelope,
)
from server.services import Services

log = logging.getLogger(__name__)


def as_im_error(exc: BaseException) -> IMError | None:
    """The client-facing error for an exception, or None for an unexpected one (a 500)."""
    if isinstance(exc, IMError):
        return exc
    if isinstance(exc, PyMongoError):
        return DatabaseUnavailable()
    return None


# Names of path arguments in error messages, by position (/groups/{id}/members/{user}).
PATH_ARG_NAMES = ("id", "user")


def log_handler_exception(request: HTTPServerRequest, typ: Any, value: BaseException | None, tb: Any) -> None:
    """Log a failed request by method and path only: query strings may carry tokens (/ws?token=)."""
    if isinstance(value, IMError):
        return  # expected; the access log line records the status
    if isinstance(value, ConnectionFailure):
        log.warning("%s %s: database unavailable: %s", request.method, request.path, value)
    elif isinstance(value, tornado.web.HTTPError):
        log.warning("%d %s %s", value.status_code, request.method, request.path)
    else:
        log.error("uncaught exception in %s %s", request.method, request.path, exc_info=value)


class BaseHandler(tornado.web.RequestHandler):
    _principal_cache: Principal | None = None

    def prepare(self) -> None:
        """Path ids obey the rules of body ids (SPEC §3: "$..." and the like are 400, never a query).

        Authentication comes first so that an anonymous caller learns nothing from validation.
        """
        if self.path_args:
            self.authenticate()
            for name, value in zip(PATH_ARG_NAMES, self.path_args, strict=False):
                check_id(value, name)

    @property
    def services(self) -> Services:
        services: Services = self.application.settings["services"]
        return services

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def check_body_size(self) -> None:
        limit = self.services.settings.limits.max_json_body_bytes
        if len(self.request.body) > limit:
            raise TooLarge(f"body: larger than {limit} bytes")

    def authenticate(self) -> Principal:
        """The caller from `Authorization: Bearer <jwt>`; 401 otherwise."""
        if self._principal_cache is not None:
            return self._principal_cache
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization: expected 'Bearer <token>'")
        self._principal_cache = verify_token(token.strip(), self.services.settings.auth_secret)
        return self._principal_cache

    def optional_principal(self) -> Principal | None:
        if "Authorization" not in self.request.headers:
            return None
        return self.authenticate()

    def json_body(self) -> dict[str, Any]:
        self.check_body_size()
        return parse_json_object(self.request.body)

    def query(self) -> dict[str, str]:
        """Query arguments as single strings; a repeated argument is an error, not a list."""
        out: dict[str, str] = {}
        for name, values in self.request.query_arguments.items():
            if len(values) != 1:
                raise IMError(f"{name}: given more than once", code="invalid_field")
            try:
                out[name] = values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise IMError(f"{name}: not valid UTF-8", code="invalid_field") from None
        return out

    def write_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render SPEC's envelope for every failure; tracebacks never reach clients."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        im_error = as_im_error(exc) if exc is not None else None
        if im_error is not None:
            self.set_status(im_error.status)
            body = im_error.envelope()
        elif isinstance(exc, tornado.web.HTTPError):
            body = error_envelope(_code_for_status(status_code), exc.log_message or _reason(status_code))
        else:
            body = error_envelope(_code_for_status(status_code), _reason(status_code))
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(body, ensure_ascii=False))

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        log_handler_exception(self.request, typ, value, tb)


class NotFoundHandler(BaseHandler):
    """Unknown paths get the JSON envelope too."""

    def prepare(self) -> None:
        raise NotFound(f"no such endpoint: {self.request.method} {self.request.path}")


def _reason(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "error"


def _code_for_status(status_code: int) -> str:
    return _reason(status_code).lower().replace(" ", "_").replace("-", "_")
