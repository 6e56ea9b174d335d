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
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import aiohttp
from bson import ObjectId
from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.errors import PyMongoError

from models.batching import BatchedMarks, BatchedUpdates
from models.conversations import ConversationStore
from models.database import Database
from models.groups import GroupStore
from models.messages import message_to_wire
from models.outbox import (
    COLLECTION,
    MESSAGE_COLLECTIONS,
    MESSAGE_CREATED,
    EventSink,
    NullSink,
    Outbox,
    strip_content,
    wants,
)
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
LOCAL_HOOKS_MAX = 5000  # messages whose event waits in memory; beyond, they are claimed from the database
LOCAL_MARGIN_SECS = 5.0  # a message's event is delivered from memory only with this much lease to spare
HOOK_SWEEP_SECS = 3.0  # how often messages' events are searched in the database (other processes', retries)


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
    def __init__(self, db: Database, settings: Settings, planner: PushPlanner | None, *, claim_token: str):
        self._events = db[COLLECTION]
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

    def wake(self) -> None:
        """An event was stored by this process: look now, not at the next poll."""
        self._wake.set()

    def stored(self, doc: dict[str, Any]) -> None:
        """The outbox stored an event: a message to plan goes to the planner from memory."""
        if self._planner is not None and doc.get("plan") == "pending":
            self._planner.take(doc)
        self._wake.set()

    def born_lease(self) -> float:
        """How long a message stored now is leased to this process for its message.created (0:
        not running, or no room in memory: the database claim takes it at once)."""
        if self._task is None or len(self._local_hooks) >= LOCAL_HOOKS_MAX:
            return 0.0
        return self._lease_secs

    def message_stored(self, channel: str, message: dict[str, Any], hook: Mapping[str, Any]) -> None:
        """A message this process stored, its event born leased to us: delivered from memory."""
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
        try:  # bounded, like the rest of shutting down
            await asyncio.wait_for(self._release_local(), STOP_TIMEOUT_SECS)
        except (TimeoutError, PyMongoError) as exc:
            log.warning("webhook dispatcher: new messages' events stay leased until their lease ends: %s", exc)
        if self._client is not None:
            client, self._client = self._client, None
            try:  # bounded: shutting down never waits on a receiver
                await asyncio.wait_for(client.close(), STOP_TIMEOUT_SECS)
            except TimeoutError:
                log.warning("webhook dispatcher: connections to the receiver did not close in time")

    async def _release_local(self) -> None:
        """Messages still waiting in memory: due now, so the next process need not wait out their lease."""
        by_channel: dict[str, list[str]] = {}
        while self._local_hooks:
            channel, message, _hook = self._local_hooks.popleft()
            by_channel.setdefault(channel, []).append(message["id"])
        for channel, ids in by_channel.items():
            await self._messages[channel].update_many(
                {"_id": {"$in": ids}, "hookClaim": self.claim_token, "hook": "pending"}, {"$set": {"hookDue": 0.0}}
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()  # before looking: a wake during the look is not lost
            started = loop.time()
            try:
                full = await self._work()
                # With every slot busy, a finished delivery wakes the loop; no need to poll.
                pause = POLL_SECS if full else await self._secs_until_due()
            except asyncio.CancelledError:
                raise
            except Exception:
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
        """Up to room of this process's new messages whose born lease leaves time for an attempt
        (the others stay pending in the database and are claimed there)."""
        now = time.time()
        taken: list[dict[str, Any]] = []
        while self._local_hooks and len(taken) < room:
            channel, message, hook = self._local_hooks.popleft()
            if float(hook["hookDue"]) - now > self._webhooks.timeout_secs + LOCAL_MARGIN_SECS:
                taken.append(self._hook_event(channel, message, 1, hook["hookClaim"], float(hook["hookAgeFrom"])))
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
        claimed = await self._claim_events(room)
        now = time.time()
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

    async def _secs_until_due(self) -> float:
        """Until the next pending event is due (retries, coalescing windows) or the next look at
        the messages' own events, at most POLL_SECS."""
        until_sweep = self._next_hook_sweep - time.time()
        nearest = await self._events.find_one({"status": {"$eq": "pending"}}, {"dueAt": 1}, sort=[("dueAt", ASCENDING)])
        if nearest is None:
            return max(0.05, min(POLL_SECS, until_sweep))
        return max(0.05, min(POLL_SECS, until_sweep, float(nearest["dueAt"]) - time.time()))

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

    async def _record_hook(self, doc: dict[str, Any], error: str | None) -> None:
        """A message's event: the outcome in the message document (unless a later claim took it)."""
        if error is None:  # hookAttempts already counts this attempt (its claim, or its birth)
            await self._hooks_delivered[doc["source"]].mark(doc["claim"], doc["_id"])
            return
        now = time.time()
        mine = {"_id": doc["_id"], "hookClaim": doc["claim"]}
        update: dict[str, Any] = {"hookAttempts": doc["attempts"], "hookError": error}
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


def build_events(
    settings: Settings, db: Database, sockets: LocalSockets, groups: GroupStore, conversations: ConversationStore
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
        born_lease=lambda: dispatchers[0].born_lease(),
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
    dispatchers.append(Dispatcher(db, settings, planner, claim_token=claim_token))
    return outbox, outbox, dispatchers[0]
