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
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure, PyMongoError

from models.conversations import ConversationRef
from models.database import Database
from models.groups import GroupStore
from models.messages import message_to_wire, recipients_of
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
    """False on a standalone MongoDB (change streams need a replica set)."""
    try:
        async with await db[MESSAGE_COLLECTIONS[0]].watch():
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
    """Follows the message collections and delivers other processes' messages to this process's sockets."""

    def __init__(
        self,
        db: Database,
        hub: Hub,
        groups: GroupStore,
        local_ids: RecentIds,
        on_lag: Callable[[str, object], None] | None = None,  # metrics: (collection, createdAt)
    ):
        self._on_lag = on_lag
        self._db = db
        self._hub = hub
        self._groups = groups
        self._local_ids = local_ids
        self._tasks: list[asyncio.Task[None]] = []
        self.just_stored = JustStored()
        self._stopping = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(name)) for name in MESSAGE_COLLECTIONS]
        log.info("change-stream fan-out started on %s", ", ".join(MESSAGE_COLLECTIONS))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, collection: str) -> None:
        """Follow one message collection forever, delivering what other processes insert."""
        await follow_collection(
            self._db[collection],
            lambda change: self._deliver(collection, change.get("fullDocument")),
            stopping=lambda: self._stopping,
            pipeline=[{"$match": {"operationType": "insert"}}],
        )

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
