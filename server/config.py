"""Profile → frozen, validated Settings. Fails fast: a bad profile never starts half-configured."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PROFILES = ("dev", "test", "prod")
DEFAULT_PROFILE = "dev"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MIN_SECRET_CHARS = 16


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line meant for stderr."""


@dataclasses.dataclass(frozen=True)
class Limits:
    max_json_body_bytes: int = 65536
    max_content_chars: int = 8000
    max_file_bytes: int = 10 * 1024 * 1024
    send_rate_per_sec: float = 20.0
    send_burst: int = 40
    max_connections_per_user: int = 20
    max_connections_total: int = 20000


@dataclasses.dataclass(frozen=True)
class Settings:
    profile: str
    port: int
    mongo_uri: str
    db_name: str
    auth_secret: str
    log_level: str = "INFO"
    # "*" admits every browser Origin; otherwise exact origins such as "https://clinic.example".
    allowed_origins: tuple[str, ...] = ("*",)
    write_concern_j: bool = True
    write_concern_w: int | str | None = None
    limits: Limits = Limits()
    ping_interval_secs: float = 20.0
    ping_timeout_secs: float = 15.0
    # How long start-up waits for the database before giving up (supervisord then restarts us).
    db_startup_timeout_secs: float = 30.0
    # "auto": deliver messages stored by other processes through change streams when the database
    # offers them (a replica set, or nx-27017); "off": this process's own messages only.
    change_streams: str = "auto"
    # Log every request (method, path, status, time); when false only 4xx/5xx are logged.
    access_log: bool = True
    shutdown_timeout_secs: float = 8.0

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests lower limits this way)."""
        return dataclasses.replace(self, **changes)


def _number_from_env(env: Mapping[str, str], name: str, convert: Callable[[str], Any], default: Any,
                     expected: str) -> Any:
    """The environment's value of name converted, or default when it is unset."""
    text = env.get(name)
    if text is None:
        return default
    try:
        return convert(text)
    except ValueError:
        raise ConfigError(f"invalid {name} {text!r}: expected {expected}") from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read conf/<IM_PROFILE>.toml and apply IM_* environment overrides."""
    env = os.environ if env is None else env
    profile = env.get("IM_PROFILE") or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ConfigError(
            f"invalid IM_PROFILE {profile!r}: expected one of {', '.join(PROFILES)}"
        )
    path = CONF_DIR / f"{profile}.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from exc

    port = _number_from_env(env, "IM_PORT", int, raw.get("port", 3000), "an integer")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"invalid port {port!r}: expected 1-65535")

    secret = env.get("IM_AUTH_SECRET") or raw.get("auth_secret") or ""
    if not secret:
        raise ConfigError(f"no auth secret for profile {profile!r}: set IM_AUTH_SECRET")
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"IM_AUTH_SECRET is too short: use at least {MIN_SECRET_CHARS} characters")

    db_startup_timeout = _number_from_env(env, "IM_DB_STARTUP_TIMEOUT_SECS", float,
                                          raw.get("db_startup_timeout_secs", 30.0), "seconds")

    change_streams = env.get("IM_CHANGE_STREAMS") or raw.get("change_streams", "auto")
    if change_streams not in ("auto", "off"):
        raise ConfigError(f"invalid change_streams {change_streams!r}: expected auto or off")

    write_concern = raw.get("write_concern", {})
    websocket = raw.get("websocket", {})
    try:
        limits = Limits(**raw.get("limits", {}))
    except TypeError as exc:
        raise ConfigError(f"bad [limits] in {path}: {exc}") from None
    ping_interval = float(websocket.get("ping_interval_secs", 20))
    ping_timeout = float(websocket.get("ping_timeout_secs", 15))
    if not 0 < ping_timeout <= ping_interval:
        raise ConfigError(f"bad [websocket] in {path}: ping_timeout_secs must be > 0 and <= ping_interval_secs")
    return Settings(
        profile=profile,
        port=port,
        mongo_uri=env.get("IM_MONGO_URI") or raw.get("mongo_uri", "mongodb://127.0.0.1:27017"),
        db_name=env.get("IM_DB_NAME") or raw.get("db_name", "im"),
        auth_secret=secret,
        log_level=str(raw.get("log_level", "INFO")).upper(),
        allowed_origins=tuple(raw.get("allowed_origins", ["*"])),
        write_concern_j=bool(write_concern.get("j", True)),
        write_concern_w=write_concern.get("w"),
        limits=limits,
        ping_interval_secs=ping_interval,
        ping_timeout_secs=ping_timeout,
        db_startup_timeout_secs=float(db_startup_timeout),
        change_streams=change_streams,
        access_log=bool(raw.get("access_log", True)),
    )
