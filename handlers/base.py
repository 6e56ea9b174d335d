"""The base of every REST handler: auth, JSON in and out, and the one error envelope."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import tornado.web
from pymongo.errors import ConnectionFailure
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPHeaders, HTTPServerRequest

from handlers.errors import error_for_status, finish_with_error, to_im_error
from models.audit import asked_target, record_denied
from models.errors import IMError, InvalidField, NotFound, TooLarge, Unauthenticated
from models.principal import Principal
from models.validation import check_id, parse_json_object
from server.services import Services

log = logging.getLogger(__name__)


# A body declared (or sent) larger than the cap is read and dropped up to this many times the cap,
# and at least DRAIN_MIN_BYTES, so that the client, busy sending, reliably receives the 413.
DRAIN_FACTOR = 4
DRAIN_MIN_BYTES = 16 * 1024 * 1024
# Names of path arguments in error messages, by position (/groups/{id}/members/{user}).
PATH_ARG_NAMES = ("id", "user")


def declared_body_length(headers: HTTPHeaders) -> int | None:
    """The body size a request declares: 0 without a body, None when unknown until it ends (chunked)."""
    if "Transfer-Encoding" in headers:
        return None
    declared = headers.get("Content-Length", "0").strip()
    return int(declared) if declared.isdigit() else None  # a bad one is Tornado's 400 later


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


# Path segment -> the target name of the id after it, for access.denied entries (SPEC §13).
PATH_TARGETS = {
    "chats": "channel",
    "sm": "messageId",
    "pm": "messageId",
    "gm": "messageId",
    "groups": "group",
    "members": "user",
    "users": "user",
    "files": "fileId",
    "consultations": "consultationId",
}
HTTP_VERBS = ("get", "head", "post", "put", "patch", "delete")


def audit_refusals(method: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """A handler method whose 403s are stored as access.denied before they are answered."""

    @functools.wraps(method)
    async def wrapper(self: BaseHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            result = method(self, *args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        except IMError as exc:
            if exc.status == 403:
                await self.record_refusal()
            raise

    return wrapper


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Bodies are streamed so that a body over the cap is a 413 envelope however large it is
    (a plain handler would meet Tornado's connection-level limit first: a bare 400 and a reset)."""

    _principal_cache: Principal | None = None
    # False: a body is read without a token (only public handlers that take none).
    requires_token = True
    # Set once prepare() has let the request through to its body (see closes_connection).
    _admitted = False
    _answer_now = False

    _refusal_recorded = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for verb in HTTP_VERBS:
            if verb in cls.__dict__:
                setattr(cls, verb, audit_refusals(cls.__dict__[verb]))

    async def record_refusal(self) -> None:
        """access.denied with what was asked (path ids, query, JSON body fields), once per request."""
        principal = self._principal_cache
        if principal is None or self._refusal_recorded:
            return
        self._refusal_recorded = True
        parts = [unquote(part) for part in self.request.path.split("/")[3:]]
        pairs = zip(parts, parts[1:], strict=False)
        from_path = {PATH_TARGETS[name]: value for name, value in pairs if name in PATH_TARGETS}
        body: Any = {}
        try:
            body = json.loads(bytes(self._body)) if self._body else {}
        except ValueError:
            body = {}
        query = {name: values[0].decode("utf-8", "replace") for name, values in self.request.query_arguments.items()}
        target = asked_target(from_path, query, body if isinstance(body, dict) else {})
        await record_denied(self.services.audit, principal, "rest", target)

    def body_cap(self) -> int:
        """The largest body this handler accepts; JSON handlers share one limit."""
        return self.services.settings.limits.max_json_body_bytes

    def too_large(self) -> TooLarge:
        return TooLarge(f"body: larger than {self.body_cap()} bytes")

    def prepare(self) -> None:
        """Authenticate, check path ids (SPEC §3: "$..." is a 400) and size the body, before any body
        byte is read: an anonymous body is never read beyond a small, quickly timed-out drain.

        A refusal found here is answered once the request's small body has been read and dropped.
        Answering before that makes Tornado close the connection without saying so, and a client
        that reuses it from its keep-alive pool (aiohttp, http.client) fails its *next* request.
        A body too large (or of unknown size) to drain is refused at once with `Connection: close`.
        """
        self._body = bytearray()
        self._body_over_cap = False
        self._keep_body = True
        length = declared_body_length(self.request.headers)
        try:
            self.admit(length)
        except IMError as refusal:
            self.defer_refusal(refusal, length)
        self._admitted = True

    def admit(self, length: int | None) -> None:
        """Let a request through to its body, or raise why not (the caller defers the answer)."""
        if self.path_args or (self.requires_token and length != 0):
            self.authenticate()  # before path validation, so an anonymous caller learns nothing
        for name, value in zip(PATH_ARG_NAMES, self.path_args, strict=False):
            check_id(value, name)
        cap = self.body_cap()
        drain_cap = max(cap * DRAIN_FACTOR, DRAIN_MIN_BYTES)
        if length is not None and length > drain_cap:
            raise self.too_large()
        http = self.services.settings.http
        self.limit_body(
            cap if length is not None and length <= cap else drain_cap,
            http.body_timeout_secs if self.requires_token else http.refused_body_timeout_secs,
        )

    def defer_refusal(self, refusal: IMError, length: int | None) -> None:
        """Answer `refusal` once the body is drained, or now (closing) if it is too large to drain."""
        if length is None or length > self.services.settings.limits.max_json_body_bytes:
            self._answer_now = True
            raise refusal
        self._keep_body = False
        self.limit_body(length, self.services.settings.http.refused_body_timeout_secs)

        def answer_refusal(*_args: Any, **_kwargs: Any) -> None:
            raise refusal

        # Tornado calls the handler method for the request's verb (get, post, ...) only once the
        # body has been read: shadowing it on this instance answers the refusal then.
        setattr(self, self.request.method.lower() if self.request.method else "get", answer_refusal)

    def limit_body(self, max_bytes: int, timeout_secs: float) -> None:
        """How much body this request may send, and how long it may take (then the connection closes)."""
        if isinstance(self.request.connection, HTTP1Connection):
            self.request.connection.set_max_body_size(max_bytes)
            self.request.connection.set_body_timeout(timeout_secs)

    @property
    def closes_connection(self) -> bool:
        """True when this answer goes out before the body was read, so Tornado will close the
        connection after it (refused in prepare, or an unsupported method before prepare ran)."""
        return not self._admitted or self._answer_now

    def data_received(self, chunk: bytes) -> None:
        if self._body_over_cap or not self._keep_body:
            return
        if len(self._body) + len(chunk) > self.body_cap():
            self._body_over_cap = True
            self._body = bytearray()
            return
        self._body += chunk

    def body(self) -> bytes:
        """The request body (raises TooLarge if it passed the cap)."""
        if self._body_over_cap:
            raise self.too_large()
        return bytes(self._body)

    @property
    def services(self) -> Services:
        services: Services = self.application.settings["services"]
        return services

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def authenticate(self) -> Principal:
        """The caller from `Authorization: Bearer <jwt>`; 401 otherwise."""
        if self._principal_cache is not None:
            return self._principal_cache
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization: expected 'Bearer <token>'")
        self._principal_cache = self.services.tokens.verify(token.strip())
        self.services.directory.note_principal(self._principal_cache)  # who is a doctor (models/directory.py)
        return self._principal_cache

    def optional_principal(self) -> Principal | None:
        if "Authorization" not in self.request.headers:
            return None
        return self.authenticate()

    def json_body(self, *, optional: bool = False) -> dict[str, Any]:
        """The body as a JSON object; with optional=True an empty body is {}."""
        body = self.body()
        if optional and not body.strip():
            return {}
        return parse_json_object(body)

    def query(self) -> dict[str, str]:
        """Query arguments as single strings; a repeated argument is an error, not a list."""
        out: dict[str, str] = {}
        for name, values in self.request.query_arguments.items():
            if len(values) != 1:
                raise InvalidField(name, "given more than once")
            try:
                # Strict UTF-8: an encoded surrogate (%ED%A0%80) or a stray byte is refused here.
                out[name] = values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidField(name, "not valid UTF-8") from None
        return out

    def write_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render SPEC's envelope for every failure (handlers/errors.py); tracebacks never reach clients."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = to_im_error(exc) if exc is not None else error_for_status(status_code)
        if self.closes_connection:
            self.set_header("Connection", "close")  # so clients take a new connection for the next request
        finish_with_error(self, error)

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        log_handler_exception(self.request, typ, value, tb)


class NotFoundHandler(BaseHandler):
    """Unknown paths get the JSON envelope too."""

    requires_token = False

    def admit(self, length: int | None) -> None:
        raise NotFound(f"no such endpoint: {self.request.method} {self.request.path}")
