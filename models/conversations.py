"""Conversations: keys, per-conversation summaries, and per-user received/read cursors.

A conversation is the unordered pair of users (pm), the group (gm) or the recipient (sm). Its key
`conv` is stored on every message; `seq` counts within it. Receipts are cursors, not rows: one
document per (user, conversation) holding the highest received and read seq.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from pymongo import ASCENDING, UpdateOne, WriteConcern
from pymongo.errors import DuplicateKeyError

from models.batching import BatchedUpdates
from models.clock import utcnow
from models.groups import has_member
from server.db import Database


def pm_conv(a: str, b: str) -> str:
    """The pm key of an unordered pair; length-prefixed so ids may contain any character."""
    low, high = sorted((a, b))
    return f"{len(low)}:{low}|{high}"


@dataclasses.dataclass(frozen=True)
class ConversationRef:
    channel: str
    conv: str

    @property
    def key(self) -> str:
        """Unique across channels: the _id of the summary document."""
        return f"{self.channel}:{self.conv}"

    @classmethod
    def from_key(cls, key: str) -> ConversationRef:
        channel, _, conv = key.partition(":")
        return cls(channel, conv)

    def pm_pair(self) -> list[str]:
        """The two users of a pm conversation, sorted (see pm_conv)."""
        length, _, rest = self.conv.partition(":")
        return [rest[: int(length)], rest[int(length) + 1:]]

    @classmethod
    def pm(cls, a: str, b: str) -> ConversationRef:
        return cls("pm", pm_conv(a, b))

    @classmethod
    def gm(cls, group: str) -> ConversationRef:
        return cls("gm", group)

    @classmethod
    def sm(cls, user: str) -> ConversationRef:
        return cls("sm", user)


class ConversationStore:
    def __init__(self, db: Database, write_concern: WriteConcern):
        self._summaries = db.conversations
        # Journaled like the messages: after a crash the summary must still point at them.
        self._summary_updates = BatchedUpdates(db.get_collection("conversations", write_concern=write_concern))
        self._cursors = db.cursors
        self._db = db

    async def record_message(self, ref: ConversationRef, message: dict[str, Any],
                             members: list[str] | None) -> None:
        """Advance the summary to this message; never moves it backwards (safe to repeat).

        Batched with other conversations' updates (models/batching.py): an upsert whose filter
        misses because the summary is already at or past this seq fails with a duplicate key,
        which counts as done.
        """
        seq = message["seq"]
        on_insert: dict[str, Any] = {"channel": ref.channel, "conv": ref.conv}
        if members is not None:
            on_insert["members"] = members
        await self._summary_updates.update(UpdateOne(
            {"_id": ref.key, "lastSeq": {"$lt": seq}},
            {"$set": {"lastSeq": seq, "lastMessage": message, "updatedAt": message["createdAt"]},
             "$setOnInsert": on_insert},
            upsert=True,
        ))

    async def get_summary(self, ref: ConversationRef) -> dict[str, Any] | None:
        return await self._summaries.find_one({"_id": ref.key})

    async def find_summaries(self, user: str, group_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The user's pm and sm summaries (by membership) and those of the given groups."""
        group_keys = [ConversationRef.gm(g).key for g in group_ids]
        query: dict[str, Any] = {"$or": [has_member(user), {"_id": {"$in": group_keys}}]} \
            if group_keys else has_member(user)
        return [doc async for doc in self._summaries.find(query)]

    async def get_cursors(self, user: str) -> dict[str, dict[str, Any]]:
        """All of a user's cursors keyed by conversation key."""
        found = self._cursors.find({"user": user}, {"_id": 0})
        return {f"{doc['channel']}:{doc['conv']}": doc async for doc in found}

    async def move_cursor(self, user: str, ref: ConversationRef, seq: int, *, read: bool) -> dict[str, Any]:
        """Raise the received (and, for read, the read) marker to seq; markers never go back."""
        now = utcnow()
        update: dict[str, Any] = {"$max": {"received": seq}, "$setOnInsert": {}}
        if read:
            update["$max"]["read"] = seq
            update["$set"] = {"readAt": now}
        else:
            update["$set"] = {"receivedAt": now}
        defaults = {"received": 0, "read": 0}
        update["$setOnInsert"] = {k: v for k, v in defaults.items() if k not in update["$max"]}
        if not update["$setOnInsert"]:
            del update["$setOnInsert"]
        key = {"user": user, "channel": ref.channel, "conv": ref.conv}
        for _attempt in range(2):
            try:
                await self._cursors.update_one(key, update, upsert=True)
                break
            except DuplicateKeyError:
                continue  # two first-time upserts raced; the second attempt updates the winner
        doc = await self._cursors.find_one(key, {"_id": 0})
        assert doc is not None
        return doc

    async def count_unread(self, ref: ConversationRef, user: str, after_seq: int) -> int:
        """Messages from others above the read marker."""
        collection = self._db[ref.channel]
        return await collection.count_documents(
            {"conv": ref.conv, "seq": {"$gt": after_seq}, "from": {"$ne": user}}
        )

    async def messages_after(self, ref: ConversationRef, after_seq: int, limit: int,
                             before_seq: int | None = None) -> list[dict[str, Any]]:
        seq_range: dict[str, int] = {"$gt": after_seq}
        if before_seq is not None:
            seq_range["$lt"] = before_seq
        found = self._db[ref.channel].find({"conv": ref.conv, "seq": seq_range})
        return [doc async for doc in found.sort("seq", ASCENDING).limit(limit)]
