"""Cross-process delivery: every process watches the message collections through MongoDB change
streams and delivers messages stored by other processes to its own sockets.

Messages stored by this process are published at once by MessageService (the change stream would
only add latency) and skipped here by id. Each collection's stream resumes after an interruption
from the last resume token it processed, so nothing is lost; anything seen twice is dropped by the
socket (server/ordering.py), so nothing is delivered twice.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

from pymongo.errors import OperationFailure, PyMongoError

from models.conversations import ConversationRef
from models.groups import GroupStore
from models.membership import EVENT_MEMBER_REMOVED
from models.messages import message_to_wire
from server.db import MESSAGE_COLLECTIONS, Database
from server.hub import Hub
from server.recent import RecentIds

log = logging.getLogger(__name__)

# Servers without a server-side await on getMore (nx-27017) answer an empty batch at once: poll.
EMPTY_POLL_SECS = 0.02
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


async def change_streams_supported(db: Database) -> bool:
    """False on a standalone MongoDB (change streams need a replica set)."""
    try:
        async with await db[MESSAGE_COLLECTIONS[0]].watch():
            return True
    except OperationFailure as exc:
        log.warning("change streams unavailable (%s): delivering to this process's sockets only. "
                    "Run MongoDB as a replica set to share the load among several processes.",
                    exc.details.get("errmsg", exc) if exc.details else exc)
        return False


class ChangeStreamFanout:
    def __init__(self, db: Database, hub: Hub, groups: GroupStore, local_ids: RecentIds):
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
        """Follow one collection forever, resuming after errors from the last token processed."""
        resume_token: Any = None
        backoff = 0.1
        pipeline = [{"$match": {"operationType": "insert"}}]
        while not self._stopping:
            try:
                async with await self._db[collection].watch(pipeline, resume_after=resume_token) as stream:
                    backoff = 0.1
                    while not self._stopping:
                        asked = time.monotonic()
                        change = await stream.try_next()
                        if change is None:
                            if time.monotonic() - asked < EMPTY_POLL_SECS:
                                await asyncio.sleep(EMPTY_POLL_SECS)
                            continue
                        await self._deliver(collection, change.get("fullDocument"))
                        resume_token = change["_id"]
            except asyncio.CancelledError:
                raise
            except PyMongoError as exc:
                log.warning("change stream on %s interrupted (%s); resuming in %.1fs", collection, exc, backoff)
            except Exception:
                log.exception("change stream on %s failed; resuming in %.1fs", collection, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_BACKOFF_MAX_SECS)

    async def _deliver(self, channel: str, doc: dict[str, Any] | None) -> None:
        if not doc or doc.get("_id") in self._local_ids or "seq" not in doc:
            return
        created = doc.get("createdAt")
        if isinstance(created, dict) and "$date" in created:
            # nx-27017 hands dates in change events over as extended JSON; MongoDB as datetimes.
            doc["createdAt"] = datetime.datetime.fromisoformat(created["$date"]).replace(tzinfo=datetime.UTC)
        ref = ConversationRef(channel, doc["conv"])
        if channel == "pm":
            recipients = ref.pm_pair()  # not from/to: an operator may send a consultation event
        elif channel == "sm":
            recipients = [doc["to"]]
        else:
            group = await self._groups.find(doc["group"])
            recipients = list(group["members"]) if group else []
            if doc.get("event") == EVENT_MEMBER_REMOVED:
                recipients += doc.get("members", [])
        # Noted before publishing: a socket registered too late for the publish finds it in its
        # backlog even if the storing process has not written the conversation summary yet.
        self.just_stored.note(ref, doc["seq"], recipients)
        self._hub.publish_message(ref, message_to_wire(doc), recipients, origin=None)
