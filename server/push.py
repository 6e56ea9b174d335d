"""push.needed and message.unread_reminder (SPEC §12), computed on the dispatcher's side.

The send path stores one message.created event (with `plan: "pending"`); this planner, run by the
dispatcher, claims such events in batches (a lease with a token, like deliveries), finds the
recipients without a socket on any process and, per (user, conversation), opens or extends a
coalescing window: one push.needed event per window, due when the window closes (coalesce_secs
after its first message), carrying the window's newest seq and whether any of its messages
mentioned the user. The user's total unread is
counted when the window closes (prepare), so the badge is current. Nothing here holds message text:
push data is built from ids and numbers only.

Reminders: per (user, conversation) at most one open reminder; it is due after_secs after the
message, cancelled if the user has read that far by then, and once the user has read, the next
unread message may arm the next one.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any, Protocol

from bson import ObjectId

from models.clock import iso
from models.conversations import ConversationRef, ConversationStore
from models.database import Database
from models.groups import GroupStore
from models.messages import recipients_of
from models.outbox import COLLECTION, Outbox
from models.presence import INSTANCE_STALE_AFTER_SECS, beat_of

log = logging.getLogger(__name__)

PLAN_LEASE_SECS = 15.0  # a dead process's unplanned messages wait this long for another planner
PLAN_BATCH = 200
PLAN_SWEEP_SECS = 3.0  # how often the database is searched for messages whose planner died


class LocalSockets(Protocol):
    def is_online(self, user_id: str) -> bool: ...


def conversation_of(message: dict[str, Any]) -> ConversationRef:
    if message["channel"] == "pm":
        if "doctor" in message and "patient" in message:
            return ConversationRef.pm(message["doctor"], message["patient"])
        return ConversationRef.pm(message["from"], message["to"])
    if message["channel"] == "gm":
        return ConversationRef.gm(message["group"])
    return ConversationRef.sm(message["to"])


def where(ref: ConversationRef, user: str) -> dict[str, str]:
    """{"channel", "peer" or "group"} of a conversation as the user sees it (none for sm)."""
    out = {"channel": ref.channel}
    if ref.channel == "pm":
        low, high = ref.pm_pair()
        out["peer"] = high if low == user else low
    elif ref.channel == "gm":
        out["group"] = ref.conv
    return out


class PushPlanner:
    def __init__(
        self,
        db: Database,
        outbox: Outbox,
        sockets: LocalSockets,
        groups: GroupStore,
        conversations: ConversationStore,
        *,
        push_on: bool,
        coalesce_secs: float,
        reminder_after_secs: float,
    ):
        self._db = db
        self._events = db[COLLECTION]
        self._outbox = outbox
        self._sockets = sockets
        self._groups = groups
        self._conversations = conversations
        self._push_on = push_on
        self._coalesce_secs = coalesce_secs
        self._reminder_after_secs = reminder_after_secs
        self._local: list[dict[str, Any]] = []  # this process's stored message.created, to plan
        self._next_sweep = 0.0  # when to look for other (dead) processes' unplanned messages

    def needs_plan(self, message: dict[str, Any]) -> bool:
        """At store time: may this message give a push or a reminder? Not when reminders are off
        and every recipient has a socket on this process (SPEC §12: a push is for a recipient with
        no open socket when the message is stored). Group members are not known here: planned."""
        channel = message["channel"]
        if self._reminder_after_secs > 0 or channel == "gm":
            return True
        sender = message.get("from")
        # The pair as conversation_of names it, without building the conversation's key (every send).
        recipients: tuple[str, ...]
        if channel != "pm":
            recipients = (message["to"],)
        elif "doctor" in message and "patient" in message:
            recipients = (message["doctor"], message["patient"])
        else:
            recipients = (message["from"], message["to"])
        return any(user != sender and not self._sockets.is_online(user) for user in recipients)

    def take(self, doc: dict[str, Any]) -> None:
        """A message.created event this process just stored (born leased to it): planned from
        memory at the next plan_pending, with no claim round trip."""
        self._local.append(doc)

    async def plan_pending(self) -> None:
        """Turn message.created events into push windows and reminders: first this process's
        own (from memory), then any whose lease ran out in the database (their process died), at
        most PLAN_BATCH each: a find, an update_many that leases them with this batch's token and
        a find of those won; then one presence look-up for all their recipients and one
        update_many when done."""
        if self._local:
            batch, self._local = self._local[:PLAN_BATCH], self._local[PLAN_BATCH:]
            await self._plan_batch(batch, {})
        now = time.time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + PLAN_SWEEP_SECS
        pending = {"plan": {"$eq": "pending"}, "planLeaseUntil": {"$lte": now}}  # $eq: nx-27017 indexes it
        found = await self._events.find(pending, {"_id": 1}).limit(PLAN_BATCH).to_list()
        if not found:
            return
        ids = [doc["_id"] for doc in found]
        token = str(ObjectId())
        await self._events.update_many(
            {"_id": {"$in": ids}, **pending}, {"$set": {"planLeaseUntil": now + PLAN_LEASE_SECS, "planClaim": token}}
        )
        claimed = await self._events.find({"_id": {"$in": ids}, "planClaim": token}, {"data": 1}).to_list()
        claimed.sort(key=lambda doc: str(doc["_id"]))  # message ids sort as time: plan in send order
        await self._plan_batch(claimed, {"planClaim": token})

    async def _plan_batch(self, docs: list[dict[str, Any]], still_mine: dict[str, Any]) -> None:
        planned = []
        try:
            batch = [(doc["_id"], doc["data"]["message"]) for doc in docs]
            recipients = await self._recipients([message for _, message in batch])
            everyone = sorted({u for users in recipients for u in users})
            offline = set(await self.offline(everyone)) if self._push_on else set()
            for (event_id, message), users in zip(batch, recipients, strict=True):
                try:
                    await self.plan_message(message, users, offline)
                except Exception:
                    log.exception("push planner: message of event %s not planned; retried after the lease", event_id)
                    continue
                planned.append(event_id)
        finally:
            if planned:
                await self._events.update_many({"_id": {"$in": planned}, **still_mine}, {"$set": {"plan": "done"}})

    async def _recipients(self, messages: list[dict[str, Any]]) -> list[list[str]]:
        """Per message, who it is for, sender excluded (each group read once per batch)."""
        members: dict[str, list[str]] = {}
        for message in messages:
            ref = conversation_of(message)
            if ref.channel == "gm" and ref.conv not in members:
                group = await self._groups.find(ref.conv)
                members[ref.conv] = list(group["members"]) if group else []
        out = []
        for message in messages:
            ref = conversation_of(message)
            everyone = recipients_of(ref, message, members.get(ref.conv, []) if ref.channel == "gm" else [])
            out.append([u for u in dict.fromkeys(everyone) if u != message.get("from")])
        return out

    async def plan_message(self, message: dict[str, Any], recipients: list[str], offline: set[str]) -> None:
        """One message: a push window for each of its offline recipients, a reminder for each."""
        ref = conversation_of(message)
        if self._push_on:
            for user in recipients:
                if user in offline:
                    await self._extend_window(user, ref, message)
        if self._reminder_after_secs > 0:
            for user in recipients:
                await self._arm_reminder(user, ref, message)

    async def offline(self, users: list[str]) -> list[str]:
        """Those of users with no socket here nor on any live process (models/presence.py's onlineOn)."""
        candidates = [u for u in users if not self._sockets.is_online(u)]
        if not candidates:
            return []
        online_on: dict[str, list[str]] = {}
        async for doc in self._db.presence.find({"_id": {"$in": candidates}}, {"onlineOn": 1}):
            if doc.get("onlineOn"):
                online_on[doc["_id"]] = list(doc["onlineOn"])
        alive: set[str] = set()
        instances = {i for ids in online_on.values() for i in ids}
        if instances:
            fresh = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=INSTANCE_STALE_AFTER_SECS)
            async for doc in self._db.instances.find({"_id": {"$in": sorted(instances)}}):
                if beat_of(doc) >= fresh:
                    alive.add(doc["_id"])
        return [u for u in candidates if not any(i in alive for i in online_on.get(u, []))]

    async def _extend_window(self, user: str, ref: ConversationRef, message: dict[str, Any]) -> None:
        key = f"{user}|{ref.key}"
        open_window = {"type": "push.needed", "windowKey": key, "open": True, "status": "pending"}
        mentioned = ref.channel == "gm" and user in (message.get("at") or [])
        if await self._events.find_one(open_window, {"_id": 1}) is not None:
            await self._events.update_one(
                {**open_window, "data.seq": {"$lt": message["seq"]}},
                {"$set": {"data.seq": message["seq"], "data.messageId": message["id"]}},
            )
            if mentioned:
                await self._events.update_one(open_window, {"$set": {"data.mentioned": True}})
            return
        data: dict[str, Any] = {"user": user, **where(ref, user), "messageId": message["id"], "seq": message["seq"]}
        data["unread"] = 0  # counted when the window closes (prepare)
        if ref.channel == "gm":
            data["mentioned"] = mentioned
        doc = self._outbox.build("push.needed", data, due_in_secs=self._coalesce_secs)
        if doc is not None:
            doc.update({"windowKey": key, "open": True, "conv": ref.key})
            await self._outbox.store(doc)

    async def _arm_reminder(self, user: str, ref: ConversationRef, message: dict[str, Any]) -> None:
        key = f"{user}|{ref.key}"
        existing = await self._events.find_one({"remKey": key, "remOpen": True})
        if existing is not None:
            if await self.read_seq(user, ref) < existing["data"]["seq"]:
                return  # one reminder while it stays unread, not repeated
            await self._events.update_one({"_id": existing["_id"]}, {"$set": {"remOpen": False}})
        data = {
            "user": user,
            **where(ref, user),
            "messageId": message["id"],
            "seq": message["seq"],
            "unreadSince": message["createdAt"],
        }
        doc = self._outbox.build("message.unread_reminder", data, due_in_secs=self._reminder_after_secs)
        if doc is not None:
            doc.update({"remKey": key, "remOpen": True, "conv": ref.key})
            await self._outbox.store(doc)

    async def read_seq(self, user: str, ref: ConversationRef) -> int:
        cursor = await self._db.cursors.find_one({"user": user, "channel": ref.channel, "conv": ref.conv}, {"read": 1})
        return int(cursor.get("read", 0)) if cursor else 0

    async def total_unread(self, user: str) -> int:
        """The user's unread over all its conversations (as GET /conversations counts them)."""
        group_ids = await self._groups.ids_for_user(user)
        summaries = await self._conversations.find_summaries(user, group_ids)
        group_cursors = await self._conversations.get_group_cursors(
            user, [s["conv"] for s in summaries if s["channel"] == "gm"]
        )
        return sum(await self._conversations.unread_counts(user, summaries, group_cursors))

    async def prepare(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Before the first attempt: a closed push window gets its unread count (kept for retries);
        a reminder whose message was read meanwhile is cancelled (None)."""
        if doc.get("attempts") != 1 or "conv" not in doc:
            return doc
        user = doc["data"]["user"]
        if doc["type"] == "push.needed":
            data = {**doc["data"], "unread": await self.total_unread(user)}
            if "mentioned" in data:  # nx-27017 hands a $set true back as 1
                data["mentioned"] = bool(data["mentioned"])
            await self._events.update_one({"_id": doc["_id"]}, {"$set": {"data": data}})
            return {**doc, "data": data}
        if doc["type"] == "message.unread_reminder":
            ref = ConversationRef.from_key(doc["conv"])
            if await self.read_seq(user, ref) >= doc["data"]["seq"]:
                await self._events.update_one({"_id": doc["_id"]}, {"$set": {"status": "cancelled", "remOpen": False}})
                return None
        return doc


def unix_to_iso(seconds: float) -> str:
    return iso(datetime.datetime.fromtimestamp(seconds, datetime.UTC))
