"""Start the system under test as separate processes, and small helpers every scenario shares.

A Stack is one nx-27017 (fresh temporary data directory, free port) plus one `python run.py` with
IM_PROFILE=test on another free port, both on 127.0.0.1. Both get RLIMIT_NOFILE raised to the hard
limit. They are stopped by PID (SIGTERM, then SIGKILL after a grace period) and the data directory
is removed; nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# BENCH_SERVER_ROOT=DIR: run the server of another checkout (e.g. `git worktree add /tmp/before
# <commit>`) under the same load, for before/after figures side by side.
SERVER_ROOT = Path(os.environ.get("BENCH_SERVER_ROOT") or ROOT).resolve()
TEST_CONF = tomllib.loads((ROOT / "conf" / "test.toml").read_text(encoding="utf-8"))
SECRET = os.environ.get("IM_AUTH_SECRET") or TEST_CONF["auth_secret"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(wanted: int = 1 << 20) -> int:
    """Raise this process's open-file limit as far as the hard limit allows; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    raise_nofile()
    os.setsid()  # own process group: a Ctrl-C in the terminal reaches the bench, which stops us by PID


def token(sub: str, role: str = "patient", ttl_secs: int = 6 * 3600) -> str:
    from server.auth import mint_token

    return mint_token(SECRET, sub, role, ttl_secs)


def _stop_pid(proc: subprocess.Popen[bytes] | None, grace: float = 12.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _http_json(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class Stack:
    """nx-27017 + the IM server (test profile), each in its own process."""

    def __init__(self, label: str = "bench", server_env: dict[str, str] | None = None):
        self.label = label
        self.server_env = dict(server_env or {})  # e.g. {"IM_CHANGE_STREAMS": "auto"}
        self.tmp = Path(tempfile.mkdtemp(prefix=f"im-{label}-"))
        self.mongo_port = free_port()
        self.port = free_port()
        self.mongo_uri = f"mongodb://127.0.0.1:{self.mongo_port}"
        self.db_name = f"bench_{uuid.uuid4().hex[:10]}"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.nx: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        # BENCH_PROFILE=DIR: py-spy records the server and nx-27017 for their whole lives (raw stacks).
        self.profile_dir = Path(os.environ["BENCH_PROFILE"]) if os.environ.get("BENCH_PROFILE") else None
        self._spies: list[subprocess.Popen[bytes]] = []
        self._server_starts = 0
        self._admin = token("bench-admin", "admin")

    # ---- lifecycle ----------------------------------------------------------------------------

    def start_mongo(self) -> None:
        data = self.tmp / "nx"
        data.mkdir()
        exe = shutil.which("nx-27017", path=str(Path(PYTHON).parent)) or "nx-27017"
        cmd = [
            exe,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.mongo_port),
            "--data-dir",
            str(data),
            "--log-file",
            str(self.tmp / "nx.log"),
            "--pid-file",
            str(self.tmp / "nx.pid"),
        ]
        with open(self.tmp / "nx.err", "wb") as err:  # the child keeps its own copy of the descriptor
            self.nx = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_child_setup, cwd=self.tmp
            )
        from pymongo import MongoClient

        deadline = time.monotonic() + 30
        while True:
            client: MongoClient[dict[str, Any]] = MongoClient(self.mongo_uri, serverSelectionTimeoutMS=300)
            try:
                client.admin.command("ping")
            except Exception:
                if self.nx.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nx-27017 did not start; see {self.tmp / 'nx.err'}") from None
                time.sleep(0.1)
            else:
                self._spy(self.nx.pid, "nx")
                return
            finally:
                client.close()

    def spawn_server(
        self, port: int, extra_env: dict[str, str] | None = None, log_name: str = "server.log"
    ) -> subprocess.Popen[bytes]:
        """Start one `python run.py` (test profile) on `port` against this Stack's nx-27017 and database."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("IM_")}
        env.update(
            {
                "IM_PROFILE": "test",
                "IM_PORT": str(port),
                "IM_MONGO_URI": self.mongo_uri,
                "IM_DB_NAME": self.db_name,
                "IM_AUTH_SECRET": SECRET,
                "PYTHONUNBUFFERED": "1",
                **self.server_env,
                **(extra_env or {}),
            }
        )
        with open(self.tmp / log_name, "ab") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                [PYTHON, str(SERVER_ROOT / "run.py")],
                cwd=SERVER_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup,
            )

    def wait_up(self, proc: subprocess.Popen[bytes], base_url: str, log_name: str = "server.log") -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                _http_json(base_url + "/api/v1/status", timeout=1)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start:\n" + self.server_log_tail(log_name=log_name)) from None
                time.sleep(0.1)

    def start_server(self) -> None:
        self.server = self.spawn_server(self.port)
        self.wait_up(self.server, self.base_url)
        self._server_starts += 1
        self._spy(self.server.pid, f"server{self._server_starts}")

    def _spy(self, pid: int, name: str) -> None:
        if self.profile_dir is None:
            return
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{self.label}-{name}.txt"
        exe = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or "py-spy"
        with open(str(out) + ".log", "wb") as err:  # the child keeps its own copy of the descriptor
            self._spies.append(
                subprocess.Popen(
                    # nx-27017 with --idle too: its time waiting on SQLite/fsync shows as well as its CPU.
                    [
                        exe,
                        "record",
                        "-p",
                        str(pid),
                        "-r",
                        "97",
                        "--format",
                        "raw",
                        "-o",
                        str(out),
                        *(["--idle"] if name == "nx" else []),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )

    def _stop_spies(self) -> None:
        for spy in self._spies:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in self._spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
        self._spies = []

    def restart_server(self) -> None:
        """A fresh server process on the same database (clean RSS baseline)."""
        _stop_pid(self.server)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.start_server()

    def stop(self) -> None:
        self._stop_spies()
        _stop_pid(self.server)
        _stop_pid(self.nx)
        if os.environ.get("BENCH_KEEP"):
            print(f"bench: kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Stack:
        try:
            self.start_mongo()
            self.start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- observing ----------------------------------------------------------------------------

    def server_log_tail(self, lines: int = 30, log_name: str = "server.log") -> str:
        try:
            return "\n".join((self.tmp / log_name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = _http_json(
            self.base_url + "/api/v1/status", {"Authorization": f"Bearer {self._admin}"}, timeout=10
        )
        return data

    def db_operations(self) -> dict[str, float] | None:
        """Database commands the server has sent so far, by command name (its /metrics; None when
        metrics are off)."""
        request = urllib.request.Request(self.base_url + "/metrics", headers={"Authorization": f"Bearer {self._admin}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except (urllib.error.URLError, TimeoutError, OSError):
            return None
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("im_db_operation_duration_seconds_count{"):
                labels, value = line.rsplit(" ", 1)
                command = labels.split('command="', 1)[1].split('"', 1)[0]
                counts[command] = counts.get(command, 0.0) + float(value)
        return counts

    def wait_sockets(self, count: int, timeout: float = 60.0, exact: bool = True) -> int:
        """Wait until the server's hub holds `count` sockets (or at least, when exact is False)."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            try:
                seen = self.status()["connections"]["sockets"]
            except (urllib.error.URLError, TimeoutError, OSError):
                continue  # a busy server answers late; ask again
            if seen == count or (not exact and seen >= count):
                return int(seen)
            time.sleep(0.2)
        if os.environ.get("BENCH_DEBUG"):
            print(f"bench: wait_sockets({count}) gave up at {seen}", file=sys.stderr)
        return int(seen)

    def wait_quiet(self, name: str = "nx", below_pct: float = 20.0, timeout: float = 30.0) -> float:
        """Wait until a process of the stack uses less than below_pct of a core over 0.5 s; returns the wait."""
        proc = self.procs()[name]
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if proc.cpu_percent(interval=0.5) < below_pct:
                break
        return round(time.monotonic() - t0, 1)

    def procs(self) -> dict[str, psutil.Process]:
        assert self.server is not None and self.nx is not None
        return {"server": psutil.Process(self.server.pid), "nx": psutil.Process(self.nx.pid)}

    def mongo(self) -> Any:
        from pymongo import MongoClient

        return MongoClient(self.mongo_uri, tz_aware=True)[self.db_name]


class CpuMeter:
    """CPU seconds used by the server, nx-27017 and this load generator over a phase."""

    def __init__(self, stack: Stack, extra: dict[str, psutil.Process] | None = None):
        self.stack = stack
        self.procs = {**stack.procs(), "loadgen": psutil.Process(), **(extra or {})}
        self.start: dict[str, float] = {}
        self.wall0 = 0.0

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def __enter__(self) -> CpuMeter:
        self.ops0 = self.stack.db_operations()
        self.wall0 = time.perf_counter()
        self.start = {k: self._cpu(p) for k, p in self.procs.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.used = {k: self._cpu(p) - self.start[k] for k, p in self.procs.items()}
        ops1 = self.stack.db_operations()
        self.ops_by_command = (
            {name: n - self.ops0.get(name, 0.0) for name, n in ops1.items() if n > self.ops0.get(name, 0.0)}
            if ops1 is not None and self.ops0 is not None
            else None
        )
        self.ops = sum(self.ops_by_command.values()) if self.ops_by_command is not None else None

    def summary(self, messages: int | None = None) -> dict[str, float]:
        """CPU seconds per process and as a share of one core over the wall time; with messages,
        also server and database CPU µs per message and database operations per message."""
        out = {f"cpu_{k}_s": round(v, 2) for k, v in self.used.items()}
        out.update({f"cpu_{k}_pct": round(100 * v / self.wall, 1) for k, v in self.used.items()})
        if messages:
            out["server_us_per_msg"] = round(1e6 * self.used["server"] / messages)
            out["db_us_per_msg"] = round(1e6 * self.used["nx"] / messages)
            if self.ops is not None and self.ops_by_command is not None:
                out["db_ops_per_msg"] = round(self.ops / messages, 2)
                by_command = sorted(self.ops_by_command.items(), key=lambda item: -item[1])
                out["db_ops_per_msg_by_command"] = {name: round(n / messages, 3) for name, n in by_command}
        return out


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def latency_figures(seconds: list[float], prefix: str = "lat") -> dict[str, float]:
    return {
        f"{prefix}_p50_ms": round(1000 * percentile(seconds, 50), 1),
        f"{prefix}_p95_ms": round(1000 * percentile(seconds, 95), 1),
        f"{prefix}_p99_ms": round(1000 * percentile(seconds, 99), 1),
        f"{prefix}_max_ms": round(1000 * max(seconds), 1) if seconds else float("nan"),
    }


def ws_connect_kwargs() -> dict[str, Any]:
    """websockets client options: no client pings (the server pings), no compression, big frames ok."""
    return {"ping_interval": None, "compression": None, "max_size": 2**22, "open_timeout": 120, "close_timeout": 5}
