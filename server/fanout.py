"""Cross-process delivery: every process watches the message collections through MongoDB change
streams and delivers messages stored by other processes to its own sockets.

Messages stored by this process are published at once by MessageService (the change stream would
only add latency) and skipped here by id. Each collection's stream resumes after an interruption
from the last resume token it processed, so nothing is lost; anything seen twice is dropped by the
socket (server/ordering.py), so nothing is delivered twice.

Idle cost: on MongoDB an empty getMore waits server-side (`max_await_time_ms`), so a quiet stream
is one round trip a second. nx-27017 ignores maxAwaitTimeMS and answers at once, and its
database-level `watch()` yields no events (so one stream per collection, not one for all three):
there the follower polls at 20 ms while changes come and backs off to QUIET_POLL_MAX_SECS when quiet.

Alone, a process follows nothing: every message is its own, published at once, and reading each back
from the stream only to drop it cost 5–8 % of the server's CPU per message (and, on nx-27017, a
changelog row per write). The process looks in the instance registry (models/presence.py) every
PEER_POLL_SECS; when another live process shows up it opens the streams and catches up, from the
collections, on what was stored since it last knew itself alone (the peer may have sent before the
streams opened: those messages reach the sockets up to a poll late, still in order, once). When no
peer has been alive for PEER_GONE_SECS it closes them again.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bson import ObjectId
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure, PyMongoError

from models.conversations import ConversationRef
from models.database import Database
from models.groups import GroupStore
from models.messages import message_to_wire, recipients_of
from models.presence import INSTANCE_STALE_AFTER_SECS, beat_of
from models.recent import RecentIds
from server.db import MESSAGE_COLLECTIONS
from server.hub import Hub

log = logging.getLogger(__name__)

# A real MongoDB holds an empty change-stream getMore open this long and answers the moment a
# change is stored: an idle stream costs one round trip a second and adds no latency.
SERVER_AWAIT_MS = 1000
# An empty answer faster than this did not wait: the server (nx-27017 ignores maxAwaitTimeMS)
# answers at once, so the follower paces its own polls (PollPacer).
SERVER_AWAITED_SECS = SERVER_AWAIT_MS / 1000 / 2
# Polling pace where the server does not wait: fast while changes come, backing off when quiet.
BUSY_POLL_SECS = 0.02
QUIET_POLL_MAX_SECS = 0.6  # bounds the latency of the first message after a quiet spell
BUSY_HOLD_SECS = 2.0  # a conversation with a message every 2 s or faster stays at the busy pace
RETRY_BACKOFF_MAX_SECS = 5.0
# Long enough for the storing process to have written the conversation summary.
JUST_STORED_KEEP_SECS = 30.0
# How often a process looks for other live processes, and so how late at most the first messages of a
# newly started peer reach this process's sockets (caught up from the collections).
PEER_POLL_SECS = 1.0
# With no other live process for this long, the streams close (a crashed peer's instance stays
# "alive" for INSTANCE_STALE_AFTER_SECS; a restart under supervisord must not follow forever).
PEER_GONE_SECS = 2 * INSTANCE_STALE_AFTER_SECS
# The catch-up reads messages by the time in their ObjectId, made by the storing process's clock
# (seconds): this much earlier covers skew between machines.
CATCH_UP_MARGIN_SECS = 5.0
STOP_TIMEOUT_SECS = 2.0  # shutting down waits at most this long for the followers
CATCH_UP_MAX_MESSAGES = 10_000  # per collection; a peer that stored more before the streams opened is
# far past a poll late, and its recipients' sockets get the rest from their backlog on reconnect


class JustStored:
    """Per user, the newest seq of each conversation recently stored by other processes."""

    def __init__(self, keep_secs: float = JUST_STORED_KEEP_SECS):
        self._keep_secs = keep_secs
        self._by_user: dict[str, dict[str, tuple[ConversationRef, int, float]]] = {}
        self._next_sweep = time.monotonic() + keep_secs

    def note(self, ref: ConversationRef, seq: int, users: list[str]) -> None:
        now = time.monotonic()
        for user in users:
            entries = self._by_user.setdefault(user, {})
            if seq > entries.get(ref.key, (ref, 0, now))[1]:
                entries[ref.key] = (ref, seq, now)
        if now > self._next_sweep:
            self._sweep(now)

    def for_user(self, user: str) -> dict[str, tuple[ConversationRef, int]]:
        cutoff = time.monotonic() - self._keep_secs
        return {key: (ref, seq) for key, (ref, seq, at) in self._by_user.get(user, {}).items() if at >= cutoff}

    def _sweep(self, now: float) -> None:
        cutoff = now - self._keep_secs
        for user in list(self._by_user):
            fresh = {k: e for k, e in self._by_user[user].items() if e[2] >= cutoff}
            if fresh:
                self._by_user[user] = fresh
            else:
                del self._by_user[user]
        self._next_sweep = now + self._keep_secs


class PollPacer:
    """How long a follower waits before asking again a server that answered an empty batch at once."""

    def __init__(
        self,
        busy_secs: float = BUSY_POLL_SECS,
        max_secs: float = QUIET_POLL_MAX_SECS,
        hold_secs: float = BUSY_HOLD_SECS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._busy_secs = busy_secs
        self._max_secs = max_secs
        self._hold_secs = hold_secs
        self._clock = clock
        self._delay_secs = busy_secs
        self._last_change = -math.inf

    def note_change(self) -> None:
        """A change came: back to the busy pace at once."""
        self._last_change = self._clock()
        self._delay_secs = self._busy_secs

    @property
    def pace_secs(self) -> float:
        """The current interval between polls."""
        return self._delay_secs

    def next_wait(self) -> float:
        """Seconds to wait after an empty answer: busy for a while after a change, then doubling.

        The wait ends on a multiple of the pace, so that followers at the same pace (the three
        quiet collections) poll in one wake-up of this process and of the database server.
        """
        now = self._clock()
        if now - self._last_change >= self._hold_secs:
            self._delay_secs = min(self._max_secs, self._delay_secs * 2)
        return min(self._delay_secs, (math.floor(now / self._delay_secs) + 1) * self._delay_secs - now)


async def change_streams_supported(db: Database) -> bool:
    """False on a standalone MongoDB (change streams need a replica set). Asked of `accounts`,
    followed whenever streams are on: nx-27017 tracks every write to a watched collection from
    then on, and a message collection need be watched only while another process is alive."""
    try:
        async with await db.accounts.watch():
            return True
    except OperationFailure as exc:
        log.warning(
            "change streams unavailable (%s): delivering to this process's sockets only. "
            "Run MongoDB as a replica set to share the load among several processes.",
            exc.details.get("errmsg", exc) if exc.details else exc,
        )
        return False


async def follow_collection(
    collection: AsyncCollection[dict[str, Any]],
    on_change: Callable[[dict[str, Any]], Awaitable[None]],
    *,
    stopping: Callable[[], bool],
    pipeline: list[dict[str, Any]] | None = None,
    pacer: PollPacer | None = None,
    on_open: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Follow a collection's change stream until stopping(), resuming after errors from the last
    token processed. The server waits for changes where it can (MongoDB); where it answers at once
    (nx-27017) the pacer spaces the polls. on_open runs when a stream first opens (after it opened,
    so nothing falls in between a load and the stream)."""
    resume_token: Any = None
    backoff = 0.1
    pacer = pacer or PollPacer()
    name = collection.name
    while not stopping():
        try:
            async with await collection.watch(
                pipeline or [], resume_after=resume_token, max_await_time_ms=SERVER_AWAIT_MS
            ) as stream:
                if resume_token is None and on_open is not None:
                    await on_open()
                backoff = 0.1
                while not stopping():
                    asked = time.monotonic()
                    change = await stream.try_next()
                    if change is None:
                        if time.monotonic() - asked < SERVER_AWAITED_SECS:
                            await asyncio.sleep(pacer.next_wait())
                        continue
                    pacer.note_change()
                    await on_change(change)
                    resume_token = change["_id"]
        except asyncio.CancelledError:
            raise
        except PyMongoError as exc:
            log.warning("change stream on %s interrupted (%s); resuming in %.1fs", name, exc, backoff)
        except Exception:
            log.exception("change stream on %s failed; resuming in %.1fs", name, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, RETRY_BACKOFF_MAX_SECS)


class ChangeStreamFanout:
    """Follows the message collections, while another process is alive, and delivers the other
    processes' messages to this process's sockets."""

    def __init__(
        self,
        db: Database,
        hub: Hub,
        groups: GroupStore,
        local_ids: RecentIds,
        *,
        instance_id: str,  # this process in the instance registry (models/presence.py)
        on_lag: Callable[[str, object], None] | None = None,  # metrics: (collection, createdAt)
    ):
        self._on_lag = on_lag
        self._db = db
        self._hub = hub
        self._groups = groups
        self._local_ids = local_ids
        self._instance_id = instance_id
        self._watch: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._generation = 0  # of the followers: each opening of the streams is one
        self.just_stored = JustStored()
        self._stopping = False

    @property
    def following(self) -> bool:
        """Are the change streams open (another process is alive)?"""
        return bool(self._tasks)

    def start(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watch_peers())

    async def stop(self) -> None:
        self._stopping = True
        tasks = self._tasks + ([self._watch] if self._watch is not None else [])
        for task in tasks:
            task.cancel()
        # Bounded: on Python 3.11 a cancellation that meets the driver's own timeout can be lost
        # (asyncio.wait_for), and the loop then ends only at its next look at _stopping.
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECS)
        self._tasks = []

    async def _watch_peers(self) -> None:
        """Open the streams while another process is alive; see the module docstring."""
        # Messages other processes stored since this moment may not have reached the sockets here.
        uncovered_since = time.time()
        last_peer_at = -math.inf
        while not self._stopping:  # the driver may turn a cancellation into an error: checked too
            looked_at = time.time()
            try:
                alive = await self.peers_alive()
            except PyMongoError as exc:
                log.warning("cannot read the instance registry (%s); looking again in %.0fs", exc, PEER_POLL_SECS)
                alive = None
            if alive:
                last_peer_at = looked_at
                if not self._tasks:
                    self._start_following(uncovered_since)
            elif alive is not None and self._tasks and looked_at - last_peer_at >= PEER_GONE_SECS:
                await self._stop_following()
                uncovered_since = looked_at
            elif alive is not None and not self._tasks:
                uncovered_since = looked_at  # alone: nobody stored anything before this look
            await asyncio.sleep(PEER_POLL_SECS)

    async def peers_alive(self) -> bool:
        """Does any other process beat in the instance registry?"""
        fresh = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=INSTANCE_STALE_AFTER_SECS)
        async for doc in self._db.instances.find({"_id": {"$ne": self._instance_id}}, {"beatAt": 1}):
            if beat_of(doc) >= fresh:
                return True
        return False

    def _start_following(self, uncovered_since: float) -> None:
        loop = asyncio.get_running_loop()
        self._generation += 1
        generation = self._generation
        self._tasks = [
            loop.create_task(self._follow(name, uncovered_since, generation)) for name in MESSAGE_COLLECTIONS
        ]
        log.info("another process is alive: change-stream fan-out started on %s", ", ".join(MESSAGE_COLLECTIONS))

    async def _stop_following(self) -> None:
        tasks, self._tasks = self._tasks, []
        self._generation += 1  # ends those followers even if one loses its cancellation (see stop)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECS)
        log.info("no other process alive for %.0fs: change-stream fan-out stopped", PEER_GONE_SECS)

    async def _follow(self, collection: str, uncovered_since: float, generation: int) -> None:
        """Follow one message collection until stopped, delivering what other processes insert;
        once its stream is open, what they stored since uncovered_since too."""
        await follow_collection(
            self._db[collection],
            lambda change: self._deliver(collection, change.get("fullDocument")),
            stopping=lambda: self._stopping or self._generation != generation,
            pipeline=[{"$match": {"operationType": "insert"}}],
            on_open=lambda: self._catch_up(collection, uncovered_since),
        )

    async def _catch_up(self, collection: str, since: float) -> None:
        """Deliver the messages stored since `since` (the stream is open: nothing falls in between).
        What this process stored itself, or a socket has already, is dropped (server/ordering.py)."""
        start = datetime.datetime.fromtimestamp(since - CATCH_UP_MARGIN_SECS, datetime.UTC)
        found = self._db[collection].find({"_id": {"$gte": str(ObjectId.from_datetime(start))}})
        docs = await found.limit(CATCH_UP_MAX_MESSAGES).to_list()
        docs.sort(key=lambda doc: (str(doc.get("conv")), int(doc.get("seq", 0))))
        for doc in docs:
            await self._deliver(collection, doc)
        if docs:
            log.info("change-stream fan-out on %s: caught up on %d messages", collection, len(docs))

    async def _deliver(self, channel: str, doc: dict[str, Any] | None) -> None:
        if not doc or doc.get("_id") in self._local_ids or "seq" not in doc:
            return
        created = doc.get("createdAt")
        if isinstance(created, dict) and "$date" in created:
            # nx-27017 hands dates in change events over as extended JSON; MongoDB as datetimes.
            doc["createdAt"] = datetime.datetime.fromisoformat(created["$date"]).replace(tzinfo=datetime.UTC)
        if self._on_lag is not None:
            self._on_lag(channel, doc.get("createdAt"))
        ref = ConversationRef(channel, doc["conv"])
        members: list[str] = []
        if channel == "gm":
            group = await self._groups.find(doc["group"])
            members = group["members"] if group else []
        recipients = recipients_of(ref, doc, members)
        # Noted before publishing: a socket registered too late for the publish finds it in its
        # backlog even if the storing process has not written the conversation summary yet.
        self.just_stored.note(ref, doc["seq"], recipients)
        self._hub.publish_message(ref, message_to_wire(doc), recipients, origin=None)
