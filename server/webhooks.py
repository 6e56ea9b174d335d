"""The webhook dispatcher: delivers the outbox (models/outbox.py) at least once, signed (SPEC §11).

One dispatcher per process. It claims due events in batches: one find of the due ids, one
update_many that moves their `dueAt` (and `leaseUntil`) a lease ahead and stamps them with this
claim's token (the filter re-checks that each is still due, so of two processes racing for an event
exactly one wins it), and one find of the ids that carry the token. Another process never works on
the same event at the same time, and an event whose process died (kill -9) is due again once the
lease runs out. It is woken in-process when an event is stored, looks at most every
MIN_LOOP_SECS under load (so a burst of sends costs a few batched queries, not a few per send),
and otherwise polls only slowly (POLL_SECS) for retries and the events of other processes: idle,
it costs one small query every few seconds.

Every query names `status` (or `plan`) with `$eq`: nx-27017 uses the compound indexes only then,
and would otherwise scan every stored event on every claim.

A message's message.created is born "sent" to this process (models/outbox.py) and delivered from
memory; a delivery writes nothing per message: the dispatcher tracks its births in order and, at
most every PROGRESS_SECS, writes one document saying below which birth stamp everything is settled.
A birth whose insert never reported back (an unknown outcome, a failure after the insert) is
released as pending after BIRTH_GRACE_SECS; every TAKEOVER_SECS the dispatcher looks for processes
whose heartbeat is stale with their progress still open, and releases their unsettled messages.

A send never waits for it: emit() only stores; the HTTP POST happens here, later. A receiver that
answers non-2xx, redirects (not followed), answers garbage, hangs past timeout_secs or
refuses the connection is a failed attempt, retried after 1 s, 2 s, 4 s … (at most
retry_max_secs apart) until max_age_hours, then the event is `failed`. Attempts go over keep-alive
connections (aiohttp's pool), and the outcomes of concurrent attempts are written back in one bulk
write: per delivered event, the dispatcher's own database work is a share of a few batched commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from bson import ObjectId
from pymongo import ASCENDING, IndexModel, UpdateOne

from models.batching import BatchedMarks, BatchedUpdates
from models.clock import utcnow
from models.conversations import ConversationStore
from models.database import Database
from models.groups import GroupStore
from models.messages import message_to_wire
from models.outbox import (
    COLLECTION,
    MESSAGE_COLLECTIONS,
    MESSAGE_CREATED,
    PROGRESS,
    SENT,
    EventSink,
    NullSink,
    Outbox,
    in_flight,
    strip_content,
    wants,
)
from models.presence import INSTANCE_STALE_AFTER_SECS, beat_of
from server.config import Settings
from server.db import message_write_concern, process_token
from server.push import PLAN_LEASE_SECS, LocalSockets, PushPlanner

log = logging.getLogger(__name__)

POLL_SECS = 3.0
MIN_LOOP_SECS = 0.05  # under load, events are claimed and planned in batches at most this often
MAX_CONCURRENT_DELIVERIES = 32
FIRST_RETRY_SECS = 1.0
LEASE_EXTRA_SECS = 30.0  # a lease outlives the attempt's timeout by this much
ERROR_TEXT_CHARS = 200
STOP_TIMEOUT_SECS = 5.0
GOODBYE_TIMEOUT_SECS = 0.5  # to delete the progress document at a stop with nothing to give back
LOCAL_HOOKS_MAX = 5000  # messages whose event waits in memory; beyond, they are claimed from the database
HOOK_SWEEP_SECS = 3.0  # how often messages' events are searched in the database (other processes', retries)
PROGRESS_SECS = 0.25  # at most this often, one write says which births are settled (a kill -9 re-sends those since)
BIRTH_GRACE_SECS = 120.0  # a birth whose insert never reported back is released (pending) after this
TAKEOVER_SECS = 10.0  # how often dead processes' unsettled messages are looked for
DEAD_AFTER_SECS = INSTANCE_STALE_AFTER_SECS  # a heartbeat this old: the process is gone
# Birth stamps are unix seconds in steps of 100 µs: a $set on nx-27017 keeps 15 significant digits
# of a double, so a finer `below` would not compare as written.
STAMP_DIGITS = 4
STAMP_QUANTUM_SECS = 10.0**-STAMP_DIGITS
RELEASED = {"hook": "pending", "hookDue": 0.0, "hookClaim": None}  # due now, claimed from the database


@dataclass(slots=True)
class Birth:
    """A message's event born "sent" to this process, until it is settled (delivered, or written back)."""

    stamp: float
    born_at: float  # time.monotonic()
    # inserting: the message's insert has not reported back; stored: in memory or in flight;
    # unrecorded: an attempt's outcome (or the attempt itself) failed to reach the database
    state: str = "inserting"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-IM-Signature header: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def event_body(doc: dict[str, Any]) -> bytes:
    payload = {"id": doc["_id"], "type": doc["type"], "createdAt": doc["createdAt"], "data": doc["data"]}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def retry_delay_secs(attempt: int, max_secs: float) -> float:
    """After attempt n (1, 2, …) failed: 1 s, 2 s, 4 s … at most max_secs."""
    return float(min(FIRST_RETRY_SECS * 2 ** min(attempt - 1, 30), max_secs))


async def _cancel_bounded(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel and wait; bounded, so a task that swallows its cancellation cannot hold up shutting down."""
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECS)
        if pending:
            log.warning("webhook dispatcher: %d tasks did not stop in time", len(pending))


class Dispatcher:
    def __init__(
        self, db: Database, settings: Settings, planner: PushPlanner | None, *, claim_token: str, instance_id: str
    ):
        self._events = db[COLLECTION]
        self._instances = db.instances
        self._webhooks = settings.webhooks
        self._urls = {"webhook": settings.webhooks.url, "push": settings.push.url or settings.webhooks.url}
        self._planner = planner
        self._wake = asyncio.Event()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._client: aiohttp.ClientSession | None = None
        # Results of concurrent attempts go to the database together (one bulk write per batch);
        # deliveries, the common outcome, as one update_many per claim.
        self._records = BatchedUpdates(self._events)
        self._delivered = BatchedMarks(
            self._events, "claim", lambda: {"status": "delivered", "deliveredAt": time.time(), "lastError": None}
        )
        self._lease_secs = settings.webhooks.timeout_secs + LEASE_EXTRA_SECS
        # message.created lives in the messages (models/outbox.py): this process's new ones wait
        # here, born leased to claim_token; others' and retries are claimed from the collections.
        self.claim_token = claim_token
        self._messages = {channel: db[channel] for channel in MESSAGE_COLLECTIONS}
        self._hook_records = {channel: BatchedUpdates(db[channel]) for channel in MESSAGE_COLLECTIONS}
        self._hooks_delivered = {
            channel: BatchedMarks(
                db[channel],
                "hookClaim",
                lambda: {"hook": "delivered", "hookDeliveredAt": time.time(), "hookError": None},
            )
            for channel in MESSAGE_COLLECTIONS
        }
        self._local_hooks: deque[tuple[str, dict[str, Any], Mapping[str, Any]]] = deque()
        self._next_hook_sweep = 0.0  # when to look in the collections next
        # This process's births, oldest first (stamps only grow, dicts keep insertion order), and
        # the progress document that settles them (models/outbox.py); instance_id: its heartbeat.
        self._births: dict[str, Birth] = {}
        self._last_stamp = 0.0
        self._progress = db.get_collection(PROGRESS, write_concern=message_write_concern(settings))
        self._instance_id = instance_id
        self._registered = False  # the progress document exists: births may be "sent"
        self._written_below: float | None = None
        self._next_progress_write = 0.0  # time.monotonic()
        self._next_takeover = 0.0  # time.time()
        self._database_failing = False  # the claim loop's last round failed
        # webhook_events is read only when this process stored one, one of its retries or the
        # nearest due event is due, or POLL_SECS passed (others' events): not on every round that
        # messages' births wake under load.
        self._events_stored = 0  # events this process stored (or queued again) so far
        self._events_seen = -1  # ... when webhook_events was last read
        self._next_events_look = 0.0  # time.time()

    def stored(self, doc: dict[str, Any]) -> None:
        """The outbox stored an event: a message to plan goes to the planner from memory."""
        if self._planner is not None and doc.get("plan") == "pending":
            self._planner.take(doc)
        self._events_stored += 1
        self._wake.set()

    def birth(self, message_id: str) -> float | None:
        """The stamp of a message about to be stored whose event this process will deliver from
        memory; None (born pending, claimed from the database) when not running or full."""
        if self._task is None or not self._registered or len(self._births) >= LOCAL_HOOKS_MAX:
            return None
        stamp = self._last_stamp = round(max(time.time(), self._last_stamp + STAMP_QUANTUM_SECS), STAMP_DIGITS)
        self._births[message_id] = Birth(stamp, time.monotonic())
        return stamp

    def not_stored(self, message_id: str) -> None:
        """The message's insert was refused: its birth is settled, there is nothing to deliver."""
        birth = self._births.get(message_id)
        if birth is not None and birth.state == "inserting":
            del self._births[message_id]

    def message_stored(self, channel: str, message: dict[str, Any], hook: Mapping[str, Any]) -> None:
        """A message this process stored, its event born "sent" to us: delivered from memory."""
        birth = self._births.get(message["id"])
        if birth is not None and birth.state == "inserting":
            birth.state = "stored"
        # else: already released (an insert that took longer than BIRTH_GRACE_SECS): delivered
        # anyway, its outcome written like that of a claimed event
        self._local_hooks.append((channel, message, hook))
        self._wake.set()

    async def ensure_indexes(self) -> None:
        """The claim (status, dueAt), the planner's claim and the window / reminder look-ups;
        in each message collection, the claim of messages' own events (hook, hookDue)."""
        for collection in self._messages.values():
            await collection.create_indexes(
                [IndexModel([("hook", ASCENDING), ("hookDue", ASCENDING)], name="hook_due", sparse=True)]
            )
        await self._events.create_indexes(
            [
                IndexModel([("status", ASCENDING), ("dueAt", ASCENDING)], name="status_due"),
                IndexModel([("plan", ASCENDING), ("planLeaseUntil", ASCENDING)], name="plan"),
                IndexModel([("windowKey", ASCENDING)], name="window"),
                IndexModel([("remKey", ASCENDING)], name="reminder"),
            ]
        )

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            # Keep-alive connections to the receiver: a new TCP connection per event costs the
            # server (and the receiver) more CPU than the rest of the delivery.
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONCURRENT_DELIVERIES),
                timeout=aiohttp.ClientTimeout(total=self._webhooks.timeout_secs, connect=self._webhooks.timeout_secs),
                auto_decompress=False,
            )
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop claiming; attempts in flight end (a lease left behind expires, the event is retried)."""
        # The claim loop first, so that it starts no delivery after the deliveries are cancelled.
        if self._task is not None:
            claiming, self._task = self._task, None
            self._stopping = True  # a cancellation the driver turns into an error still ends the loop
            self._wake.set()
            await _cancel_bounded([claiming])
        await _cancel_bounded(list(self._deliveries))
        # Bounded, like the rest of shutting down, and short when nothing is held: then it only
        # deletes the progress document, which the next process would otherwise take over (so
        # not even tried when the database was just found failing).
        held = bool(self._local_hooks) or any(birth.state != "inserting" for birth in self._births.values())
        if not held and (self._database_failing or not self._registered):
            return await self._close_client()
        release = asyncio.ensure_future(self._release_local())
        release.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved: no noise
        await asyncio.wait([release], timeout=STOP_TIMEOUT_SECS if held else GOODBYE_TIMEOUT_SECS)
        if not release.done() or release.cancelled() or release.exception() is not None:
            release.cancel()
            log.warning("webhook dispatcher: undelivered events (if any) wait for another process to take them")
        await self._close_client()

    async def _close_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:  # bounded: shutting down never waits on a receiver
                await asyncio.wait_for(client.close(), STOP_TIMEOUT_SECS)
            except TimeoutError:
                log.warning("webhook dispatcher: connections to the receiver did not close in time")

    async def _release_local(self) -> None:
        """Messages whose event was not delivered yet become pending, due now (the next process
        takes them at once); then the progress document goes, unless an insert is still out."""
        ids = {message["id"] for _channel, message, _hook in self._local_hooks}
        ids.update(message_id for message_id, birth in self._births.items() if birth.state != "inserting")
        self._local_hooks.clear()
        await self._release(sorted(ids))
        if self._births:
            await self._write_progress()  # the rest is for the process that takes over
        elif self._registered:
            # every "sent" message of a process without a progress document is delivered
            await self._progress.delete_one({"_id": self.claim_token})

    async def _release(self, ids: list[str]) -> None:
        """Births of this process given back: pending and due now, then settled. Every channel is
        asked: a birth whose insert never reported back does not know its own."""
        if not ids:
            return
        for collection in self._messages.values():
            await collection.update_many(
                {"_id": {"$in": ids}, "hookClaim": self.claim_token, "hook": {"$eq": SENT}}, {"$set": RELEASED}
            )
        for message_id in ids:
            self._births.pop(message_id, None)

    def _below(self) -> float:
        """Every birth stamped below this is settled: the oldest unsettled one's stamp."""
        for birth in self._births.values():
            return birth.stamp
        return round(self._last_stamp + STAMP_QUANTUM_SECS, STAMP_DIGITS)

    async def _write_progress(self, *, now: bool = True) -> None:
        """The progress document (models/outbox.py); with now=False only if changed and not
        written within PROGRESS_SECS: a few small updates a second under load, none while idle."""
        below = self._below()
        if not now and (below == self._written_below or time.monotonic() < self._next_progress_write):
            return
        await self._progress.update_one(
            {"_id": self.claim_token},
            {"$set": {"below": below, "state": "open", "instance": self._instance_id}},
            upsert=True,
        )
        self._written_below = below
        self._next_progress_write = time.monotonic() + PROGRESS_SECS

    async def _settle_births(self) -> None:
        """Registers this process before its first birth, releases the births that will not be
        settled otherwise (unrecorded outcomes, inserts that never reported back), writes progress."""
        if not self._registered:
            await self._write_progress()
            self._registered = True
            return
        oldest_insert = time.monotonic() - BIRTH_GRACE_SECS
        await self._release(
            [
                message_id
                for message_id, birth in self._births.items()
                if birth.state == "unrecorded" or (birth.state == "inserting" and birth.born_at < oldest_insert)
            ]
        )
        await self._write_progress(now=False)

    async def _take_over(self) -> None:
        """The unsettled messages of processes that died (heartbeat stale, progress still open)
        become pending, due now; the dead process's progress document goes."""
        others = await self._progress.find({"state": "open", "_id": {"$ne": self.claim_token}}).to_list()
        if not others:
            return
        instances = {
            doc["_id"]: doc
            async for doc in self._instances.find({"_id": {"$in": [doc.get("instance") for doc in others]}})
        }
        now = utcnow()
        for progress in others:
            instance = instances.get(progress.get("instance"))
            if instance is not None and (now - beat_of(instance)).total_seconds() < DEAD_AFTER_SECS:
                continue
            released = 0
            for collection in self._messages.values():
                result = await collection.update_many(
                    in_flight(progress["_id"], float(progress["below"])), {"$set": RELEASED}
                )
                released += result.modified_count
            # unless it wrote progress meanwhile: alive after all, looked at again later (and if it
            # writes progress later, its upsert opens it again)
            await self._progress.delete_one({"_id": progress["_id"], "below": progress["below"]})
            log.info(
                "webhook dispatcher: took over %d undelivered events of gone process %s", released, progress["_id"]
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()  # before looking: a wake during the look is not lost
            started = loop.time()
            try:
                full = await self._work()
                # With every slot busy, a finished delivery wakes the loop; no need to poll.
                pause = POLL_SECS if full else self._secs_until_due()
                self._database_failing = False
            except asyncio.CancelledError:
                raise
            except Exception:
                self._database_failing = True
                if self._stopping:
                    return
                log.exception("webhook dispatcher: cannot read the outbox; trying again")
                pause = POLL_SECS
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
            # Woken early by a burst of stored events: let the next batch gather a little.
            await asyncio.sleep(max(0.0, started + MIN_LOOP_SECS - loop.time()))

    async def _work(self) -> bool:
        """Plan pending messages (push/reminders), then start every due delivery there is room
        for: this process's new messages from memory first. True when every delivery slot is busy."""
        await self._settle_births()
        if self._planner is not None:
            await self._planner.plan_pending()
        self._start(self._take_local(self._room()))
        while (room := self._room()) > 0:
            claimed = await self._claim(room)
            self._start(claimed)
            if len(claimed) < room:
                return False
        return True

    def _room(self) -> int:
        return MAX_CONCURRENT_DELIVERIES - len(self._deliveries)

    def _start(self, docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            task = asyncio.get_running_loop().create_task(self._deliver(doc))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    def _take_local(self, room: int) -> list[dict[str, Any]]:
        """Up to room of this process's new messages, oldest first."""
        taken: list[dict[str, Any]] = []
        while self._local_hooks and len(taken) < room:
            channel, message, hook = self._local_hooks.popleft()
            event = self._hook_event(channel, message, 1, hook["hookClaim"], float(hook["hookAgeFrom"]))
            # a tracked birth settles without a write; one already released is marked like a claim's
            event["tracked"] = message["id"] in self._births
            taken.append(event)
        return taken

    def _hook_event(
        self, channel: str, message: dict[str, Any], attempts: int, claim: str, age_from: float
    ) -> dict[str, Any]:
        """A message's message.created, shaped as an event document for _deliver (`source`: its channel)."""
        data = {"message": message}
        return {
            "_id": message["id"],
            "type": MESSAGE_CREATED,
            "createdAt": message["createdAt"],
            "data": data if self._webhooks.include_content else strip_content(data),
            "target": "webhook",
            "attempts": attempts,
            "claim": claim,
            "ageFrom": age_from,
            "source": channel,
        }

    async def _claim(self, room: int) -> list[dict[str, Any]]:
        """Up to room due events, leased to this dispatcher (see the module docstring): stored
        events, then (every HOOK_SWEEP_SECS, or sooner for a retry this process scheduled)
        messages' own."""
        now = time.time()
        claimed: list[dict[str, Any]] = []
        if self._events_stored != self._events_seen or now >= self._next_events_look:
            seen = self._events_stored
            claimed = await self._claim_events(room)
            next_look = now if len(claimed) >= room else await self._nearest_due()  # full: more may be due
            self._events_seen, self._next_events_look = seen, next_look
        if now >= self._next_takeover:
            self._next_takeover = now + TAKEOVER_SECS
            await self._take_over()
        if len(claimed) < room and now >= self._next_hook_sweep:
            self._next_hook_sweep = now + HOOK_SWEEP_SECS
            for channel in MESSAGE_COLLECTIONS:
                claimed += await self._claim_hooks(channel, room - len(claimed))
                if len(claimed) >= room:
                    self._next_hook_sweep = now  # more may be due: look again next round
                    break
        return claimed

    async def _claim_events(self, room: int) -> list[dict[str, Any]]:
        now = time.time()
        due = {"status": {"$eq": "pending"}, "dueAt": {"$lte": now}}
        found = await self._events.find(due, {"_id": 1}).sort("dueAt", ASCENDING).limit(room).to_list()
        if not found:
            return []
        ids = [doc["_id"] for doc in found]
        lease = now + self._lease_secs
        token = str(ObjectId())
        await self._events.update_many(
            {"_id": {"$in": ids}, **due},
            {"$set": {"dueAt": lease, "leaseUntil": lease, "claim": token, "open": False}, "$inc": {"attempts": 1}},
        )
        claimed: list[dict[str, Any]] = await self._events.find({"_id": {"$in": ids}, "claim": token}).to_list()
        claimed.sort(key=lambda doc: ids.index(doc["_id"]))
        return claimed

    async def _claim_hooks(self, channel: str, room: int) -> list[dict[str, Any]]:
        """The same claim, on the messages of one channel whose message.created is due."""
        collection = self._messages[channel]
        now = time.time()
        due = {"hook": {"$eq": "pending"}, "hookDue": {"$lte": now}}
        found = await collection.find(due, {"_id": 1}).sort("hookDue", ASCENDING).limit(room).to_list()
        if not found:
            return []
        ids = [doc["_id"] for doc in found]
        token = str(ObjectId())
        await collection.update_many(
            {"_id": {"$in": ids}, **due},
            {"$set": {"hookDue": now + self._lease_secs, "hookClaim": token}, "$inc": {"hookAttempts": 1}},
        )
        won = await collection.find({"_id": {"$in": ids}, "hookClaim": token}).to_list()
        won.sort(key=lambda doc: ids.index(doc["_id"]))
        return [
            self._hook_event(channel, message_to_wire(doc), int(doc["hookAttempts"]), token, float(doc["hookAgeFrom"]))
            for doc in won
        ]

    async def _nearest_due(self) -> float:
        """When to look at webhook_events again: the nearest pending event's due time (retries,
        coalescing windows), at most POLL_SECS from now (others' new events)."""
        now = time.time()
        nearest = await self._events.find_one({"status": {"$eq": "pending"}}, {"dueAt": 1}, sort=[("dueAt", ASCENDING)])
        return min(now + POLL_SECS, float(nearest["dueAt"]) if nearest is not None else math.inf)

    def _secs_until_due(self) -> float:
        """Until the next look at webhook_events or at the messages' own events, at most POLL_SECS."""
        now = time.time()
        if self._events_stored != self._events_seen:
            return 0.0
        return max(0.05, min(POLL_SECS, self._next_hook_sweep - now, self._next_events_look - now))

    async def _deliver(self, doc: dict[str, Any]) -> None:
        try:
            if self._planner is not None:
                prepared = await self._planner.prepare(doc)
                if prepared is None:
                    return  # a reminder for a message read meanwhile: cancelled
                doc = prepared
            error = await self._post(doc)
            await self._record(doc, error)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook dispatcher: event %s could not be handled", doc.get("_id"))
            birth = self._births.get(doc["_id"]) if doc.get("tracked") else None
            if birth is not None:
                birth.state = "unrecorded"  # released (due again) by the next round
        finally:
            self._wake.set()  # a slot is free

    async def _post(self, doc: dict[str, Any]) -> str | None:
        """One attempt; None when delivered (2xx), otherwise what went wrong (no body text kept)."""
        assert self._client is not None
        body = event_body(doc)
        headers = {
            "Content-Type": "application/json",
            "X-IM-Event-Id": doc["_id"],
            "X-IM-Event-Type": doc["type"],
            "X-IM-Attempt": str(doc["attempts"]),
            "X-IM-Signature": sign(self._webhooks.secret, int(time.time()), body),
        }
        try:
            async with self._client.post(
                self._urls[doc.get("target", "webhook")], data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
        except TimeoutError:
            return f"timeout after {self._webhooks.timeout_secs:g}s"
        except Exception as exc:  # refused, garbage on the wire, a reset, a bad URL: a failed attempt
            return f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS]
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    async def _record(self, doc: dict[str, Any], error: str | None) -> None:
        if "source" in doc:
            await self._record_hook(doc, error)
            return
        if error is None:
            await self._delivered.mark(doc["claim"], doc["_id"])
            return
        now = time.time()
        mine = {"_id": doc["_id"], "claim": doc["claim"]}  # unless a later claim took it over
        delay = retry_delay_secs(doc["attempts"], self._webhooks.retry_max_secs)
        expired = now + delay > float(doc.get("ageFrom", now)) + self._webhooks.max_age_hours * 3600
        update: dict[str, Any] = {"lastError": error, "leaseUntil": 0.0}
        if expired:
            update["status"] = "failed"
            log.warning(
                "webhook event %s (%s) failed after %d attempts: %s", doc["_id"], doc["type"], doc["attempts"], error
            )
        else:
            update["dueAt"] = now + delay
        await self._records.update(UpdateOne(mine, {"$set": update}))
        self._events_stored += 1  # its retry is due later: the next round reads when

    async def _record_hook(self, doc: dict[str, Any], error: str | None) -> None:
        """A message's event: the outcome in the message document (unless a later claim took it);
        a delivered birth is only settled, in memory (the progress document says it)."""
        if error is None:  # hookAttempts already counts this attempt (its claim, or its birth)
            if doc.get("tracked"):
                self._births.pop(doc["_id"], None)
            else:
                await self._hooks_delivered[doc["source"]].mark(doc["claim"], doc["_id"])
            return
        now = time.time()
        mine = {"_id": doc["_id"], "hookClaim": doc["claim"]}
        update: dict[str, Any] = {"hook": "pending", "hookAttempts": doc["attempts"], "hookError": error}
        delay = retry_delay_secs(doc["attempts"], self._webhooks.retry_max_secs)
        if now + delay > doc["ageFrom"] + self._webhooks.max_age_hours * 3600:
            update["hook"] = "failed"
            log.warning(
                "webhook event %s (message.created) failed after %d attempts: %s", doc["_id"], doc["attempts"], error
            )
        else:
            update["hookDue"] = now + delay
            self._next_hook_sweep = min(self._next_hook_sweep, now + delay)  # the retry, on time
        await self._hook_records[doc["source"]].update(UpdateOne(mine, {"$set": update}))
        if doc.get("tracked"):
            self._births.pop(doc["_id"], None)  # settled: its state is written


def build_events(
    settings: Settings,
    db: Database,
    sockets: LocalSockets,
    groups: GroupStore,
    conversations: ConversationStore,
    instance_id: str,
) -> tuple[EventSink, Outbox | None, Dispatcher | None]:
    """The sink domain services emit to, the outbox (admin API) and this process's dispatcher;
    a NullSink and no dispatcher when neither a webhook nor a push url is configured."""
    webhook_on = bool(settings.webhooks.url)
    push_on = bool(settings.push.url or settings.webhooks.url)
    if not push_on:
        return NullSink(), None, None
    reminders_on = settings.reminders.after_secs > 0
    # Filled in below: the outbox hands events to the dispatcher and asks the planner, built after it.
    dispatchers: list[Dispatcher] = []
    planners: list[PushPlanner] = []
    claim_token = process_token()
    outbox = Outbox(
        db,
        message_write_concern(settings),
        events=settings.webhooks.events,
        include_content=settings.webhooks.include_content,
        webhook_on=webhook_on,
        push_on=push_on,
        plan_messages=wants(settings.webhooks.events, "push.needed") or reminders_on,
        stored=lambda doc: dispatchers[0].stored(doc),
        plan_lease_secs=PLAN_LEASE_SECS,
        needs_plan=lambda message: planners[0].needs_plan(message),
        message_stored=lambda channel, message, hook: dispatchers[0].message_stored(channel, message, hook),
        birth=lambda message_id: dispatchers[0].birth(message_id),
        not_stored=lambda message_id: dispatchers[0].not_stored(message_id),
        local_claim=claim_token,
    )
    planner = PushPlanner(
        db,
        outbox,
        sockets,
        groups,
        conversations,
        push_on=wants(settings.webhooks.events, "push.needed"),
        coalesce_secs=settings.push.coalesce_secs,
        reminder_after_secs=settings.reminders.after_secs if reminders_on else 0.0,
    )
    planners.append(planner)
    dispatchers.append(Dispatcher(db, settings, planner, claim_token=claim_token, instance_id=instance_id))
    return outbox, outbox, dispatchers[0]
