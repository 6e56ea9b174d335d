"""The real process: start-up log lines, graceful SIGTERM, and supervisord restarting it after SIGKILL."""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from tornado.websocket import websocket_connect

from server import __version__
from server.auth import mint_token
from tests.processes import ROOT, ServerProcess, free_port, wait_until_serving

TEST_SECRET = "test-secret-0123456789abcdef0123456789"


@pytest.fixture
def server(mongo, tmp_path):
    process = ServerProcess(free_port(), mongo.uri, f"p_{uuid.uuid4().hex[:10]}", tmp_path / "server.log")
    yield process
    process.stop()


def test_start_up_logs_the_two_lines_in_order(server):
    server.start()
    lines = server.log_text().splitlines()
    starting = next(i for i, line in enumerate(lines) if "Starting IM server" in line)
    assert starting == 0, lines[:3]  # the first lines a newcomer sees
    assert re.search(
        rf"Starting IM server, version {re.escape(__version__)}, running on port {server.port}, "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$",
        lines[starting],
    )
    assert lines[starting + 1].endswith("Configuration profile: test")
    with urllib.request.urlopen(server.base_url + "/api/v1/status") as response:
        status = json.load(response)
    assert status["version"] == __version__ and status["profile"] == "test" and status["db"] == {"ok": True}


@pytest.mark.gen_test(timeout=30)
async def test_sigterm_closes_sockets_with_1001_and_exits_0(server):
    server.start()
    token = mint_token(TEST_SECRET, "Jack", "patient")
    conn = await websocket_connect(f"ws://127.0.0.1:{server.port}/ws?token={token}")
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert await conn.read_message() is None
    assert conn.close_code == 1001
    conn.close()
    assert server.wait(10) == 0
    assert time.monotonic() - started < 10
    assert token not in server.log_text()  # tokens never reach the logs


def supervisord_config_for_test(tmp_path: Path, server_port: int, mongo_port: int) -> Path:
    """The project's supervisord.conf, with its paths, ports and profile moved into tmp_path."""
    parser = configparser.RawConfigParser()
    parser.read(ROOT / "supervisord.conf")
    here = str(ROOT)
    for section in parser.sections():
        for key, value in parser.items(section):
            parser.set(section, key, value.replace("%(here)s/var", str(tmp_path)).replace("%(here)s", here))
    parser.set("unix_http_server", "file", str(tmp_path / "supervisor.sock"))
    parser.set("supervisorctl", "serverurl", f"unix://{tmp_path}/supervisor.sock")
    mongo = parser.get("program:mongo", "command").replace("--port 27017", f"--port {mongo_port}")
    parser.set("program:mongo", "command", mongo)
    parser.set(
        "program:im",
        "environment",
        f'IM_PROFILE="test",IM_PORT="{server_port}",IM_MONGO_URI="mongodb://127.0.0.1:{mongo_port}",'
        'PYTHONUNBUFFERED="1"',
    )
    (tmp_path / "mongo").mkdir(exist_ok=True)
    (tmp_path / "log").mkdir(exist_ok=True)
    path = tmp_path / "supervisord.conf"
    with open(path, "w") as out:
        parser.write(out)
    return path


def supervisorctl(config: Path, *args: str) -> str:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout


def wait_for_running(config: Path, *programs: str, timeout_secs: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_secs
    while True:
        status = supervisorctl(config, "status")
        if all(re.search(rf"^{name}\s+RUNNING", status, re.M) for name in programs):
            return
        assert time.monotonic() < deadline, status
        time.sleep(0.2)  # polling supervisord, bounded by the deadline: nothing to await


@pytest.mark.slow
def test_supervisord_restarts_the_server_after_sigkill(tmp_path):
    port, mongo_port = free_port(), free_port()
    config = supervisord_config_for_test(tmp_path, port, mongo_port)
    supervisord = subprocess.Popen(
        [str(Path(sys.executable).parent / "supervisord"), "-n", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", timeout_secs=40)
        wait_for_running(config, "im", "mongo")
        pid = int(supervisorctl(config, "pid", "im").strip())
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until_serving(f"http://127.0.0.1:{port}", timeout_secs=5)
        assert time.monotonic() - killed_at < 5
        assert int(supervisorctl(config, "pid", "im").strip()) != pid
    finally:
        supervisord.send_signal(signal.SIGTERM)
        supervisord.wait(30)


@pytest.mark.gen_test(timeout=30)
async def test_sigterm_marks_the_users_of_closed_sockets_offline(server):
    server.start()
    jack_token = mint_token(TEST_SECRET, "Jack", "patient")
    conn = await websocket_connect(f"ws://127.0.0.1:{server.port}/ws?token={jack_token}")
    server.signal(signal.SIGTERM)
    assert await conn.read_message() is None
    assert server.wait(10) == 0
    conn.close()
    later = ServerProcess(free_port(), server.env["IM_MONGO_URI"], server.env["IM_DB_NAME"], server.log_path).start()
    try:
        rose_token = mint_token(TEST_SECRET, "Rose", "doctor")
        request = urllib.request.Request(
            later.base_url + "/api/v1/users/Jack/presence", headers={"Authorization": f"Bearer {rose_token}"}
        )
        with urllib.request.urlopen(request) as response:
            presence = json.load(response)
        assert presence["online"] is False and presence["lastSeen"]
    finally:
        later.stop()
