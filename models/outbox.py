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

message.created is the one event that is not a document of its own: it is the message. A message
stored while a webhook wants message.created carries its event's delivery state in its own document
(HOOK_FIELDS: `hook`, `hookDue`, `hookClaim`, `hookAttempts`, `hookAgeFrom`, `hookError`,
`hookDeliveredAt`; the meaning of the event fields above), so the journaled insert that stores the
message stores its event too: no second document per send (on nx-27017 a document costs about as
much CPU as everything else a send does). Its event id is the message id, its payload the message as
stored (`message_to_wire`), and it lives as long as the message (retention's `webhook_days` is for
the other events). Only when the push planner needs the message (an offline recipient, reminders)
is a `planned` event document stored as well.

A message is born `hook: "sent"`: handed to the process that stored it (`hookClaim`, that
process's dispatcher token), which delivers it from memory, and stamped with `hookDue`, that
process's birth stamp (unix seconds, strictly increasing per process). A delivery is not written
back per message: while a process runs, one document per process in `webhook_progress` (PROGRESS),
`{_id: token, instance, below, state: "open"}`, says that every "sent" message of that token stamped
below `below` is settled — delivered, or rewritten as pending/failed by a failed attempt. So a
"sent" message is pending (in flight) while its token has a progress document and its stamp is at
or above `below`, and delivered otherwise (`hook_status`). A process stopping releases what it had
not delivered (pending, due now) and deletes its document; when one dies, another one, once the
dead process's heartbeat is stale (models/presence.py), does both for it. `hook` is otherwise
`pending` (due at `hookDue`, claimed from the database), `failed`, or `delivered` (an attempt claimed
from the database that succeeded).
"""

from __future__ import annotations

import datetime
import heapq
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from bson import ObjectId
from pymongo import WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
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
PROGRESS = "webhook_progress"
SENT = "sent"  # a message's event handed to its process's dispatcher (see above)
MESSAGE_COLLECTIONS = ("sm", "pm", "gm")
MESSAGE_CREATED = "message.created"
HOOK_FIELDS = ("hook", "hookDue", "hookClaim", "hookAttempts", "hookAgeFrom", "hookError", "hookDeliveredAt")


class EventSink(Protocol):
    """Where domain services report what happened (message.created, group.created, user.suspended…).

    `emit(type, data)` stores the event durably and returns; it never waits for a receiver. `data`
    is the JSON object of SPEC §11's table for that type. Call it after the action is stored and
    before it is acknowledged, so an acknowledged action always has its event.
    """

    async def emit(self, type: str, data: dict[str, Any], *, event_id: str | None = None) -> None: ...

    def message_fields(self, message_id: str) -> dict[str, Any]:
        """The fields a message about to be stored carries for its message.created event ({}: none)."""
        ...

    def message_not_stored(self, message_id: str) -> None:
        """The insert of a message given message_fields was refused (a duplicate key): no event."""
        ...

    async def message_created(self, channel: str, message: dict[str, Any], hook: Mapping[str, Any]) -> None:
        """A message is stored (with `hook`, what message_fields gave it; {} for a repeated send):
        hand its event to this process's dispatcher and store what the push planner needs."""
        ...


class NullSink:
    """No receiver configured: events go nowhere (and cost nothing)."""

    async def emit(self, type: str, data: dict[str, Any], *, event_id: str | None = None) -> None:
        return None

    def message_fields(self, message_id: str) -> dict[str, Any]:
        return {}

    def message_not_stored(self, message_id: str) -> None:
        return None

    async def message_created(self, channel: str, message: dict[str, Any], hook: Mapping[str, Any]) -> None:
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
        message_stored: Callable[[str, dict[str, Any], Mapping[str, Any]], None] = lambda *_: None,
        birth: Callable[[str], float | None] = lambda message_id: None,
        not_stored: Callable[[str], None] = lambda message_id: None,
        local_claim: str = "",
    ):
        self._collection = db.get_collection(COLLECTION, write_concern=write_concern)
        self._messages = {ch: db.get_collection(ch, write_concern=write_concern) for ch in MESSAGE_COLLECTIONS}
        self._progress = db[PROGRESS]
        # message_stored(channel, message, hook): a message born "sent" is stored (to the
        # dispatcher's memory); birth(id): its stamp, None when the dispatcher cannot take it
        # (not running, no room in memory: then it is born pending, claimed from the database);
        # not_stored(id): its insert was refused.
        self._message_stored = message_stored
        self._birth = birth
        self._not_stored = not_stored
        self._local_claim = local_claim
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
        plan = type_ == MESSAGE_CREATED and self._plan_messages and self._needs_plan(data["message"])
        if type_ == MESSAGE_CREATED and not plan:
            return None  # its delivery state is in the message document
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
        if type == MESSAGE_CREATED:
            raise TypeError("message.created is stored with its message: use message_fields/message_created")
        doc = self.build(type, data, event_id=event_id)
        if doc is None:
            return
        await self.store(doc)

    def message_fields(self, message_id: str) -> dict[str, Any]:
        if self.status_for(MESSAGE_CREATED) != "pending":
            return {}
        now = time.time()
        stamp = self._birth(message_id)
        if stamp is None:
            return {"hook": "pending", "hookDue": now, "hookClaim": None, "hookAttempts": 0, "hookAgeFrom": now}
        # hookAttempts counts the attempt from memory, as a claim would
        return {"hook": SENT, "hookDue": stamp, "hookClaim": self._local_claim, "hookAttempts": 1, "hookAgeFrom": now}

    def message_not_stored(self, message_id: str) -> None:
        self._not_stored(message_id)

    async def message_created(self, channel: str, message: dict[str, Any], hook: Mapping[str, Any]) -> None:
        if self._plan_messages and self._needs_plan(message):
            # The planner's share of the event; its delivery state is in the message (see above).
            plan = self.build(MESSAGE_CREATED, {"message": message}, event_id=message["id"])
            if plan is not None:
                plan["status"] = "planned"
                await self.store(plan)
        if hook.get("hook") == SENT:
            self._message_stored(channel, message, hook)

    async def store(self, doc: dict[str, Any]) -> None:
        try:
            await self._inserts.insert(doc)
        except DuplicateKeyError:
            return  # the same event, stored by an earlier attempt of the same action
        self._stored(doc)

    # ---- the admin API (SPEC §11) ---------------------------------------------------------------

    async def list_events(self, status: str | None, limit: int, cursor: str | None) -> dict[str, Any]:
        """Newest first: {"events": [...], "next"}; message.created from the messages themselves."""
        filter_: dict[str, Any] = {"status": status} if status else {"status": {"$in": list(STATUSES)}}
        before: dict[str, Any] = {"_id": {"$lt": cursor}} if cursor is not None else {}
        pages = [
            [
                event_to_wire(doc)
                async for doc in self._collection.find({**filter_, **before}).sort("_id", -1).limit(limit + 1)
            ]
        ]
        open_below = await open_progress(self._progress)
        if status == "pending":  # stored pending, and each open process's messages in flight
            hooks = [{"hook": {"$eq": "pending"}}] + [in_flight(token, below) for token, below in open_below.items()]
        elif status == "failed":
            hooks = [{"hook": {"$eq": "failed"}}]
        elif status == "delivered":  # "sent" ones in flight are left out as they are read
            hooks = [{"hook": {"$in": ["delivered", SENT]}}]
        else:
            hooks = [{"hook": {"$in": [*STATUSES, SENT]}}]
        for collection in self._messages.values():
            for hook_filter in hooks:
                found = collection.find({**hook_filter, **before}, {"createdAt": 1, **dict.fromkeys(HOOK_FIELDS, 1)})
                page: list[dict[str, Any]] = []
                async for doc in found.sort("_id", -1).batch_size(limit + 1):
                    event = hook_to_wire(doc, open_below)
                    if status is None or event["status"] == status:
                        page.append(event)
                        if len(page) > limit:
                            break
                await found.close()  # a page ends before the cursor does
                pages.append(page)
        merged = list(heapq.merge(*pages, key=lambda event: event["id"], reverse=True))
        page = merged[:limit]
        more = len(merged) > limit
        return {"events": page, "next": page[-1]["id"] if more and page else None}

    async def retry(self, event_id: str) -> dict[str, Any]:
        """A failed event queued again: attempts start from 1, max_age counts from now."""
        now = time.time()
        doc = await self._collection.find_one_and_update(
            {"_id": event_id, "status": "failed"},
            {"$set": {"status": "pending", "attempts": 0, "dueAt": now, "leaseUntil": 0.0, "ageFrom": now}},
            return_document=True,
        )
        if doc is not None:
            self._stored(doc)
            return event_to_wire(doc)
        for collection in self._messages.values():
            message = await collection.find_one_and_update(
                {"_id": event_id, "hook": "failed"},
                {"$set": {"hook": "pending", "hookAttempts": 0, "hookDue": now, "hookClaim": None, "hookAgeFrom": now}},
                projection={"createdAt": 1, **dict.fromkeys(HOOK_FIELDS, 1)},
                return_document=True,
            )
            if message is not None:
                self._stored({})  # wakes the dispatcher
                return hook_to_wire(message, {})
        if await self._collection.find_one({"_id": event_id}, {"_id": 1}) is not None:
            raise EventNotFailed(f"event {event_id!r} has not failed; only failed events are retried")
        for collection in self._messages.values():
            if await collection.find_one({"_id": event_id, "hook": {"$in": [*STATUSES, SENT]}}, {"_id": 1}):
                raise EventNotFailed(f"event {event_id!r} has not failed; only failed events are retried")
        raise EventNotFound(f"event {event_id!r} does not exist")


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


def hook_to_wire(message: Mapping[str, Any], open_below: Mapping[str, float]) -> dict[str, Any]:
    """A message's message.created event as the admin API lists it (open_below: open_progress)."""
    due = message.get("hookDue")
    status = hook_status(message, open_below)
    return {
        "id": message["_id"],
        "type": MESSAGE_CREATED,
        "status": status,
        "attempts": message.get("hookAttempts", 0),
        "lastError": message.get("hookError"),
        # a "sent" one in flight is being attempted now: no next attempt planned
        "nextAttemptAt": iso_from_unix(due) if message["hook"] == "pending" and isinstance(due, int | float) else None,
        "createdAt": iso(message["createdAt"]),
    }


def hook_status(message: Mapping[str, Any], open_below: Mapping[str, float]) -> str:
    """pending, failed or delivered; a "sent" message is pending while its process has not
    settled it (its stamp at or above the open progress's `below`), delivered otherwise."""
    status = str(message["hook"])
    if status != SENT:
        return status
    below = open_below.get(message.get("hookClaim") or "")
    return "pending" if below is not None and float(message["hookDue"]) >= below else "delivered"


def in_flight(token: str, below: float) -> dict[str, Any]:
    """The filter of one process's messages whose event it has not settled yet ($eq: nx-27017
    uses the (hook, hookDue) index only then)."""
    return {"hook": {"$eq": SENT}, "hookDue": {"$gte": below}, "hookClaim": token}


async def open_progress(progress: AsyncCollection[dict[str, Any]]) -> dict[str, float]:
    """token -> below, for every process whose "sent" messages may hold events not yet delivered."""
    return {doc["_id"]: float(doc["below"]) async for doc in progress.find({"state": "open"}, {"below": 1})}


def iso_from_unix(seconds: float) -> str:
    return iso(datetime.datetime.fromtimestamp(seconds, datetime.UTC))
