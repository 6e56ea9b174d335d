"""Marker history and per-message receipts (SPEC §13).

Receipts are cursors, not rows (LESSONS 4): nothing is written per member per message. Instead
every move of a user's received or read marker is recorded — `{user, conv (the conversation key),
kind, from, to, at}` in `marker_moves`, journaled and batched — and a message's receipt for a user
is the first move whose range reaches the message's seq. Markers never go back, so that first
move is the one with the smallest `to` ≥ seq: one index walk (server/db.py `user_conv_kind_to`; the
equalities are `$eq`, which nx-27017 serves from the index, where bare values made it scan).
A read marker also raises the received marker, so a read move counts for `receivedAt` as well.

Group recipients are the members when the message was sent, replayed from the group's membership
notices (`group.created` / `members_added` / `member_removed`, each carrying `members` and a seq).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, Protocol

from pymongo import ASCENDING, WriteConcern

from models.batching import BatchedInserts
from models.clock import iso, utcnow
from models.conversations import ConversationRef
from models.database import Database
from models.errors import Forbidden, InvalidField, NotFound
from models.principal import Principal

KINDS = ("received", "read")
MEMBERSHIP_EVENTS = ("group.created", "group.members_added", "group.member_removed")


class MarkerMoves(Protocol):
    """What the marker path needs: record that a marker moved (server/chat.py)."""

    async def record_move(self, user: str, ref: ConversationRef, kind: str, from_seq: int, to_seq: int) -> None: ...


class ReceiptService:
    def __init__(self, db: Database, write_concern: WriteConcern):
        self._db = db
        self._moves = db.get_collection("marker_moves", write_concern=write_concern)
        self._inserts = BatchedInserts(self._moves)

    async def record_move(self, user: str, ref: ConversationRef, kind: str, from_seq: int, to_seq: int) -> None:
        """Store one marker move (journaled) before the move is reported done; a non-move is skipped."""
        if kind not in KINDS:
            raise ValueError(f"marker kind {kind!r}")
        if to_seq <= from_seq:
            return
        doc = {"user": user, "conv": ref.key, "kind": kind, "from": from_seq, "to": to_seq, "at": utcnow()}
        await self._inserts.insert(doc)

    async def _first_reaching(self, user: str, key: str, seq: int, kinds: tuple[str, ...]) -> datetime.datetime | None:
        found: list[datetime.datetime] = []
        for kind in kinds:
            # $eq, not bare values: nx-27017 scans the collection for those, walks the index for these.
            query = {"user": {"$eq": user}, "conv": {"$eq": key}, "kind": {"$eq": kind}, "to": {"$gte": seq}}
            doc = await self._moves.find_one(query, sort=[("to", ASCENDING)])
            if doc is not None:
                at = doc["at"]
                if isinstance(at, str):  # nx-27017 may hand a date back as text (models/clock.py)
                    at = datetime.datetime.fromisoformat(at)
                found.append(at if at.tzinfo else at.replace(tzinfo=datetime.UTC))
        return min(found, default=None)

    async def receipts(self, principal: Principal, channel: str, message_id: str) -> dict[str, Any]:
        """{"message", "receipts": [{"user", "receivedAt", "readAt"}]} for the sender, service or admin."""
        if channel not in ("sm", "pm", "gm"):
            raise InvalidField("channel", "must be one of sm, pm, gm")
        message = await self._db[channel].find_one({"_id": message_id})
        if message is None:
            raise NotFound(f"id: no {channel} message {message_id!r}")
        sender = message.get("from")
        if not principal.is_staff and principal.user_id != sender:
            raise Forbidden("only the message's sender, service or admin may read its receipts")
        ref = ConversationRef(channel, message["conv"])
        recipients = [u for u in await self._recipients(ref, message) if u != sender]
        seq = message["seq"]
        out = []
        for user in recipients:
            received = await self._first_reaching(user, ref.key, seq, KINDS)
            read = await self._first_reaching(user, ref.key, seq, ("read",))
            out.append(
                {
                    "user": user,
                    "receivedAt": iso(received) if received else None,
                    "readAt": iso(read) if read else None,
                }
            )
        return {"message": message_id, "receipts": out}

    async def _recipients(self, ref: ConversationRef, message: Mapping[str, Any]) -> list[str]:
        if ref.channel == "pm":
            return ref.pm_pair()
        if ref.channel == "sm":
            return [message["to"]]
        return await self.members_at(ref.conv, message["seq"])

    async def members_at(self, group: str, seq: int) -> list[str]:
        """The group's members when the message with this seq was stored, from its notices.

        One query per notice kind (conv, event, seq: the `membership_notices` index names them all,
        so nx-27017 walks it instead of the group's messages).
        """
        notices: list[dict[str, Any]] = []
        for event in MEMBERSHIP_EVENTS:
            query = {"conv": {"$eq": group}, "event": {"$eq": event}, "seq": {"$lte": seq}}  # $eq: as above
            notices += await self._db.gm.find(query, {"event": 1, "members": 1, "seq": 1}).to_list()
        members: list[str] = []
        for notice in sorted(notices, key=lambda n: n["seq"]):
            names = notice.get("members") or []
            if notice["event"] == "group.member_removed":
                members = [m for m in members if m not in names]
            elif notice["event"] == "group.created":
                members = list(names)
            else:
                members += [m for m in names if m not in members]
        return members
