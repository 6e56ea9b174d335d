"""Profile → frozen, validated Settings. Fails fast: a bad profile never starts half-configured."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PROFILES = ("dev", "test", "prod")
DEFAULT_PROFILE = "dev"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MIN_SECRET_CHARS = 16
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line meant for stderr."""


def setting(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] = (),
    non_empty: bool = False,
    normalize: Callable[[Any], Any] | None = None,
    from_file: bool = True,
) -> Any:
    """A field with the checks load_settings applies to its file value and IM_* variable alike."""
    meta: dict[str, Any] = {
        "ge": ge,
        "gt": gt,
        "le": le,
        "choices": choices,
        "non_empty": non_empty,
        "from_file": from_file,
    }
    if normalize is not None:
        meta["normalize"] = normalize
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Limits:
    """[limits]: sizes, rates and connection caps (the test profile sets them high)."""

    max_json_body_bytes: int = setting(65536, ge=1024)
    max_content_chars: int = setting(8000, ge=1)
    max_file_bytes: int = setting(10 * 1024 * 1024, ge=1)
    send_rate_per_sec: float = setting(20.0, gt=0)
    send_burst: int = setting(40, ge=1)
    max_connections_per_user: int = setting(20, ge=1)
    max_connections_total: int = setting(20000, ge=1)
    max_group_members: int = setting(5000, ge=1)  # members of one group, in total


@dataclasses.dataclass(frozen=True)
class WriteConcernSettings:
    """[write_concern]: how messages are stored before they are acknowledged (SPEC §4)."""

    j: bool = True
    w: int | str | None = setting(None, ge=0)


@dataclasses.dataclass(frozen=True)
class WebSocketSettings:
    """[websocket]: keep-alive pings (a socket that answers none in time is closed)."""

    ping_interval_secs: float = setting(20.0, gt=0)
    ping_timeout_secs: float = setting(15.0, gt=0)


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    """[http]: what one HTTP connection may cost before it has proved who it is."""

    # Open HTTP connections (upgraded WebSockets are counted by [limits] instead); beyond it new
    # connections are closed at once, so half-sent requests cannot exhaust file descriptors.
    max_connections: int = setting(5000, ge=1)
    # How long a connection may take to send a request's headers; on a kept-alive connection the
    # idle time before the next request counts too (Tornado has one timer for both).
    header_timeout_secs: float = setting(20.0, gt=0)
    # How long an authenticated body (an upload from a phone) may take to arrive.
    body_timeout_secs: float = setting(120.0, gt=0)
    # How long the small body of a refused or anonymous request may take: it is read only so
    # that the connection stays usable, never kept.
    refused_body_timeout_secs: float = setting(10.0, gt=0)
    # Request line plus headers; larger is a 431 envelope (SPEC §5).
    max_header_bytes: int = setting(16384, ge=1024)


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: GET /metrics (SPEC §17)."""

    # false: no instrument is observed and /metrics is a 404 (bench/s1_rest_ws.py compares).
    enabled: bool = True
    # true: /metrics is open (dev, test); false: it needs an admin token (prod).
    public: bool = False


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """[audit]: the audit trail (SPEC §13)."""

    # On in every profile; false only for the side-by-side benchmark (bench/s9_audit.py, IM_AUDIT_ENABLED).
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class WebhookSettings:
    """[webhooks]: events for the platform back end (SPEC §11); url empty: off."""

    url: str = ""
    secret: str = dataclasses.field(default="", repr=False)  # 16+ characters; never in a log line
    timeout_secs: float = setting(5.0, gt=0)
    events: tuple[str, ...] = ("*",)  # type names, or "*" for all
    include_content: bool = True  # false: content, title and summary are left out of every payload
    max_age_hours: float = setting(24.0, gt=0)  # retried until then, then "failed"
    retry_max_secs: float = setting(600.0, gt=0)  # the back-off (1 s, 2 s, 4 s …) stops growing here


@dataclasses.dataclass(frozen=True)
class PushSettings:
    """[push]: push.needed for recipients with no socket (SPEC §12); url empty: the webhook url."""

    url: str = ""
    coalesce_secs: float = setting(30.0, ge=0)


@dataclasses.dataclass(frozen=True)
class MessageSettings:
    """[messages]: how long a sender may recall or edit its own message (SPEC §14); 0: never
    (service and admin may at any time)."""

    recall_window_secs: float = setting(600.0, ge=0)
    edit_window_secs: float = setting(600.0, ge=0)


@dataclasses.dataclass(frozen=True)
class ReminderSettings:
    """[reminders]: message.unread_reminder after a message stays unread that long; 0: off."""

    after_secs: float = setting(0.0, ge=0)


@dataclasses.dataclass(frozen=True)
class RetentionSettings:
    """[retention]: how long messages, audit entries and delivered webhook events are kept (SPEC §15).

    Days; 0 keeps forever. pm and gm are the medical record (kept by default); system notices a year.
    """

    sm_days: int = setting(365, ge=0)
    pm_days: int = setting(0, ge=0)
    gm_days: int = setting(0, ge=0)
    audit_days: int = setting(0, ge=0)
    webhook_days: int = setting(7, ge=0)  # delivered events only; pending and failed ones stay
    interval_hours: float = setting(24.0, gt=0)  # a purge at start-up, then this often
    # Documents deleted per round trip; the purge yields to sends between batches.
    batch_size: int = setting(1000, ge=1, le=100_000)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting; a dataclass-typed field is a [table] of the profile file (IM_<TABLE>_<KEY>),
    any other field a top-level key (IM_<KEY>). A new table needs only its dataclass and a field."""

    profile: str = setting(DEFAULT_PROFILE, choices=PROFILES, from_file=False)
    port: int = setting(3000, ge=1, le=65535)
    mongo_uri: str = setting("mongodb://127.0.0.1:27017", non_empty=True)
    db_name: str = setting("im", non_empty=True)
    auth_secret: str = dataclasses.field(default="", repr=False)  # never in a log line
    log_level: str = setting("INFO", choices=LOG_LEVELS, normalize=str.upper)
    # "text": one readable line per record; "json": one JSON object per line (SPEC §17).
    log_format: str = setting("text", choices=("text", "json"), normalize=str.lower)
    # "*" admits every browser Origin; otherwise exact origins such as "https://clinic.example".
    allowed_origins: tuple[str, ...] = ("*",)
    # How long start-up waits for the database before giving up (supervisord then restarts us).
    db_startup_timeout_secs: float = setting(30.0, gt=0)
    # "auto": deliver messages stored by other processes through change streams when the database
    # offers them (a replica set, or nx-27017); "off": this process's own messages only.
    change_streams: str = setting("auto", choices=("auto", "off"))
    # Log every request (method, path, status, time); when false only 4xx/5xx are logged.
    access_log: bool = True
    shutdown_timeout_secs: float = setting(8.0, gt=0)
    # SPEC §3: a token whose lifetime (exp - iat, or exp - now) is longer is refused (401).
    max_token_ttl_secs: int = setting(7 * 24 * 3600, ge=1)
    write_concern: WriteConcernSettings = dataclasses.field(default_factory=WriteConcernSettings)
    limits: Limits = dataclasses.field(default_factory=Limits)
    websocket: WebSocketSettings = dataclasses.field(default_factory=WebSocketSettings)
    http: HttpSettings = dataclasses.field(default_factory=HttpSettings)
    webhooks: WebhookSettings = dataclasses.field(default_factory=WebhookSettings)
    push: PushSettings = dataclasses.field(default_factory=PushSettings)
    reminders: ReminderSettings = dataclasses.field(default_factory=ReminderSettings)
    messages: MessageSettings = dataclasses.field(default_factory=MessageSettings)
    audit: AuditSettings = dataclasses.field(default_factory=AuditSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    retention: RetentionSettings = dataclasses.field(default_factory=RetentionSettings)

    # The flat names the code used before the tables became dataclasses.
    @property
    def write_concern_j(self) -> bool:
        return self.write_concern.j

    @property
    def write_concern_w(self) -> int | str | None:
        return self.write_concern.w

    @property
    def ping_interval_secs(self) -> float:
        return self.websocket.ping_interval_secs

    @property
    def ping_timeout_secs(self) -> float:
        return self.websocket.ping_timeout_secs

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests lower limits this way); flat old names work too."""
        tables: dict[str, dict[str, Any]] = {}
        for name in [n for n in changes if n in FLAT_ALIASES]:
            table, key = FLAT_ALIASES[name]
            tables.setdefault(table, {})[key] = changes.pop(name)
        for table, values in tables.items():
            changes[table] = dataclasses.replace(changes.get(table, getattr(self, table)), **values)
        return dataclasses.replace(self, **changes)


# Old flat attribute -> (table, key); kept working for Settings.replace and the properties above.
FLAT_ALIASES = {
    "write_concern_j": ("write_concern", "j"),
    "write_concern_w": ("write_concern", "w"),
    "ping_interval_secs": ("websocket", "ping_interval_secs"),
    "ping_timeout_secs": ("websocket", "ping_timeout_secs"),
}
ENV_PREFIX = "IM_"
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


def load_settings(env: Mapping[str, str] | None = None, conf_dir: Path = CONF_DIR) -> Settings:
    """Read conf/<IM_PROFILE>.toml, apply IM_* environment overrides, check every value."""
    env = os.environ if env is None else env
    profile = env.get("IM_PROFILE") or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ConfigError(f"invalid IM_PROFILE {profile!r}: expected one of {', '.join(PROFILES)}")
    path = conf_dir / f"{profile}.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from exc
    settings = Settings(profile=profile, **read_table(Settings, raw, env, ENV_PREFIX, str(path), ""))
    check_settings(settings)
    return settings


def read_table(
    cls: type[Any], raw: Mapping[str, Any], env: Mapping[str, str], prefix: str, path: str, table: str
) -> dict[str, Any]:
    """The values of one dataclass from its file table and IM_<PREFIX>_<KEY> variables (env wins)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("from_file", True)]
    unknown = sorted(set(raw) - {f.name for f in fields})
    if unknown:
        where = f"[{table}] of {path}" if table else path
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {where}")
    values: dict[str, Any] = {}
    for field in fields:
        hint, variable = hints[field.name], f"{prefix}{field.name.upper()}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a [table]
            sub = raw.get(field.name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"invalid {field.name} in {path}: expected a [{field.name}] table")
            values[field.name] = hint(**read_table(hint, sub, env, variable + "_", path, field.name))
            continue
        text = env.get(variable)
        if text:  # an empty variable counts as unset, as supervisord and shells often leave them
            source = variable
            value = parse_text(text, hint, field, source)
        elif field.name in raw:
            source = f"{table + '.' if table else ''}{field.name} in {path}"
            value = check_value(raw[field.name], hint, field, source)
        else:
            continue
        values[field.name] = check_bounds(value, field, source)
    return values


def parse_text(text: str, hint: Any, field: dataclasses.Field[Any], source: str) -> Any:
    """An environment variable's text as the field's type: lists as JSON, booleans as words."""
    try:
        if hint is bool:
            word = text.strip().lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError
            return word in TRUE_WORDS
        if hint is int:
            return int(text)
        if hint is float:
            return check_value(float(text), hint, field, source)
        if hint is str:
            return text
        if typing.get_origin(hint) is tuple:
            return check_value(json.loads(text), hint, field, source)
        if set(typing.get_args(hint)) == {int, str, type(None)}:
            return int(text) if text.strip().isdigit() else text
    except ValueError:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"invalid {source} {text!r}: expected {describe(hint)}") from None
    raise TypeError(f"no environment syntax for {field.name}: {hint}")  # a programming error


def check_value(value: Any, hint: Any, field: dataclasses.Field[Any], source: str) -> Any:
    """A file (or JSON) value checked against the field's type; lists become tuples."""
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    elif hint is int or hint is bool or hint is str:
        if type(value) is hint:
            return value
    elif typing.get_origin(hint) is tuple:
        if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return tuple(value)
    elif set(typing.get_args(hint)) == {int, str, type(None)} and (
        value is None or (isinstance(value, int | str) and not isinstance(value, bool))
    ):
        return value
    raise ConfigError(f"invalid {source} {value!r}: expected {describe(hint)}")


def check_bounds(value: Any, field: dataclasses.Field[Any], source: str) -> Any:
    """The field's declared range, choices and normal form (see setting())."""
    meta = field.metadata
    if "normalize" in meta:
        value = meta["normalize"](value)
    name = field.name
    if isinstance(value, int | float) and not isinstance(value, bool):
        if meta.get("ge") is not None and value < meta["ge"]:
            raise ConfigError(f"invalid {source} {value!r}: {name} must be at least {meta['ge']}")
        if meta.get("gt") is not None and value <= meta["gt"]:
            raise ConfigError(f"invalid {source} {value!r}: {name} must be greater than {meta['gt']}")
        if meta.get("le") is not None and value > meta["le"]:
            raise ConfigError(f"invalid {source} {value!r}: {name} must be at most {meta['le']}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"invalid {source} {value!r}: {name} must be one of {', '.join(meta['choices'])}")
    if meta.get("non_empty") and not value:
        raise ConfigError(f"invalid {source}: {name} must not be empty")
    return value


def describe(hint: Any) -> str:
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if typing.get_origin(hint) is tuple:
        return 'a JSON list of strings, e.g. ["a", "b"]'
    if hint is str:
        return "a string"
    return "an integer or a string"


def check_settings(settings: Settings) -> None:
    """Rules that tie several settings together."""
    check_webhooks(settings)
    if not settings.auth_secret:
        raise ConfigError(f"no auth secret for profile {settings.profile!r}: set IM_AUTH_SECRET")
    if len(settings.auth_secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"IM_AUTH_SECRET is too short: use at least {MIN_SECRET_CHARS} characters")
    websocket = settings.websocket
    if websocket.ping_timeout_secs > websocket.ping_interval_secs:
        raise ConfigError(
            "invalid [websocket]: ping_timeout_secs must be <= ping_interval_secs "
            "(IM_WEBSOCKET_PING_TIMEOUT_SECS, IM_WEBSOCKET_PING_INTERVAL_SECS)"
        )


def check_webhooks(settings: Settings) -> None:
    """[webhooks] / [push]: http(s) urls, a secret of 16+ characters, and in prod a secret for a url."""
    webhooks = settings.webhooks
    for name, url in (("webhooks.url (IM_WEBHOOKS_URL)", webhooks.url), ("push.url (IM_PUSH_URL)", settings.push.url)):
        if url and not (url.startswith(("http://", "https://")) and len(url) > len("https://")):
            raise ConfigError(f"invalid {name} {url!r}: must be an http:// or https:// URL")
    if webhooks.secret and len(webhooks.secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"invalid webhooks.secret (IM_WEBHOOKS_SECRET): use at least {MIN_SECRET_CHARS} characters")
    if settings.profile == "prod" and (webhooks.url or settings.push.url) and not webhooks.secret:
        raise ConfigError("no webhooks.secret for the webhook url in prod: set IM_WEBHOOKS_SECRET")
