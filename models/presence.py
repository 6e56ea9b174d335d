"""Presence: a user is online while it has an open socket on any server process.

This process knows its own sockets (the hub). So that other processes know them too, each process
records in the user's `presence` document the instances it is online on (`onlineOn`), and beats a
heartbeat in `instances`; an instance whose heartbeat is stale (it crashed) no longer counts.
`lastSeen` is stored whenever a user's last socket on a process closes. Writes are coalesced per
user and made by one worker, in order, so a quick connect-disconnect never ends up "online"; until
the offline write is stored, the time the user went offline is answered from memory.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from typing import Any, Protocol

import pymongo
from bson import ObjectId
from pymongo.errors import PyMongoError

from models.clock import iso, utcnow
from models.conversations import pm_conv
from models.database import Database
from models.errors import Forbidden
from models.groups import has_member
from models.principal import Principal

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_SECS = 10.0
INSTANCE_STALE_AFTER_SECS = 3 * HEARTBEAT_INTERVAL_SECS
WITHDRAW_TIMEOUT_SECS = 2.0


def beat_of(instance: dict[str, Any]) -> datetime.datetime:
    """An instance document's last heartbeat, as an aware datetime."""
    stored = instance["beatAt"]
    # nx-27017 hands a $set date back as text (see models/clock.iso); MongoDB as a datetime.
    beat = datetime.datetime.fromisoformat(stored) if isinstance(stored, str) else stored
    return beat if beat.tzinfo is not None else beat.replace(tzinfo=datetime.UTC)


class LocalSockets(Protocol):
    """This process's sockets (server/hub.py): who is online here, and news of first/last sockets."""

    def is_online(self, user_id: str) -> bool: ...

    def subscribe(self, on_first_socket: Callable[[str], None], on_last_socket: Callable[[str], None]) -> None: ...


class Presence:
    def __init__(self, db: Database, sockets: LocalSockets):
        self._presence = db.presence
        self._instances = db.instances
        self._db = db
        self.instance_id = str(ObjectId())
        self._sockets = sockets
        self._changes: dict[str, bool] = {}  # user -> online here, waiting to be written
        # user -> when its last socket here closed, until that lastSeen is stored (or it is back).
        self._offline_since: dict[str, datetime.datetime] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        sockets.subscribe(self.user_came_online, self.user_went_offline)

    # ---- this process's sockets ----------------------------------------------------------------

    def user_came_online(self, user_id: str) -> None:
        self._offline_since.pop(user_id, None)
        self._queue(user_id, True)

    def user_went_offline(self, user_id: str) -> None:
        self._offline_since[user_id] = utcnow()
        self._queue(user_id, False)

    def _queue(self, user_id: str, online: bool) -> None:
        self._changes[user_id] = online
        self._idle.clear()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._write_changes())

    async def _write_changes(self) -> None:
        # Runs while there is work; no await between the last check and the end, so a change
        # queued meanwhile is either seen here or starts a new worker.
        while self._changes:
            user_id = next(iter(self._changes))
            online = self._changes.pop(user_id)
            await self._store(user_id, online)
        self._idle.set()

    async def _store(self, user_id: str, online: bool) -> None:
        change = {"$addToSet": {"onlineOn": self.instance_id}} if online else {"$pull": {"onlineOn": self.instance_id}}
        offline_since = None if online else self._offline_since.get(user_id)
        try:
            await self._presence.update_one(
                {"_id": user_id}, {**change, "$set": {"lastSeen": offline_since or utcnow()}}, upsert=True
            )
        except PyMongoError as exc:  # presence is best effort; it never fails a connection
            log.warning("could not store presence of %s: %s", user_id, exc)
            return  # the time stays in memory: lastSeen is still answered
        if offline_since is not None and self._offline_since.get(user_id) is offline_since:
            del self._offline_since[user_id]

    # ---- the heartbeat that lets other processes trust onlineOn --------------------------------

    async def start_heartbeat(self) -> None:
        """The first beat now (before serving: other processes then know of this one before it
        stores anything, server/fanout.py), then every HEARTBEAT_INTERVAL_SECS."""
        await self._beat_once()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat_once(self) -> None:
        try:
            await self._instances.update_one({"_id": self.instance_id}, {"$set": {"beatAt": utcnow()}}, upsert=True)
        except PyMongoError as exc:
            log.warning("presence heartbeat failed: %s", exc)

    async def _beat(self) -> None:
        # Until withdraw() clears it: a cancellation the driver turns into an error (Python 3.11's
        # asyncio.wait_for can lose one) must not leave the loop beating on after shutting down.
        while self._heartbeat is not None:
            await asyncio.sleep(HEARTBEAT_INTERVAL_SECS)
            await self._beat_once()

    async def withdraw(self) -> None:
        """Shutdown: every socket here is closing. One write marks all their users, instead of one
        write per user (10,000 of them would outlast the shutdown budget)."""
        if self._heartbeat is not None:
            heartbeat, self._heartbeat = self._heartbeat, None
            heartbeat.cancel()
        self._changes.clear()
        self._offline_since.clear()  # the write below stores lastSeen for all of them
        try:
            with pymongo.timeout(WITHDRAW_TIMEOUT_SECS):
                await self._presence.update_many(
                    {"onlineOn": {"$in": [self.instance_id]}},
                    {"$pull": {"onlineOn": self.instance_id}, "$set": {"lastSeen": utcnow()}},
                )
                await self._instances.delete_one({"_id": self.instance_id})
        except PyMongoError as exc:
            log.warning("could not withdraw presence instance: %s", exc)

    async def drain(self) -> None:
        """Wait until every queued presence change is written."""
        if self._worker is not None and not self._worker.done():
            await self._idle.wait()

    # ---- reading -------------------------------------------------------------------------------

    async def check_visible(self, principal: Principal, user_id: str) -> None:
        """Staff and doctors see anyone; a patient sees itself and the people it talks to.

        "Talks to" means both took part: each has sent a message in their pm conversation, or a
        consultation is between them, or both are members of one group. A conversation one side
        opened alone proves nothing: anyone may send anyone a pm.
        """
        me = principal.user_id
        if principal.is_staff or principal.role == "doctor" or me == user_id:
            return
        if (
            await self._both_wrote(me, user_id)
            or await self._share_consultation(me, user_id)
            or await self._share_group(me, user_id)
        ):
            return
        raise Forbidden("you may only see the presence of people you share a conversation with")

    async def _both_wrote(self, a: str, b: str) -> bool:
        conv = pm_conv(a, b)
        for sender in (a, b):
            if await self._db.pm.find_one({"conv": conv, "from": sender}, {"_id": 1}) is None:
                return False
        return True

    async def _share_consultation(self, a: str, b: str) -> bool:
        found = await self._db.consultations.find_one(
            {"$or": [{"doctor": a, "patient": b}, {"doctor": b, "patient": a}]}, {"_id": 1}
        )
        return found is not None

    async def _share_group(self, a: str, b: str) -> bool:
        found = await self._db.groups.find_one({"$and": [has_member(a), has_member(b)]}, {"_id": 1})
        return found is not None

    async def get(self, user_id: str) -> dict[str, Any]:
        online = self._sockets.is_online(user_id)
        doc = await self._presence.find_one({"_id": user_id})
        if not online and doc:
            elsewhere = [i for i in doc.get("onlineOn", []) if i != self.instance_id]
            online = bool(elsewhere) and await self._any_alive(elsewhere)
        last_seen = doc.get("lastSeen") if doc else None
        if not online and user_id in self._offline_since:  # its offline write is still queued
            last_seen = self._offline_since[user_id]
        return {"user": user_id, "online": online, "lastSeen": iso(last_seen) if last_seen else None}

    async def _any_alive(self, instance_ids: list[str]) -> bool:
        fresh_since = utcnow() - datetime.timedelta(seconds=INSTANCE_STALE_AFTER_SECS)
        async for doc in self._instances.find({"_id": {"$in": instance_ids}}):
            if beat_of(doc) >= fresh_since:
                return True
        return False
