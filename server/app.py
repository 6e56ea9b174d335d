"""make_app: the Tornado application with its URL table and shared services."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import tornado.web

from handlers.routes import default_handlers
from server.services import Services

access_log = logging.getLogger("im.access")
SDK_DIR = Path(__file__).resolve().parent.parent / "sdk"


def make_request_logger(log_successes: bool) -> Callable[[tornado.web.RequestHandler], None]:
    """Access log with the path only: the query string may carry a token (/ws?token=...)."""
    success_level = logging.INFO if log_successes else logging.DEBUG

    def log_request(handler: tornado.web.RequestHandler) -> None:
        status = handler.get_status()
        level = success_level if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        if access_log.isEnabledFor(level):
            access_log.log(level, "%d %s %s %.1fms", status, handler.request.method, handler.request.path,
                           1000.0 * handler.request.request_time())

    return log_request


def make_app(services: Services) -> tornado.web.Application:
    from handlers.base import NotFoundHandler

    settings = services.settings
    return tornado.web.Application(
        default_handlers(SDK_DIR),
        services=services,
        log_function=make_request_logger(settings.access_log),
        default_handler_class=NotFoundHandler,
        websocket_max_message_size=64 * 1024,  # SPEC §7: larger frames close with 1009
        websocket_ping_interval=settings.ping_interval_secs,
        websocket_ping_timeout=settings.ping_timeout_secs,
        compress_response=True,
    )
