"""Presence: online while a user has an open socket (in memory); lastSeen stored when the last closes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymongo.errors import PyMongoError

from models.clock import iso, utcnow
from models.conversations import ConversationRef
from models.groups import has_member
from server.auth import Principal
from server.db import Database
from server.errors import Forbidden
from server.hub import Hub

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, db: Database):
        self._presence = db.presence
        self._db = db
        self.hub: Hub | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def user_came_online(self, user_id: str) -> None:
        self._spawn(self._store(user_id, online=True))

    def user_went_offline(self, user_id: str) -> None:
        self._spawn(self._store(user_id, online=False))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _store(self, user_id: str, *, online: bool) -> None:
        try:
            await self._presence.update_one(
                {"_id": user_id}, {"$set": {"lastSeen": utcnow(), "online": online}}, upsert=True
            )
        except PyMongoError as exc:  # presence is best effort; never fails a connection
            log.warning("could not store presence of %s: %s", user_id, exc)

    async def check_visible(self, principal: Principal, user_id: str) -> None:
        """Staff and doctors see anyone; a patient sees itself and the people it talks to."""
        if principal.is_staff or principal.role == "doctor" or principal.user_id == user_id:
            return
        shares_pm = await self._db.conversations.find_one(
            {"_id": ConversationRef.pm(principal.user_id, user_id).key}, {"_id": 1})
        shares_group = shares_pm or await self._db.groups.find_one(
            {"$and": [has_member(principal.user_id), has_member(user_id)]}, {"_id": 1})
        if not shares_group:
            raise Forbidden("you may only see the presence of people you share a conversation with")

    async def get(self, user_id: str) -> dict[str, Any]:
        online = bool(self.hub and self.hub.is_online(user_id))
        doc = await self._presence.find_one({"_id": user_id})
        last_seen = doc["lastSeen"] if doc else None
        return {"user": user_id, "online": online, "lastSeen": iso(last_seen) if last_seen else None}

    async def drain(self) -> None:
        """Wait for pending presence writes (shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
