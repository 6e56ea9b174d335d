"""The durable outbox of events for the platform back end (SPEC §11, §12).

An event is a document in `webhook_events`, stored with the messages' journaled write concern
(batched, models/batching.py) before the action that caused it is reported done; server/webhooks.py
delivers it at least once. Domain services get an `EventSink` through their constructors and call
`await sink.emit(type, data)`; it returns once the event is stored (or at once, when no receiver is
configured for that type).

Document: `_id` (the event id: an ObjectId string; for message.created the message's own id, so a
retried send stores it once), `type`, `createdAt` (ISO 8601 text, as on the wire), `data`,
`target` ("webhook" or "push"), `status` ("pending", "delivered", "failed"; "planned": stored only
for the push planner, never sent), `attempts`, `lastError`, `dueAt` (unix seconds of the next
attempt), `leaseUntil` (unix seconds: a dispatcher holds it until then), `claim` (the token of the
batch claim that holds it), `ageFrom` (unix seconds max_age counts from; reset by a retry), `plan`
("pending"/"done": message.created still to be turned into push.needed / reminders;
`planLeaseUntil` and `planClaim` lease it to one planner). Times the dispatcher compares are
numbers, not dates: nx-27017 compares dates at whole seconds.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from bson import ObjectId
from pymongo import WriteConcern
from pymongo.errors import DuplicateKeyError

from models.batching import BatchedInserts
from models.clock import iso, utcnow
from models.database import Database
from models.errors import Conflict, NotFound

COLLECTION = "webhook_events"
PUSH_TYPES = frozenset({"push.needed", "message.unread_reminder"})
# What include_content=false leaves out of every payload (SPEC §11).
CONTENT_FIELDS = ("content", "title", "summary")
STATUSES = ("pending", "failed", "delivered")


class EventSink(Protocol):
    """Where domain services report what happened (message.created, group.created, user.suspended…).

    `emit(type, data)` stores the event durably and returns; it never waits for a receiver. `data`
    is the JSON object of SPEC §11's table for that type. Call it after the action is stored and
    before it is acknowledged, so an acknowledged action always has its event.
    """

    async def emit(self, type: str, data: dict[str, Any], *, event_id: str | None = None) -> None: ...


class NullSink:
    """No receiver configured: events go nowhere (and cost nothing)."""

    async def emit(self, type: str, data: dict[str, Any], *, event_id: str | None = None) -> None:
        return None


class EventNotFailed(Conflict):
    """Only a failed event can be queued again."""

    code = "event_not_failed"


class EventNotFound(NotFound):
    code = "event_not_found"


def wants(events: Iterable[str], type_: str) -> bool:
    selected = set(events)
    return "*" in selected or type_ in selected


def strip_content(data: dict[str, Any]) -> dict[str, Any]:
    """data without message text: content, title and summary, at any depth."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in CONTENT_FIELDS:
            continue
        out[key] = strip_content(value) if isinstance(value, dict) else value
    return out


class Outbox:
    """The EventSink that stores events in MongoDB; stored(doc) hands each newly stored event to
    this process's dispatcher (which wakes, and plans this process's messages from memory)."""

    def __init__(
        self,
        db: Database,
        write_concern: WriteConcern,
        *,
        events: Iterable[str],
        include_content: bool,
        webhook_on: bool,
        push_on: bool,
        plan_messages: bool,
        stored: Callable[[dict[str, Any]], None],
        plan_lease_secs: float = 60.0,
        needs_plan: Callable[[dict[str, Any]], bool] = lambda message: True,
    ):
        self._collection = db.get_collection(COLLECTION, write_concern=write_concern)
        self._inserts = BatchedInserts(self._collection)
        self._events = tuple(events)
        self._include_content = include_content
        self._webhook_on = webhook_on
        self._push_on = push_on
        self._plan_messages = plan_messages  # push.needed or reminders are computed from messages
        self._stored = stored
        self._plan_lease_secs = plan_lease_secs
        self._needs_plan = needs_plan

    def status_for(self, type_: str) -> str | None:
        """pending (to be sent), planned (kept only for the push planner) or None (not stored)."""
        if not wants(self._events, type_):
            return "planned" if type_ == "message.created" and self._plan_messages else None
        if type_ in PUSH_TYPES:
            return "pending" if self._push_on else None
        if self._webhook_on:
            return "pending"
        return "planned" if type_ == "message.created" and self._plan_messages else None

    def build(
        self, type_: str, data: dict[str, Any], *, event_id: str | None = None, due_in_secs: float = 0.0
    ) -> dict[str, Any] | None:
        status = self.status_for(type_)
        if status is None:
            return None
        # A message whose recipients all have a socket here needs no push and no reminder: decided
        # now, in memory, so the planner never rewrites (or even stores) its event.
        plan = type_ == "message.created" and self._plan_messages and self._needs_plan(data["message"])
        if status == "planned" and not plan:
            return None
        now = time.time()
        doc: dict[str, Any] = {
            "_id": event_id or str(ObjectId()),
            "type": type_,
            "createdAt": iso(utcnow()),
            "data": data if self._include_content else strip_content(data),
            "target": "push" if type_ in PUSH_TYPES else "webhook",
            "status": status,
            "attempts": 0,
            "lastError": None,
            "dueAt": now + due_in_secs,
            "leaseUntil": 0.0,
            "ageFrom": now,
        }
        if plan:
            doc["plan"] = "pending"
            # Born leased to this process, whose planner takes it from memory (stored()); only if
            # this process dies first does another planner find it in the database after the lease.
            doc["planLeaseUntil"] = now + self._plan_lease_secs
        return doc

    async def emit(self, type: str, data: dict[str, Any], *, event_id: str | None = None) -> None:
        """Store the event (journaled, batched with others); a repeat of a keyed event is a no-op."""
        doc = self.build(type, data, event_id=event_id)
        if doc is None:
            return
        await self.store(doc)

    async def store(self, doc: dict[str, Any]) -> None:
        try:
            await self._inserts.insert(doc)
        except DuplicateKeyError:
            return  # the same event, stored by an earlier attempt of the same action
        self._stored(doc)

    # ---- the admin API (SPEC §11) ---------------------------------------------------------------

    async def list_events(self, status: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
        """Newest first: {"events": [...], "next"}."""
        filter_: dict[str, Any] = {"status": status} if status else {"status": {"$in": list(STATUSES)}}
        if cursor is not None:
            filter_["_id"] = {"$lt": cursor}
        found = await self._collection.find(filter_).sort("_id", -1).limit(limit + 1).to_list()
        page = found[:limit]
        more = len(found) > limit
        return {"events": [event_to_wire(doc) for doc in page], "next": page[-1]["_id"] if more and page else None}

    async def retry(self, event_id: str) -> dict[str, Any]:
        """A failed event queued again: attempts start from 1, max_age counts from now."""
        now = time.time()
        doc = await self._collection.find_one_and_update(
            {"_id": event_id, "status": "failed"},
            {"$set": {"status": "pending", "attempts": 0, "dueAt": now, "leaseUntil": 0.0, "ageFrom": now}},
            return_document=True,
        )
        if doc is None:
            if await self._collection.find_one({"_id": event_id}, {"_id": 1}) is None:
                raise EventNotFound(f"event {event_id!r} does not exist")
            raise EventNotFailed(f"event {event_id!r} has not failed; only failed events are retried")
        self._stored(doc)
        return event_to_wire(doc)


def event_to_wire(doc: dict[str, Any]) -> dict[str, Any]:
    due = doc.get("dueAt")
    pending = doc.get("status") == "pending"
    return {
        "id": doc["_id"],
        "type": doc["type"],
        "status": doc["status"],
        "attempts": doc.get("attempts", 0),
        "lastError": doc.get("lastError"),
        "nextAttemptAt": iso_from_unix(due) if pending and isinstance(due, int | float) else None,
        "createdAt": doc["createdAt"],
    }


def iso_from_unix(seconds: float) -> str:
    return iso(datetime.datetime.fromtimestamp(seconds, datetime.UTC))
