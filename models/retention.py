"""Retention (SPEC §15): what is kept how long, and the purge that deletes the rest.

One purge deletes, in bounded batches:
- messages of each channel whose `createdMs` (`createdAt` in milliseconds) is older than that
  channel's limit (`sm_days`, `pm_days`, `gm_days`; 0 keeps forever), except those of held
  conversations (models/holds.py) and except the newest message of each conversation (see below);
  (a deleted message that was recalled or edited takes its kept versions, models/recall.py, along);
- files (GridFS) uploaded more than a day ago that no kept message carries (nor a kept version of
  a recalled or edited one: the original is never lost while its message is kept) and no held
  user owns;
- audit entries older than `audit_days` and delivered webhook events older than `webhook_days`.
It records one `retention.purged` audit entry with the counts.

seq is never reused. models/messages.py allocates the next seq as the newest *stored* seq of the
conversation plus one (after a restart, or once its cache forgot the conversation), so deleting a
conversation's newest message would hand its seq out again. The purge therefore keeps every
message whose seq is at or above the conversation summary's `lastSeq` (the summary is written
after its message, so that message exists), whatever its age: a conversation silent for longer
than its limit keeps its last message — the one its summary shows as `lastMessage` anyway.

Summaries, unread counts and backlogs stay right: a purge deletes the oldest messages of a
conversation (a prefix, in seq order) and raises the summary's `purgedSeq` to the highest seq it
deleted. Nothing else of the summary changes (lastSeq, lastMessage, the markers); unread counts
only what is above both the read marker and purgedSeq (models/inbox.py), and a reconnecting
socket's backlog starts above purgedSeq, so the missing seqs are not waited for as a gap.

Batches: a purge walks each collection oldest first in time windows (a message's `createdMs`, an
audit entry's `key`, a delivered event's `deliveredAt`, each indexed), sized so that a window holds about
`batch_size` documents: a window that comes back over WINDOW_CAP_FACTOR batches is retried
smaller, one that comes back light doubles. Why windows and not "the next batch_size documents
past the cutoff": nx-27017 reads every document a range matches before it applies a limit, so a
`$lt cutoff` query over 500,000 old messages costs seconds per batch, while a window's range matches
about one batch. Messages are walked by the number `createdMs`, not the date `createdAt`: nx-27017
compares dates through a function its index cannot serve, so a `createdAt` window reads the whole
collection (0.5–0.9 s at 500,000 messages, bench/s10_retention.py) where a `createdMs` window
reads its own documents; a message stored before `createdMs` existed gets it from `createdAt`
first (`_backfill_created_ms`). Each window's documents are deleted `batch_size` ids per round trip (`_id $in`,
which nx-27017 serves from `_id`), then the purge pauses about as long as that batch took (at
least MIN_PAUSE_SECS), so it takes at most about half of the database's time and sends keep
flowing. Windows are whole seconds (nx-27017 compares dates at whole seconds) and every
document's age is checked again here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pymongo
from gridfs import AsyncGridFSBucket
from gridfs.errors import NoFile
from pymongo import ASCENDING, DESCENDING, UpdateOne, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection

from models.audit import AuditRecorder, time_key
from models.clock import unix_ms
from models.conversations import ConversationRef
from models.database import Database
from models.errors import Conflict, Forbidden
from models.files import BUCKET_NAME, MEDIA_CONTENT_TYPES_FILTER
from models.holds import HeldSet, HoldService
from models.principal import Principal

log = logging.getLogger(__name__)

CHANNELS = ("sm", "pm", "gm")
KINDS = ("sm", "pm", "gm", "audit", "webhook", "files")
FILE_GRACE = datetime.timedelta(days=1)  # a file just uploaded waits for the message that carries it
MIN_PAUSE_SECS = 0.005
# A batch's operations may take this long (not the client's 5 s: a loaded database answers a purge
# late, and a purge is background work that must finish rather than fail like a request).
BATCH_TIMEOUT_SECS = 60.0
MAX_PAUSE_SECS = 1.0
DAY_SECS = 86400
FIRST_WINDOW = datetime.timedelta(hours=1)
MIN_WINDOW = datetime.timedelta(seconds=1)  # read whole, however many documents it holds
MAX_WINDOW = datetime.timedelta(days=366)
WINDOW_CAP_FACTOR = 4  # a window of more than this many batches is retried smaller
EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)  # where a walk starts if the oldest has no time
# What the purge reads of a message: enough to decide, never its content.
MESSAGE_FIELDS = {"conv": 1, "seq": 1, "createdAt": 1, "recalled": 1, "editCount": 1}
VERSIONS_COLLECTION = "message_versions"  # models/recall.py: what a recalled or edited message was

BetweenBatches = Callable[[], Awaitable[None]]


class PurgeRunning(Conflict):
    """Another purge holds the lease (this process or another); try again when it is done."""

    code = "purge_running"


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind is kept, in days (0: forever), and the size of one delete."""

    sm_days: int = 365
    pm_days: int = 0
    gm_days: int = 0
    audit_days: int = 0
    webhook_days: int = 7
    batch_size: int = 1000

    def days(self, kind: str) -> int:
        return int(getattr(self, f"{kind}_days"))


@dataclasses.dataclass(frozen=True)
class TimeField:
    """An indexed field a walk goes by: its name, a time as the field stores it, and back."""

    name: str
    bound: Callable[[datetime.datetime], Any]
    to_time: Callable[[Any], datetime.datetime | None]


def require_admin(principal: Principal) -> None:
    if principal.role != "admin":
        raise Forbidden("only admin tokens may run a retention purge")


def as_utc(value: object) -> datetime.datetime | None:
    """A stored time as an aware UTC datetime (nx-27017 hands some back as text, models/clock.py)."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime.datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def time_of_key(key: object) -> datetime.datetime | None:
    """The time an audit key starts with (models/audit.py time_key: e20261128T140000123Z-…)."""
    if not isinstance(key, str) or len(key) < 19:
        return None
    try:
        return datetime.datetime.strptime(key[1:16], "%Y%m%dT%H%M%S").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


def time_of_unix(value: object, per_second: int = 1) -> datetime.datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return datetime.datetime.fromtimestamp(value / per_second, datetime.UTC)
    return None


def time_of_unix_ms(value: object) -> datetime.datetime | None:
    return time_of_unix(value, 1000)


CREATED_MS = TimeField("createdMs", unix_ms, time_of_unix_ms)
AUDIT_KEY = TimeField("key", time_key, time_of_key)
DELIVERED_AT = TimeField("deliveredAt", lambda moment: moment.timestamp(), time_of_unix)


async def _nothing() -> None:
    return None


class Purger:
    """One purge run's work (server/retention.py runs it under a lease, at start-up, periodically,
    and on demand)."""

    def __init__(
        self,
        db: Database,
        policy: RetentionPolicy,
        holds: HoldService,
        *,
        audit: AuditRecorder | None = None,
    ):
        self.policy = policy
        # Deletes are acknowledged, not journaled: a delete lost in a crash is redone by the next
        # purge, and nx-27017 turns j:true into an fsync per document.
        deletes = WriteConcern(w=1)
        self._db = db
        self._messages = {ch: db.get_collection(ch, write_concern=deletes) for ch in CHANNELS}
        self._summaries = db.get_collection("conversations", write_concern=deletes)
        self._audit_entries = db.get_collection("audit", write_concern=deletes)
        self._events = db.get_collection("webhook_events", write_concern=deletes)
        self._versions = db.get_collection(VERSIONS_COLLECTION, write_concern=deletes)
        self._files = db.get_collection(f"{BUCKET_NAME}.files")
        self._bucket = AsyncGridFSBucket(db, bucket_name=BUCKET_NAME, write_concern=deletes)
        self._holds = holds
        self._audit = audit

    async def purge(
        self,
        actor: Principal | None = None,
        *,
        now: datetime.datetime | None = None,
        between_batches: BetweenBatches = _nothing,
    ) -> dict[str, int]:
        """Delete what is past its limit; returns {"sm", "pm", "gm", "audit", "webhook", "files"}.

        actor: who asked (None: the server's own schedule); between_batches: awaited after every
        batch (the lease's renewal, which raises if the lease was lost).
        """
        now = now or datetime.datetime.now(datetime.UTC)
        started = time.monotonic()
        counts = dict.fromkeys(KINDS, 0)  # filled in as batches are deleted
        try:
            await self._purge_all(now, counts, between_batches)
        finally:
            # A purge stopped half-way (lease lost, database away) still records what it deleted.
            log.info("retention purge ended after %.1fs: %s", time.monotonic() - started, counts)
            if self._audit is not None:
                user, role, via = (actor.user_id, actor.role, "rest") if actor else ("system", "system", "system")
                with pymongo.timeout(BATCH_TIMEOUT_SECS):
                    await self._audit.record(user, role, "retention.purged", via, {"purged": dict(counts)})
        return counts

    async def _purge_all(self, now: datetime.datetime, counts: dict[str, int], between: BetweenBatches) -> None:
        for channel in CHANNELS:
            days = self.policy.days(channel)
            if days > 0:
                await self._purge_messages(channel, now - datetime.timedelta(days=days), counts, between)
        await self._purge_files(now - FILE_GRACE, counts, between)
        if self.policy.audit_days > 0:
            cutoff = now - datetime.timedelta(days=self.policy.audit_days)
            async for batch in self._windows(self._audit_entries, AUDIT_KEY, cutoff, {"_id": 1}):
                await self._delete_batch(self._audit_entries, batch, counts, "audit", between)
        if self.policy.webhook_days > 0:
            # Delivered events by delivery time (`deliveredAt`: unix seconds, models/outbox.py); $eq:
            # nx-27017 then uses the (status, deliveredAt) index.
            cutoff = now - datetime.timedelta(days=self.policy.webhook_days)
            delivered = {"status": {"$eq": "delivered"}}
            async for batch in self._windows(self._events, DELIVERED_AT, cutoff, {"_id": 1}, delivered):
                await self._delete_batch(self._events, batch, counts, "webhook", between)

    # ---- the walk ------------------------------------------------------------------------------

    async def _windows(
        self,
        collection: AsyncCollection[dict[str, Any]],
        field: TimeField,
        cutoff: datetime.datetime,
        projection: dict[str, Any],
        match: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The documents with field before cutoff, oldest first, in batches of at most batch_size.

        Window by window (see the module docstring): [start, start + window) in whole seconds,
        resized towards about one batch per window.
        """
        match = dict(match or {})
        batch_size = self.policy.batch_size
        cap = batch_size * WINDOW_CAP_FACTOR
        cutoff = cutoff.replace(microsecond=0)
        # The oldest: an index walk with a limit of one (no range, so nx-27017 stops at once).
        with pymongo.timeout(BATCH_TIMEOUT_SECS):
            first = await collection.find(match, {field.name: 1}).sort(field.name, ASCENDING).limit(1).to_list()
        if not first:
            return
        start = (field.to_time(first[0].get(field.name)) or EPOCH).replace(microsecond=0)
        window = FIRST_WINDOW
        while start < cutoff:
            end = min(start + window, cutoff)
            bounds = {"$gte": field.bound(start), "$lt": field.bound(end)}
            found = collection.find({**match, field.name: bounds}, projection)
            with pymongo.timeout(BATCH_TIMEOUT_SECS):
                docs = await (found if window <= MIN_WINDOW else found.limit(cap + 1)).to_list()
            if len(docs) > cap and window > MIN_WINDOW:
                window = max(MIN_WINDOW, _whole_seconds(window / WINDOW_CAP_FACTOR))
                continue  # too many for one window: the same start, smaller
            for offset in range(0, len(docs), batch_size):
                yield docs[offset : offset + batch_size]
            start = end
            if len(docs) < batch_size // 2:
                window = min(MAX_WINDOW, window * 2)
            elif len(docs) > batch_size * 2:
                window = max(MIN_WINDOW, _whole_seconds(window / 2))

    async def _delete_batch(
        self,
        collection: AsyncCollection[dict[str, Any]],
        batch: list[dict[str, Any]],
        counts: dict[str, int],
        kind: str,
        between: BetweenBatches,
    ) -> None:
        began = time.monotonic()
        with pymongo.timeout(BATCH_TIMEOUT_SECS):
            counts[kind] += await _delete_ids(collection, [doc["_id"] for doc in batch])
        await self._pause(began, between)

    # ---- messages ------------------------------------------------------------------------------

    async def _purge_messages(
        self, channel: str, cutoff: datetime.datetime, counts: dict[str, int], between: BetweenBatches
    ) -> None:
        """Messages of one channel created before cutoff, oldest first, a batch at a time."""
        cutoff = cutoff.replace(microsecond=0)  # nx-27017 compares whole seconds: keep the bound exact
        collection = self._messages[channel]
        last_seqs: dict[str, int] = {}  # conv -> the summary's lastSeq (only grows: safe to cache)
        await self._backfill_created_ms(collection, between)
        async for batch in self._windows(collection, CREATED_MS, cutoff, MESSAGE_FIELDS):
            began = time.monotonic()
            with pymongo.timeout(BATCH_TIMEOUT_SECS):
                counts[channel] += await self._delete_messages(channel, batch, cutoff, last_seqs)
            await self._pause(began, between)

    async def _backfill_created_ms(self, collection: AsyncCollection[dict[str, Any]], between: BetweenBatches) -> None:
        """Give messages stored without `createdMs` (before it existed) the one their `createdAt`
        says, a batch at a time; one without a readable createdAt gets 0 (its age unknown:
        `_may_delete` never takes it)."""
        missing = {"createdMs": {"$exists": False}}  # served by the created_ms index
        previous: set[Any] = set()
        while True:
            began = time.monotonic()
            with pymongo.timeout(BATCH_TIMEOUT_SECS):
                docs = await collection.find(missing, {"createdAt": 1}).limit(self.policy.batch_size).to_list()
                ids = {doc["_id"] for doc in docs}
                if not docs or ids <= previous:  # nothing left, or the last batch did not take
                    return
                updates = []
                for doc in docs:
                    created = as_utc(doc.get("createdAt"))
                    millis = unix_ms(created) if created is not None else 0
                    updates.append(UpdateOne({"_id": doc["_id"]}, {"$set": {"createdMs": millis}}))
                await collection.bulk_write(updates, ordered=False)
            previous = ids
            log.info("retention: gave %d %s messages their createdMs", len(docs), collection.name)
            await self._pause(began, between)

    async def _delete_messages(
        self, channel: str, batch: list[dict[str, Any]], cutoff: datetime.datetime, last_seqs: dict[str, int]
    ) -> int:
        """Delete the batch's messages that may go; raise their summaries' purgedSeq."""
        await self._load_last_seqs(channel, {doc["conv"] for doc in batch} - last_seqs.keys(), last_seqs)
        held = await self._holds.held_set()  # per batch: a hold placed during a purge counts at once
        doomed = [doc for doc in batch if self._may_delete(channel, doc, cutoff, last_seqs, held)]
        if not doomed:
            return 0
        removed = await _delete_ids(self._messages[channel], [doc["_id"] for doc in doomed])
        # A recalled or edited message's earlier versions (models/recall.py) go with it.
        changed = [doc["_id"] for doc in doomed if doc.get("recalled") or doc.get("editCount")]
        if changed:
            await self._versions.delete_many({"messageId": {"$in": changed}})
        purged_seq: dict[str, int] = {}
        for doc in doomed:
            purged_seq[doc["conv"]] = max(purged_seq.get(doc["conv"], 0), int(doc["seq"]))
        await self._summaries.bulk_write(
            [
                UpdateOne({"_id": ConversationRef(channel, conv).key}, {"$max": {"purgedSeq": seq}})
                for conv, seq in purged_seq.items()
            ],
            ordered=False,
        )
        return removed

    @staticmethod
    def _may_delete(
        channel: str, doc: Mapping[str, Any], cutoff: datetime.datetime, last_seqs: Mapping[str, int], held: HeldSet
    ) -> bool:
        created = as_utc(doc.get("createdAt"))
        seq = doc.get("seq")
        if created is None or created >= cutoff or not isinstance(seq, int):
            return False
        if seq >= last_seqs.get(doc["conv"], 0):
            return False  # the conversation's newest message: its seq is the next one's source
        return not held.holds(ConversationRef(channel, doc["conv"]))

    async def _load_last_seqs(self, channel: str, convs: set[str], last_seqs: dict[str, int]) -> None:
        """lastSeq of these conversations' summaries; without a summary, the newest stored seq."""
        if not convs:
            return
        keys = {ConversationRef(channel, conv).key: conv for conv in convs}
        async for summary in self._summaries.find({"_id": {"$in": list(keys)}}, {"lastSeq": 1}):
            last_seqs[keys[summary["_id"]]] = int(summary.get("lastSeq", 0))
        for conv in convs - last_seqs.keys():  # a message stored without its summary (a crash between)
            newest = await self._messages[channel].find_one({"conv": conv}, {"seq": 1}, sort=[("seq", DESCENDING)])
            last_seqs[conv] = int(newest["seq"]) if newest else 0

    # ---- files ---------------------------------------------------------------------------------

    async def _purge_files(
        self, uploaded_before: datetime.datetime, counts: dict[str, int], between: BetweenBatches
    ) -> None:
        """Files uploaded before uploaded_before that no kept message carries and no held user owns."""
        checked = 0
        began = time.monotonic()
        with pymongo.timeout(BATCH_TIMEOUT_SECS):
            held = await self._holds.held_set()
        found = self._files.find({"uploadDate": {"$lt": uploaded_before}}, {"uploadDate": 1, "metadata": 1})
        async for doc in found.batch_size(self.policy.batch_size):
            uploaded = as_utc(doc.get("uploadDate"))
            if uploaded is None or uploaded >= uploaded_before or held.holds_file_of(doc.get("metadata") or {}):
                continue
            with pymongo.timeout(BATCH_TIMEOUT_SECS):
                if not await self._is_carried(str(doc["_id"])):
                    try:
                        await self._bucket.delete(doc["_id"])
                        counts["files"] += 1
                    except NoFile:
                        pass  # deleted meanwhile (another purge, or by hand)
            checked += 1
            if checked % self.policy.batch_size == 0:
                await self._pause(began, between)
                began = time.monotonic()
                with pymongo.timeout(BATCH_TIMEOUT_SECS):
                    held = await self._holds.held_set()

    async def _is_carried(self, file_id: str) -> bool:
        """Does a stored message carry this file (an image or voice message whose content is its id)?"""
        media = {"content": file_id, "contentType": MEDIA_CONTENT_TYPES_FILTER}  # the media_content index
        for channel in CHANNELS:
            if await self._messages[channel].find_one(media, {"_id": 1}) is not None:
                return True
        # The original of a recalled or edited message is kept (SPEC §14), its file with it.
        return await self._versions.find_one({"content": {"$eq": file_id}}, {"_id": 1}) is not None

    @staticmethod
    async def _pause(began: float, between: BetweenBatches) -> None:
        """Sleep about as long as the batch took: the purge takes at most about half the database."""
        await asyncio.sleep(min(MAX_PAUSE_SECS, max(MIN_PAUSE_SECS, time.monotonic() - began)))
        with pymongo.timeout(BATCH_TIMEOUT_SECS):
            await between()


def _whole_seconds(delta: datetime.timedelta) -> datetime.timedelta:
    return datetime.timedelta(seconds=int(delta.total_seconds()))


async def _delete_ids(collection: AsyncCollection[dict[str, Any]], ids: list[Any]) -> int:
    """Delete documents by _id (one round trip; nx-27017 serves `_id $in` from the index)."""
    result = await collection.delete_many({"_id": {"$in": ids}})
    return int(result.deleted_count)
