"""Process lifecycle: start-up in a fixed order, and a graceful SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import sys
from contextlib import AsyncExitStack
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, PyMongoError
from pythonjsonlogger.json import JsonFormatter
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from server import __version__
from server.app import make_app
from server.config import ConfigError, Settings, load_settings
from server.db import create_client, ensure_indexes, wait_for_database
from server.fanout import change_streams_supported
from server.http_guard import make_http_server
from server.metrics import Metrics
from server.services import Services, build_services

log = logging.getLogger("im.server")

LOG_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
WS_GOING_AWAY = 1001
# Pending TCP connections the kernel keeps for us: a reconnect storm arrives faster than accept().
LISTEN_BACKLOG = 4096
INFLIGHT_DRAIN_SECS = 4.0
# The driver's close ends its pooled server sessions first: with the database down that waits out
# server selection, and about one SIGTERM in thirty then never finished closing (nor, once
# cancelled, let asyncio's own clean-up finish). Past this the process exits without it.
CLIENT_CLOSE_SECS = 3.0
_abandoned: set[asyncio.Task[None]] = set()  # a close given up on: main() exits without waiting


def configure_logging(level: str, log_format: str = "text") -> None:
    """Text lines, or with log_format "json" one JSON object per line (SPEC §17): time, level,
    logger, message, plus the fields a record carries (the access log's method, path, status,
    duration in seconds). Messages never hold tokens or message content, whichever format."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    if log_format == "json":
        formatter = JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601 UTC
            json_ensure_ascii=False,
        )
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter)
    # Tornado's own access log would print full URIs (and so /ws?token=...): ours prints paths only.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)


def main() -> int:
    """Entry point of `python run.py` (what supervisord runs)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    runner = asyncio.Runner()
    try:
        code = runner.run(serve(settings))
    except KeyboardInterrupt:
        code = 0
    if _abandoned:  # everything is stored or given up; cancelling the stuck close could hang forever
        logging.shutdown()
        os._exit(code)
    runner.close()
    return code


async def serve(settings: Settings) -> int:
    """Bind, announce, reach the database, then serve until SIGTERM.

    The port is bound first so that the two pinned start-up lines are the first in the log and a
    port conflict fails at once; connections wait in the kernel's backlog until the application
    is ready to accept them.
    """
    try:
        sockets = bind_sockets(settings.port, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        log.error("cannot listen on port %d: %s", settings.port, exc)
        return 1
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    log.info("Starting IM server, version %s, running on port %d, %s", __version__, settings.port, now)
    log.info("Configuration profile: %s", settings.profile)
    async with AsyncExitStack() as stack:
        metrics = Metrics(settings.metrics.enabled)
        client = create_client(settings, metrics.command_listeners())
        stack.push_async_callback(close_client, client)
        try:
            await wait_for_database(client, settings.db_startup_timeout_secs)
            await ensure_indexes(client[settings.db_name])
        except PyMongoError as exc:
            log.error(
                "cannot use the database (db %s) after %.0fs: %s",
                settings.db_name,
                settings.db_startup_timeout_secs,
                exc,
            )
            return 1
        follow = settings.change_streams == "auto" and await change_streams_supported(client[settings.db_name])
        services = build_services(settings, client, follow_other_processes=follow, metrics=metrics)
        try:
            await services.accounts.load()  # before serving: no suspended token slips through at start
        except PyMongoError as exc:
            log.error("cannot read the accounts (db %s): %s", settings.db_name, exc)
            return 1
        if follow:  # the other processes' suspends and revokes (server/accounts.py)
            services.accounts.start()
            stack.push_async_callback(services.accounts.stop)
        await services.conversations.upgrade_summaries()  # once: summaries older than issue 13
        await services.presence.start_heartbeat()
        if services.fanout is not None:
            services.fanout.start()
            stack.push_async_callback(services.fanout.stop)
        if services.webhooks is not None:  # SPEC §11: the outbox's dispatcher (stopped before the client closes)
            await services.webhooks.ensure_indexes()
            services.webhooks.start()
            stack.push_async_callback(services.webhooks.stop)
        # SPEC §15: a purge now (in the background, under the database lease), then every interval.
        services.retention.start()
        stack.push_async_callback(services.retention.stop)
        server = make_http_server(make_app(services), settings)
        server.add_sockets(sockets)
        log.info("serving; database %s ready", settings.db_name)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("shutting down")
        try:
            await asyncio.wait_for(shutdown(server, services), settings.shutdown_timeout_secs)
        except TimeoutError:
            log.warning("shutdown took over %.0fs; stopping anyway", settings.shutdown_timeout_secs)
        log.info("stopped")
    return 0


async def close_client(client: AsyncMongoClient[dict[str, Any]]) -> None:
    """The database client's close, bounded like every other step of shutting down."""
    closing = asyncio.ensure_future(client.close())
    closing.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved: no noise
    await asyncio.wait([closing], timeout=CLIENT_CLOSE_SECS)
    if not closing.done():
        _abandoned.add(closing)
        log.warning("shutdown: the database client did not close within %.0fs; exiting without it", CLIENT_CLOSE_SECS)


async def shutdown(server: HTTPServer, services: Services) -> None:
    """Stop accepting, let in-flight writes finish, close sockets with 1001, then the database."""
    server.stop()
    try:
        await asyncio.wait_for(services.messages.inflight.wait_idle(), INFLIGHT_DRAIN_SECS)
    except TimeoutError:
        log.warning("shutdown: %d sends still in flight", services.messages.inflight.count)
    services.heartbeat.stop()
    for socket in services.hub.all_sockets():
        socket.close(WS_GOING_AWAY, "server shutting down")
    await services.presence.withdraw()  # lastSeen of every user whose socket just closed
    try:
        await asyncio.wait_for(server.close_all_connections(), 2.0)
    except TimeoutError:
        pass
    except ConnectionFailure:
        pass


if __name__ == "__main__":
    sys.exit(main())
