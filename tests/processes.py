"""Server processes started the way supervisord starts them (python run.py), for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    def __init__(self, port: int, mongo_uri: str, db_name: str, log_path: Path, **extra_env: str):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IM_")}
        self.env.update({"IM_PROFILE": "test", "IM_PORT": str(port), "IM_MONGO_URI": mongo_uri,
                         "IM_DB_NAME": db_name, "PYTHONUNBUFFERED": "1", **extra_env})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen([sys.executable, "run.py"], cwd=ROOT, env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
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


def wait_until_serving(base_url: str, timeout_secs: float = 20.0,
                       process: subprocess.Popen[bytes] | None = None) -> None:
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
        time.sleep(0.05)
