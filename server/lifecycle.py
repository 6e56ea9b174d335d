"""Process lifecycle: start-up in a fixed order, and a graceful SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal
import sys
from contextlib import AsyncExitStack

from pymongo.errors import ConnectionFailure, PyMongoError
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from server import __version__
from server.app import make_app
from server.config import ConfigError, Settings, load_settings
from server.db import create_client, ensure_indexes, wait_for_database
from server.fanout import change_streams_supported
from server.http_guard import make_http_server
from server.services import Services, build_services

log = logging.getLogger("im.server")

LOG_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
WS_GOING_AWAY = 1001
# Pending TCP connections the kernel keeps for us: a reconnect storm arrives faster than accept().
LISTEN_BACKLOG = 4096
INFLIGHT_DRAIN_SECS = 4.0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
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
    configure_logging(settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 0


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
        client = create_client(settings)
        stack.push_async_callback(client.close)
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
        services = build_services(settings, client, follow_other_processes=follow)
        await services.conversations.upgrade_summaries()  # once: summaries older than issue 13
        services.presence.start_heartbeat()
        if services.fanout is not None:
            services.fanout.start()
            stack.push_async_callback(services.fanout.stop)
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


async def shutdown(server: HTTPServer, services: Services) -> None:
    """Stop accepting, let in-flight writes finish, close sockets with 1001, then the database."""
    server.stop()
    try:
        await asyncio.wait_for(services.messages.inflight.wait_idle(), INFLIGHT_DRAIN_SECS)
    except TimeoutError:
        log.warning("shutdown: %d sends still in flight", services.messages.inflight.count)
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
