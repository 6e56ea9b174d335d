"""Processes for end-to-end tests: servers started the way supervisord starts them (python run.py), nx-27017."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pymongo import MongoClient

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    def __init__(self, port: int, mongo_uri: str, db_name: str, log_path: Path, **extra_env: str):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IM_")}
        self.env.update(
            {
                "IM_PROFILE": "test",
                "IM_PORT": str(port),
                "IM_MONGO_URI": mongo_uri,
                "IM_DB_NAME": db_name,
                "PYTHONUNBUFFERED": "1",
                **extra_env,
            }
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "run.py"], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        if wait:
            try:
                wait_until_serving(self.base_url, process=self.process)
            except (TimeoutError, RuntimeError) as exc:
                self.kill()
                raise RuntimeError(f"{exc}\n{self.log_text()[-4000:]}") from None
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the sockets; clients see the TCP connection die."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(12)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_until_serving(
    base_url: str, timeout_secs: float = 20.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_secs
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(base_url + "/api/v1/status", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} did not start serving within {timeout_secs}s")
        time.sleep(0.05)  # polling another process, bounded by the deadline: nothing to await


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nx_27017_command(port: int, data_dir: Path) -> list[str]:
    executable = shutil.which("nx-27017", path=str(Path(sys.executable).parent)) or "nx-27017"
    return [
        executable,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-file",
        str(data_dir / "nx.log"),
        "--pid-file",
        str(data_dir / "nx.pid"),
    ]


class MongoProcess:
    """An nx-27017 server on a free port with its own data directory."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            nx_27017_command(self.port, self.data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
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
            time.sleep(0.1)  # polling another process, bounded by the deadline: nothing to await
        finally:
            client.close()
