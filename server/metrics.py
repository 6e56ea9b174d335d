"""Prometheus metrics of one process (SPEC §17): its own registry, its instruments, `GET /metrics`.

One registry per Services (not prometheus_client's global one): a test process builds several
applications, and each server process is scraped on its own port. Instruments are observed on
hot paths (every request, every stored message), so each does the least it can: label children
are looked up once and kept, and `[metrics] enabled = false` turns every hook into a no-op
(that is how bench/s1_rest_ws.py measures their cost side by side).
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pymongo import monitoring
from pymongo.errors import PyMongoError

from models.database import Database
from models.outbox import PROGRESS, in_flight, open_progress

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Request durations: from a cached-token GET (sub-millisecond) to a slow upload.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BACKLOG_BUCKETS = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000)
WEBHOOK_STATUSES = ("pending", "failed", "delivered")
HOOK_COUNT_CAP = 100_000  # per channel and status: a backlog bigger than this shows as this
OUTBOX_COUNT_MAX_MS = 500  # a scrape never waits long on the outbox counts
# URL patterns of the route table → route labels: never the raw path, which carries ids.
PATTERN_ARGS = ((r"(sm|pm|gm)", "{channel}"), (r"(.*)", "{path}"))


def route_label(pattern: str) -> str:
    """`/api/v1/groups/([^/]+)/members/([^/]+)` → `/api/v1/groups/{id}/members/{user}`."""
    for regex, name in PATTERN_ARGS:
        pattern = pattern.replace(regex, name)
    names = iter(("{id}", "{user}", "{arg}", "{arg}"))
    return re.sub(r"\(\[\^/\]\+\)", lambda _m: next(names), pattern).rstrip("$")


class Metrics:
    """Every instrument of the process; `enabled=False` makes the hooks do nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.messages_stored = Counter("im_messages_stored", "Messages stored by this process", ["channel"], registry=r)
        self.websocket_connections = Gauge("im_websocket_connections", "Open WebSocket connections", registry=r)
        self.websocket_users = Gauge("im_websocket_users", "Users with at least one open WebSocket", registry=r)
        self.http_duration = Histogram(
            "im_http_request_duration_seconds",
            "REST request durations by method, route (URL pattern) and status",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.webhook_events = Gauge(
            "im_webhook_events", "Webhook outbox events by status (read at scrape time)", ["status"], registry=r
        )
        self.backlog_messages = Histogram(
            "im_backlog_messages_sent",
            "Messages sent in one connection's backlog after its handshake",
            buckets=BACKLOG_BUCKETS,
            registry=r,
        )
        self.change_stream_lag = Histogram(
            "im_change_stream_lag_seconds",
            "From a message's createdAt to its delivery by another process's change stream",
            ["collection"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.db_duration = Histogram(
            "im_db_operation_duration_seconds",
            "MongoDB command durations by command (pymongo command monitoring)",
            ["command", "outcome"],
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter("im_rate_limit_refusals", "Sends refused by the per-user rate limit", registry=r)
        self.auth_refusals = Counter(
            "im_auth_refusals", "Tokens refused for a suspension or a revoke", ["code"], registry=r
        )
        for status in WEBHOOK_STATUSES:
            self.webhook_events.labels(status)
        self._http_children: dict[tuple[str, str, int], Any] = {}
        self._stored_children: dict[str, Any] = {}

    # ---- hooks (cheap; no-ops when disabled) -------------------------------------------------

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        if not self.enabled:
            return
        key = (method, route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self.http_duration.labels(method, route, str(status))
        child.observe(seconds)

    def note_stored(self, channel: str) -> None:
        if not self.enabled:
            return
        child = self._stored_children.get(channel)
        if child is None:
            child = self._stored_children[channel] = self.messages_stored.labels(channel)
        child.inc()

    def note_backlog(self, sent: int) -> None:
        if self.enabled:
            self.backlog_messages.observe(sent)

    def note_change_stream_lag(self, collection: str, created_at: object) -> None:
        if self.enabled and isinstance(created_at, datetime.datetime):
            lag = (datetime.datetime.now(datetime.UTC) - created_at).total_seconds()
            self.change_stream_lag.labels(collection).observe(max(0.0, lag))

    def note_rate_limited(self) -> None:
        if self.enabled:
            self.rate_limited.inc()

    def track_connections(self, sockets: Callable[[], int], users: Callable[[], int]) -> None:
        """Read the hub's counts at scrape time (nothing on the connect path)."""
        self.websocket_connections.set_function(sockets)
        self.websocket_users.set_function(users)

    def command_listeners(self) -> list[monitoring.CommandListener]:
        """For AsyncMongoClient(event_listeners=...): database operation latency."""
        return [CommandTimer(self)] if self.enabled else []

    # ---- scrape ------------------------------------------------------------------------------

    async def exposition(self, db: Database) -> bytes:
        """The text exposition, with the webhook outbox counted now: stored events, and the
        message.created events still pending or failed in the messages themselves (models/outbox.py).
        Those are read as ids off the (hook, hookDue) index, at most HOOK_COUNT_CAP: a count_documents
        there is an aggregation that nx-27017 runs over every message in Python. A delivered
        message.created lives as long as its message and is not counted."""
        for status in WEBHOOK_STATUSES:
            try:
                count = await db.webhook_events.count_documents({"status": status}, maxTimeMS=OUTBOX_COUNT_MAX_MS)
                if status != "delivered":
                    hooks = [{"hook": {"$eq": status}, "hookDue": {"$gte": 0}}]
                    if status == "pending":  # and those in flight (models/outbox.py hook_status)
                        hooks += [
                            in_flight(token, below) for token, below in (await open_progress(db[PROGRESS])).items()
                        ]
                    for channel in ("sm", "pm", "gm"):
                        for hook_filter in hooks:
                            found = db[channel].find(hook_filter, {"_id": 1})
                            count += len(await found.limit(HOOK_COUNT_CAP).to_list())
            except PyMongoError as exc:
                log.warning("metrics: cannot count webhook events: %s", exc)
                break
            self.webhook_events.labels(status).set(count)
        return generate_latest(self.registry)


class CommandTimer(monitoring.CommandListener):
    """Observes each command's duration (the driver measures it; no state kept here)."""

    def __init__(self, metrics: Metrics):
        self._histogram = metrics.db_duration
        self._children: dict[tuple[str, str], Any] = {}

    def _observe(self, command: str, outcome: str, micros: int) -> None:
        key = (command, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._histogram.labels(command, outcome)
        child.observe(micros / 1e6)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._observe(event.command_name, "ok", event.duration_micros)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._observe(event.command_name, "error", event.duration_micros)
