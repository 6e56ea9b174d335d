"""Shared fixtures: a real nx-27017 per test session, a fresh database per test, the real app."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest

from server.app import make_app
from server.auth import mint_token
from server.config import Settings, load_settings
from server.db import create_client, ensure_indexes
from server.services import build_services
from tests.helpers import TEARDOWN_TIMEOUT_SECS, Api, wait_until
from tests.processes import ROOT, MongoProcess, ServerProcess, free_port


@pytest.fixture(scope="session")
def mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoProcess]:
    server = MongoProcess(tmp_path_factory.mktemp("nx-27017"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(mongo: MongoProcess) -> Settings:
    """The test profile on this session's database server, with a database of the test's own."""
    return load_settings(
        {
            "IM_PROFILE": "test",
            "IM_MONGO_URI": mongo.uri,
            "IM_DB_NAME": f"t_{uuid.uuid4().hex[:12]}",
        }
    )


SERVER_CODE = tuple(str(ROOT / package) for package in ("server", "handlers", "models"))


def is_server_task(task: asyncio.Task[object]) -> bool:
    """A task running this project's code (not the driver's monitors, which live as long as the client)."""
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.startswith(SERVER_CODE)


@pytest.fixture
def services(settings, io_loop):
    client = create_client(settings)
    built = build_services(settings, client)
    io_loop.run_sync(lambda: ensure_indexes(built.db))
    yield built

    async def settle() -> None:
        for handler in built.hub.all_sockets():  # sockets the test left open
            handler.close()
        # Their on_close unregisters them and queues presence writes; then those writes are done.
        await wait_until(
            lambda: built.hub.socket_count == 0, timeout=10, message="sockets still registered after close"
        )
        await built.presence.drain()
        # Work of the server's own that closed sockets left running (a backlog page in flight stops
        # at its next page): let it end before the database goes, rather than destroy it pending.
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and is_server_task(t)]
        if leftover:
            await asyncio.wait(leftover, timeout=5)

    io_loop.run_sync(settle, timeout=TEARDOWN_TIMEOUT_SECS)
    io_loop.run_sync(lambda: client.drop_database(settings.db_name), timeout=TEARDOWN_TIMEOUT_SECS)
    io_loop.run_sync(client.close, timeout=TEARDOWN_TIMEOUT_SECS)


@pytest.fixture
def app(services):
    return make_app(services)


@pytest.fixture
def token(settings):
    """token(sub, role) -> a valid JWT for this test's secret."""

    def mint(sub: str, role: str = "patient", ttl_secs: int = 3600) -> str:
        return mint_token(settings.auth_secret, sub, role, ttl_secs)

    return mint


@pytest.fixture
def api(http_client, base_url, token, io_loop) -> Iterator[Api]:
    client = Api(http_client, base_url, token)
    yield client

    async def close_all() -> None:
        for conn in client.sockets:
            conn.close()
        for conn in client.sockets:  # until the close handshake ends and the socket is closed
            try:
                while await asyncio.wait_for(conn.read_message(), 1.0) is not None:
                    pass
            except (TimeoutError, asyncio.CancelledError):
                pass

    io_loop.run_sync(close_all)


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for server processes a test starts itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IM_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def cluster(mongo, tmp_path):
    """Two server processes started exactly as the test profile starts them: no IM_CHANGE_STREAMS."""
    db_name = f"c_{uuid.uuid4().hex[:10]}"
    processes = [ServerProcess(free_port(), mongo.uri, db_name, tmp_path / f"server-{i}.log") for i in range(2)]
    for process in processes:
        process.start()
    yield processes
    for process in processes:
        process.stop()
