"""make_app: the Tornado application with its URL table and shared services."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import tornado.web
from tornado import httputil

from handlers.routes import default_handlers
from server.http_guard import SECURITY_HEADERS, SERVER_NAME, content_security_policy
from server.metrics import Metrics, route_label
from server.services import Services

access_log = logging.getLogger("im.access")
SDK_DIR = Path(__file__).resolve().parent.parent / "sdk"


def make_request_logger(
    log_successes: bool, metrics: Metrics | None = None, routes: dict[type, str] | None = None
) -> Callable[[tornado.web.RequestHandler], None]:
    """Access log with the path only: the query string may carry a token (/ws?token=...).

    Also observes im_http_request_duration_seconds, labelled by the route's URL pattern (`routes`:
    handler class → pattern), never the raw path with its ids.
    """
    success_level = logging.INFO if log_successes else logging.DEBUG
    route_of = routes or {}

    def log_request(handler: tornado.web.RequestHandler) -> None:
        status = handler.get_status()
        request = handler.request
        seconds = request.request_time()
        method = request.method or "?"
        if metrics is not None:
            metrics.observe_request(method, route_of.get(type(handler), "unmatched"), status, seconds)
        level = success_level if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        if access_log.isEnabledFor(level):
            access_log.log(
                level,
                "%d %s %s %.1fms",
                status,
                method,
                request.path,
                1000.0 * seconds,
                # Fields of a JSON log line (server/lifecycle.py): the path only, never the query
                # (/ws?token=...); duration in seconds.
                extra={"method": method, "path": request.path, "status": status, "duration": round(seconds, 6)},
            )

    return log_request


class SecurityHeaders(tornado.web.OutputTransform):
    """Adds SECURITY_HEADERS, a Content-Security-Policy and our Server name to every answer, whichever
    handler wrote it (REST, StaticFileHandler's /sdk/ files, a refused WebSocket handshake)."""

    def transform_first_chunk(
        self, status_code: int, headers: httputil.HTTPHeaders, chunk: bytes, finishing: bool
    ) -> tuple[int, httputil.HTTPHeaders, bytes]:
        # `in` then set, not setdefault: HTTPHeaders' setdefault raises and catches a KeyError per
        # missing name, four per answer.
        for name, value in SECURITY_HEADERS.items():
            if name not in headers:
                headers[name] = value
        # A handler with a stricter page policy of its own keeps it. A 304 carries no Content-Type, and
        # browsers merge its headers into the cached page: a resource policy there would block the
        # page's own scripts after a reload, so the cached answer keeps the policy it came with.
        if status_code != 304 and "Content-Security-Policy" not in headers:
            headers["Content-Security-Policy"] = content_security_policy(headers.get("Content-Type", ""))
        headers["Server"] = SERVER_NAME  # not "TornadoServer/<version>"
        return status_code, headers, chunk


def make_app(services: Services) -> tornado.web.Application:
    from handlers.base import NotFoundHandler

    settings = services.settings
    handlers = default_handlers(SDK_DIR)
    routes = {rule[1]: route_label(rule[0]) for rule in handlers}
    return tornado.web.Application(
        handlers,
        services=services,
        log_function=make_request_logger(settings.access_log, services.metrics, routes),
        default_handler_class=NotFoundHandler,
        websocket_max_message_size=64 * 1024,  # SPEC §7: larger frames close with 1009
        # No websocket_ping_interval: server/transport.py's Heartbeat pings every socket from one
        # timer (Tornado's costs a task and a timer per socket).
        # Given explicitly, transforms replace compress_response=True's gzip: name both.
        transforms=[tornado.web.GZipContentEncoding, SecurityHeaders],
    )
