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
answers non-2xx, redirects (follow_redirects=False), answers garbage, hangs past timeout_secs or
refuses the connection is a failed attempt, retried after 1 s, 2 s, 4 s … (at most
retry_max_secs apart) until max_age_hours, then the event is `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, IndexModel
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from models.conversations import ConversationStore
from models.database import Database
from models.groups import GroupStore
from models.outbox import COLLECTION, EventSink, NullSink, Outbox, wants
from server.config import Settings
from server.db import message_write_concern
from server.push import PLAN_LEASE_SECS, LocalSockets, PushPlanner

log = logging.getLogger(__name__)

POLL_SECS = 3.0
MIN_LOOP_SECS = 0.05  # under load, events are claimed and planned in batches at most this often
MAX_CONCURRENT_DELIVERIES = 32
FIRST_RETRY_SECS = 1.0
LEASE_EXTRA_SECS = 30.0  # a lease outlives the attempt's timeout by this much
ERROR_TEXT_CHARS = 200


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


class Dispatcher:
    def __init__(self, db: Database, settings: Settings, planner: PushPlanner | None):
        self._events = db[COLLECTION]
        self._webhooks = settings.webhooks
        self._urls = {"webhook": settings.webhooks.url, "push": settings.push.url or settings.webhooks.url}
        self._planner = planner
        self._wake = asyncio.Event()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._client: AsyncHTTPClient | None = None
        self._lease_secs = settings.webhooks.timeout_secs + LEASE_EXTRA_SECS

    def wake(self) -> None:
        """An event was stored by this process: look now, not at the next poll."""
        self._wake.set()

    def stored(self, doc: dict[str, Any]) -> None:
        """The outbox stored an event: a message to plan goes to the planner from memory."""
        if self._planner is not None and doc.get("plan") == "pending":
            self._planner.take(doc)
        self._wake.set()

    async def ensure_indexes(self) -> None:
        """The claim (status, dueAt), the planner's claim and the window / reminder look-ups."""
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
            self._client = AsyncHTTPClient(force_instance=True, max_clients=MAX_CONCURRENT_DELIVERIES)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop claiming; attempts in flight end (a lease left behind expires, the event is retried)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()  # before looking: a wake during the look is not lost
            started = loop.time()
            try:
                full = await self._work()
                # With every slot busy, a finished delivery wakes the loop; no need to poll.
                pause = POLL_SECS if full else await self._secs_until_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook dispatcher: cannot read the outbox; trying again")
                pause = POLL_SECS
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
            # Woken early by a burst of stored events: let the next batch gather a little.
            await asyncio.sleep(max(0.0, started + MIN_LOOP_SECS - loop.time()))

    async def _work(self) -> bool:
        """Plan pending messages (push/reminders), then start every due delivery there is room
        for. True when every delivery slot is busy."""
        if self._planner is not None:
            await self._planner.plan_pending()
        while (room := MAX_CONCURRENT_DELIVERIES - len(self._deliveries)) > 0:
            claimed = await self._claim(room)
            for doc in claimed:
                task = asyncio.get_running_loop().create_task(self._deliver(doc))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
            if len(claimed) < room:
                return False
        return True

    async def _claim(self, room: int) -> list[dict[str, Any]]:
        """Up to room due events, leased to this dispatcher (see the module docstring)."""
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

    async def _secs_until_due(self) -> float:
        """Until the next pending event is due (retries, coalescing windows), at most POLL_SECS."""
        nearest = await self._events.find_one({"status": {"$eq": "pending"}}, {"dueAt": 1}, sort=[("dueAt", ASCENDING)])
        if nearest is None:
            return POLL_SECS
        return max(0.05, min(POLL_SECS, float(nearest["dueAt"]) - time.time()))

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
        request = HTTPRequest(
            self._urls[doc.get("target", "webhook")],
            method="POST",
            body=body,
            headers=headers,
            follow_redirects=False,
            connect_timeout=self._webhooks.timeout_secs,
            request_timeout=self._webhooks.timeout_secs,
            decompress_response=False,
        )
        try:
            response = await self._client.fetch(request, raise_error=False)
        except Exception as exc:  # garbage on the wire, a reset, a bad URL: a failed attempt
            return f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_CHARS]
        if 200 <= response.code < 300:
            return None
        if response.code == 599:
            return f"{type(response.error).__name__}: {response.error}"[:ERROR_TEXT_CHARS]
        return f"HTTP {response.code}"

    async def _record(self, doc: dict[str, Any], error: str | None) -> None:
        now = time.time()
        mine = {"_id": doc["_id"], "claim": doc["claim"]}  # unless a later claim took it over
        if error is None:
            await self._events.update_one(
                mine, {"$set": {"status": "delivered", "deliveredAt": now, "lastError": None}}
            )
            return
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
        await self._events.update_one(mine, {"$set": update})


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
    dispatchers.append(Dispatcher(db, settings, planner))
    return outbox, outbox, dispatchers[0]
