"""Shared fixtures: a real nx-27017 per test session, a fresh database per test, the real app."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient

from server.app import make_app
from server.auth import mint_token
from server.config import Settings, load_settings
from server.db import create_client, ensure_indexes
from server.services import build_services
from tests.helpers import Api

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nx_27017_command(port: int, data_dir: Path) -> list[str]:
    executable = shutil.which("nx-27017", path=str(Path(sys.executable).parent)) or "nx-27017"
    return [executable, "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
            "--log-file", str(data_dir / "nx.log"), "--pid-file", str(data_dir / "nx.pid")]


class MongoProcess:
    """An nx-27017 server on a free port with its own data directory."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(nx_27017_command(self.port, self.data_dir),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_mongo(self.uri)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for_mongo(uri: str, timeout_secs: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_secs
    while True:
        client: MongoClient[dict[str, object]] = MongoClient(uri, serverSelectionTimeoutMS=500)
        try:
            client.admin.command("ping")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            client.close()


@pytest.fixture(scope="session")
def mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoProcess]:
    server = MongoProcess(tmp_path_factory.mktemp("nx-27017"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(mongo: MongoProcess) -> Settings:
    """The test profile on this session's database server, with a database of the test's own."""
    return load_settings({
        "IM_PROFILE": "test",
        "IM_MONGO_URI": mongo.uri,
        "IM_DB_NAME": f"t_{uuid.uuid4().hex[:12]}",
    })


@pytest.fixture
def services(settings, io_loop):
    client = create_client(settings)
    built = build_services(settings, client)
    io_loop.run_sync(lambda: ensure_indexes(built.db))
    yield built

    async def settle() -> None:
        for socket in built.hub.all_sockets():  # sockets the test left open
            socket.close()
        await asyncio.sleep(0.05)  # their on_close queues presence writes
        await built.presence.drain()

    io_loop.run_sync(settle)
    io_loop.run_sync(lambda: client.drop_database(settings.db_name))
    io_loop.run_sync(client.close)


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
