"""A user's record, exported (SPEC §16): GET /api/v1/users/{id}/export as NDJSON lines.

Right of access (PIPL art. 45, GDPR art. 15): the user itself, or `service`/`admin` for it, gets
every line of its record, in this order, each a JSON object with a `type`:

1. `{"type": "user", "id"}`;
2. `conversation` lines `{"type": "conversation", "channel", "peer" | "group", "lastMessage", "unread", …}`,
   as GET /api/v1/conversations shows them (newest activity first);
3. `message` lines `{"type": "message", "message"}`: every message of the user's system-message
   conversation, of its pm conversations and of its groups while it was a member (from the
   membership notices: joined → left, the notice of its removal included), oldest first (seq
   order) per conversation; recalled and edited messages as they now are (models/recall.py
   changes the stored message in place);
4. `consultation` lines `{"type": "consultation", "id", "doctor", "patient", "status", …}` (SPEC §5's
   shape), as doctor and as patient, oldest first;
5. `file` lines `{"type": "file", "id", "url", "mimeType", "size"}` of the files those messages carry;
6. last `{"type": "end", "counts": {"conversations", "messages", "consultations", "files"}}`: a
   stream that stops without it is incomplete.

Memory does not grow with the record: everything is read in pages (a conversation's messages by
seq, EXPORT_PAGE at a time, on the `conv_seq` index) and handed on as it is read; the handler
writes and flushes each chunk before asking for the next (backpressure). Only the ids of the
attached files are collected on the way (24 characters each).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING

from models.audit import AuditRecorder
from models.consultations import consultation_to_wire
from models.conversations import ConversationRef, ConversationStore
from models.database import Database
from models.files import BUCKET_NAME, file_to_wire
from models.groups import GroupStore
from models.inbox import Inbox
from models.messages import message_to_wire
from models.principal import Principal
from models.validation import FILE_ID_RE, MEDIA_CONTENT_TYPES

EXPORT_PAGE = 500
LIST_PAGE = 200
MEMBERSHIP_EVENTS = ("group.created", "group.members_added", "group.member_removed")
MEMBERSHIP_FIELDS = {"event": 1, "members": 1, "seq": 1}

Line = dict[str, Any]
# A user's membership of a group as seq ranges: (first seq, last seq or None while still a member).
Periods = list[tuple[int, int | None]]


def membership_periods(user: str, notices: Sequence[Mapping[str, Any]], member_now: bool) -> Periods:
    """When the user was a member, from the group's membership notices (any order)."""
    periods: Periods = []
    start: int | None = None
    for notice in sorted(notices, key=lambda n: n["seq"]):
        named = user in (notice.get("members") or [])
        if notice["event"] == "group.member_removed":
            if named and start is not None:
                periods.append((start, notice["seq"]))  # the removed member receives its removal notice
                start = None
        elif named and start is None:
            start = notice["seq"]
    if start is not None:
        periods.append((start, None))
    elif member_now and not periods:
        periods.append((1, None))  # a member the notices do not name (a group older than them)
    return periods


def attached_file(message: Mapping[str, Any]) -> str | None:
    """The file id an image or voice message carries (its content), or None."""
    content = message.get("content")
    if message.get("contentType") in MEDIA_CONTENT_TYPES and isinstance(content, str) and FILE_ID_RE.match(content):
        return content
    return None


class ExportService:
    def __init__(
        self,
        db: Database,
        inbox: Inbox,
        conversations: ConversationStore,
        groups: GroupStore,
        *,
        audit: AuditRecorder | None = None,
    ):
        self._db = db
        self._inbox = inbox
        self._conversations = conversations
        self._groups = groups
        self._audit = audit
        self._files = db.get_collection(f"{BUCKET_NAME}.files")

    async def open(self, principal: Principal, user: str) -> AsyncIterator[Line]:
        """Authorise (the user itself, service, admin: else 403), audit export.created, then the
        lines. Nothing is read before the refusal, nothing is sent before the entry is stored."""
        principal.require_self_or_staff(user, "id")
        if self._audit is not None:
            await self._audit.record(principal.user_id, principal.role, "export.created", "rest", {"user": user})
        return self.lines(user)

    async def lines(self, user: str) -> AsyncIterator[Line]:
        """Every line of the user's record, in SPEC §16's order (see the module docstring)."""
        counts = {"conversations": 0, "messages": 0, "consultations": 0, "files": 0}
        yield {"type": "user", "id": user}
        async for entry in self._conversation_entries(user):
            counts["conversations"] += 1
            yield {"type": "conversation", **entry}
        file_ids: set[str] = set()
        async for ref, periods in self._message_sources(user):
            async for doc in self._messages_of(ref, periods):
                counts["messages"] += 1
                file_id = attached_file(doc)
                if file_id is not None:
                    file_ids.add(file_id)
                yield {"type": "message", "message": message_to_wire(doc)}
        for role in ("doctor", "patient"):
            # Read before the first line goes out: a cursor kept open while a slow client reads
            # could time out on the server (a user's consultations are few).
            found = await self._db.consultations.find({role: user}).sort("startedAt", ASCENDING).to_list()
            for consultation in found:
                counts["consultations"] += 1
                yield {"type": "consultation", **consultation_to_wire(consultation)}
        async for file_line in self._file_lines(sorted(file_ids)):
            counts["files"] += 1
            yield file_line
        yield {"type": "end", "counts": counts}

    async def _conversation_entries(self, user: str) -> AsyncIterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            page = await self._inbox.list_conversations(user, LIST_PAGE, cursor)
            for entry in page["conversations"]:
                yield entry
            cursor = page["next"]
            if cursor is None:
                return

    async def _message_sources(self, user: str) -> AsyncIterator[tuple[ConversationRef, Periods]]:
        """The user's conversations and, for groups, its membership periods: sm, pm, then groups."""
        everything: Periods = [(1, None)]
        summaries = await self._conversations.find_summaries(user, [])
        for channel in ("sm", "pm"):
            for conv in sorted(s["conv"] for s in summaries if s["channel"] == channel):
                yield ConversationRef(channel, conv), everything
        current = set(await self._groups.ids_for_user(user))
        # Every group, for those the user has left too (their notices name it). The ids first: no
        # cursor stays open while a slow client reads a group's messages.
        group_ids = [doc["_id"] for doc in await self._db.groups.find({}, {"_id": 1}).sort("_id", ASCENDING).to_list()]
        for group_id in group_ids:
            notices: list[dict[str, Any]] = []
            for event in MEMBERSHIP_EVENTS:
                # $eq and every field of the membership_notices index named: nx-27017 walks it.
                query = {"conv": {"$eq": group_id}, "event": {"$eq": event}, "seq": {"$gte": 0}}
                notices += await self._db.gm.find(query, MEMBERSHIP_FIELDS).to_list()
            periods = membership_periods(user, notices, group_id in current)
            if periods:
                yield ConversationRef.gm(group_id), periods

    async def _messages_of(self, ref: ConversationRef, periods: Periods) -> AsyncIterator[dict[str, Any]]:
        """The conversation's messages within the periods, oldest first, a page at a time."""
        collection = self._db[ref.channel]
        for first, last in periods:
            after = first - 1
            while True:
                seq_range: dict[str, int] = {"$gt": after}
                if last is not None:
                    seq_range["$lte"] = last
                page = (
                    await collection.find({"conv": ref.conv, "seq": seq_range})
                    .sort("seq", ASCENDING)
                    .limit(EXPORT_PAGE)
                    .to_list()
                )
                for doc in page:
                    yield doc
                if len(page) < EXPORT_PAGE:
                    break
                after = page[-1]["seq"]

    async def _file_lines(self, file_ids: list[str]) -> AsyncIterator[Line]:
        for start in range(0, len(file_ids), LIST_PAGE):
            chunk = [ObjectId(file_id) for file_id in file_ids[start : start + LIST_PAGE]]
            found = {str(doc["_id"]): doc async for doc in self._files.find({"_id": {"$in": chunk}})}
            for file_id in file_ids[start : start + LIST_PAGE]:
                doc = found.get(file_id)
                if doc is None:
                    continue  # gone (a file whose messages were all purged or recalled)
                mime_type = (doc.get("metadata") or {}).get("mimeType", "application/octet-stream")
                yield {"type": "file", **file_to_wire(file_id, mime_type, int(doc.get("length", 0)))}
