"""A user's view of its conversations: the list with unread counts, markers, and the backlog."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from models import validation as v
from models.conversations import SEP, SIDES, ConversationRef, ConversationStore, party_markers
from models.database import Database
from models.errors import InvalidField, NotAMember, NotFound
from models.groups import GroupStore
from models.messages import message_to_wire

log = logging.getLogger(__name__)

BACKLOG_PAGE = 200
DEFAULT_LIST_LIMIT = 50
# activityAt (models/conversations.py): an ISO 8601 time with milliseconds, SEP, a conversation key.
ACTIVITY_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z" + SEP + r"(pm|sm|gm):[^\x00]{1,400}")
MAX_LIST_CURSOR_CHARS = 800


def format_list_cursor(activity_at: str) -> str:
    """Opaque and URL-safe: where the next page of the conversation list starts (exclusive)."""
    return base64.urlsafe_b64encode(activity_at.encode()).decode().rstrip("=")


def parse_list_cursor(cursor: str | None) -> str | None:
    """The activityAt a cursor from format_list_cursor stands for; 400 naming cursor otherwise."""
    if cursor is None:
        return None
    try:
        if len(cursor) > MAX_LIST_CURSOR_CHARS:
            raise ValueError("too long")
        decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        decoded = ""
    if not ACTIVITY_RE.fullmatch(decoded):
        raise InvalidField("cursor", "is not a cursor this server issued")
    return decoded


class Inbox:
    def __init__(self, conversations: ConversationStore, groups: GroupStore, db: Database):
        self._conversations = conversations
        self._groups = groups
        self._db = db  # the batched backlog reads (backlog_plans)

    async def resolve(self, user: str, data: Mapping[str, Any]) -> tuple[ConversationRef, list[str]]:
        """The conversation a marker names ({channel, peer | group}) and who else is in it."""
        channel = data.get("channel")
        if channel == "pm":
            peer = v.require_id(data, "peer")
            return ConversationRef.pm(user, peer), [peer]
        if channel == "gm":
            group_id = v.require_id(data, "group")
            group = await self._groups.get(group_id)
            if user not in group["members"]:
                raise NotAMember(f"group: {user!r} is not a member of {group_id!r}")
            return ConversationRef.gm(group_id), [m for m in group["members"] if m != user]
        if channel == "sm":
            return ConversationRef.sm(user), []
        raise InvalidField("channel", "must be one of sm, pm, gm")

    async def mark(
        self, user: str, data: Mapping[str, Any], *, read: bool
    ) -> tuple[ConversationRef, list[str], dict[str, Any], int]:
        """Move the user's received (or read) marker; returns (conversation, others, cursor, the
        marker's value before: the start of the move that marker history records)."""
        seq = v.parse_int(data.get("seq"), "seq")
        ref, others = await self.resolve(user, data)
        summary = await self._conversations.get_summary(ref)
        if summary is None:
            raise NotFound("conversation has no messages yet")
        # Never beyond the newest message: a later message must still count as unread.
        seq = min(seq, summary["lastSeq"])
        previous = await self._marker_before(user, ref, summary, "read" if read else "received")
        cursor = await self._conversations.move_cursor(user, ref, seq, read=read)
        if read:
            log.info("read marker of %s in %s moved to %d", user, ref.channel, cursor["read"])
        return ref, others, cursor, previous

    async def _marker_before(self, user: str, ref: ConversationRef, summary: Mapping[str, Any], kind: str) -> int:
        """A marker's value before a move: the summary's mirror (pm, sm: no extra read), the cursor (gm)."""
        side = ref.side_of(user)
        if side is not None:
            return int(summary.get(f"{kind}{side}", 0))
        cursors = await self._conversations.get_group_cursors(user, [ref.conv])
        return int(cursors.get(ref.key, {}).get(kind, 0))

    async def list_conversations(
        self, user: str, limit: int = DEFAULT_LIST_LIMIT, cursor: str | None = None
    ) -> dict[str, Any]:
        """A page of the user's conversations, newest activity first: {"conversations", "next"}.

        O(page): the summaries come from index walks that stop after limit + 1, unread and the
        markers from the summaries themselves (pm, sm) or the page's group cursors (gm).
        """
        before = parse_list_cursor(cursor)
        group_ids = await self._groups.ids_for_user(user)
        found = await self._conversations.find_recent(user, group_ids, before=before, limit=limit + 1)
        page = found[:limit]
        groups = [s["conv"] for s in page if s["channel"] == "gm"]
        group_cursors = await self._conversations.get_group_cursors(user, groups)
        unread = await self._conversations.unread_counts(user, page, group_cursors)
        out = []
        for summary, unread_here in zip(page, unread, strict=True):
            ref = ConversationRef(summary["channel"], summary["conv"])
            entry: dict[str, Any] = {"channel": ref.channel}
            side = ref.side_of(user)
            received, read_seq, _own = party_markers(user, ref, summary, group_cursors)
            if ref.channel == "pm":
                low, high = ref.pm_pair()
                entry["peer"] = high if low == user else low
            elif ref.channel == "gm":
                entry["group"] = ref.conv
            entry.update(
                {
                    "lastMessage": message_to_wire(summary["lastMessage"]),
                    "unread": unread_here,
                    "receivedSeq": received,
                    "readSeq": read_seq,
                }
            )
            if ref.channel == "pm":
                entry["peerReadSeq"] = summary.get(f"read{'B' if side == 'A' else 'A'}", 0)
            out.append(entry)
        more = len(found) > limit
        return {"conversations": out, "next": format_list_cursor(page[-1]["activityAt"]) if more else None}

    async def backlog_plan(
        self,
        user: str,
        just_stored: Mapping[str, tuple[ConversationRef, int]] | None = None,
    ) -> list[tuple[ConversationRef, int, int]]:
        """(conversation, received marker, newest seq): the conversations with news first, then the
        rest of the user's cursors (newest = received: a baseline for the socket, nothing to send).

        just_stored: conversation key -> (ref, seq) of messages this process learnt of from other
        processes whose summaries may not be written yet (server/fanout.py); they count too.
        """
        plans = await self.backlog_plans([user], {user: just_stored or {}})
        return plans[user]

    async def backlog_plans(
        self, users: Sequence[str], just_stored: Mapping[str, Mapping[str, tuple[ConversationRef, int]]]
    ) -> dict[str, list[tuple[ConversationRef, int, int]]]:
        """backlog_plan for many users in five queries in all, not five per user: the sockets of a
        reconnect storm are planned in batches (server/backlog.py).

        O(news + groups + cursors) documents: pm/sm summaries are found by their news flag, not by
        reading every conversation.
        """
        users = list(dict.fromkeys(users))
        # One user (a quiet moment) by equality: nx-27017 uses an index for it, not for $in.
        match: Any = users[0] if len(users) == 1 else {"$in": users}
        summaries, cursor_coll = self._db.conversations, self._db.cursors
        fields = {"channel": 1, "conv": 1, "lastSeq": 1, "purgedSeq": 1}
        groups_found, *pending_pages, cursor_docs = await asyncio.gather(
            self._db.groups.find({"members": {"$in": users}}, {"members": 1}).to_list(),  # see has_member
            *(summaries.find({f"pending{side}": match}, {**fields, f"pending{side}": 1}).to_list() for side in SIDES),
            cursor_coll.find({"user": match}, {"_id": 0}).to_list(),
        )
        wanted = set(users)
        groups_of: dict[str, list[str]] = {u: [] for u in users}
        for group in groups_found:
            for member in wanted.intersection(group.get("members", ())):
                groups_of[member].append(group["_id"])
        group_keys = {ConversationRef.gm(g).key for ids in groups_of.values() for g in ids}
        group_seqs = await self._conversations.get_seq_ranges([ConversationRef.from_key(k) for k in group_keys])
        pending_of: dict[str, list[dict[str, Any]]] = {u: [] for u in users}
        for side, page in zip(SIDES, pending_pages, strict=True):
            for summary in page:
                pending_of[summary[f"pending{side}"]].append(summary)
        cursors_of: dict[str, dict[str, dict[str, Any]]] = {u: {} for u in users}
        for doc in cursor_docs:
            cursors_of[doc["user"]][f"{doc['channel']}:{doc['conv']}"] = doc
        plans = {}
        for user in users:
            keys = (ConversationRef.gm(g).key for g in groups_of[user])
            seqs = {key: group_seqs[key] for key in keys if key in group_seqs}
            plans[user] = await self._plan(user, pending_of[user], cursors_of[user], seqs, just_stored.get(user, {}))
        return plans

    async def _plan(
        self,
        user: str,
        pending: list[dict[str, Any]],
        cursors: Mapping[str, Mapping[str, Any]],
        group_seqs: Mapping[str, tuple[int, int]],
        just_stored: Mapping[str, tuple[ConversationRef, int]],
    ) -> list[tuple[ConversationRef, int, int]]:
        newest: dict[str, tuple[ConversationRef, int]] = {}
        # What retention deleted (models/retention.py): the backlog starts above it, so the seqs
        # that are gone are not held for as a gap (server/ordering.py).
        purged: dict[str, int] = {}
        for summary in pending:
            ref = ConversationRef(summary["channel"], summary["conv"])
            newest[ref.key] = (ref, summary["lastSeq"])
            purged[ref.key] = summary.get("purgedSeq", 0)
        for key, (seq, purged_seq) in group_seqs.items():
            newest[key] = (ConversationRef.from_key(key), seq)
            purged[key] = purged_seq
        for key, (ref, seq) in just_stored.items():
            if seq > newest.get(key, (ref, 0))[1]:
                newest[key] = (ref, seq)
        plan = []
        for key, (ref, seq) in newest.items():
            received = cursors.get(key, {}).get("received", 0)
            if seq <= received and ref.channel != "gm":
                # A flag left set (a received marker moved past a message while its summary was
                # still being written): clear it now, conditionally.
                await self._conversations.clear_pending(user, ref, received)
            plan.append((ref, max(received, purged.get(key, 0)), seq))
        for key, cursor in cursors.items():
            if key not in newest:
                plan.append((ConversationRef.from_key(key), cursor.get("received", 0), cursor.get("received", 0)))
        return plan

    async def messages_after(
        self, ref: ConversationRef, after: int, before: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Messages with after < seq (< before), oldest first, read in pages."""
        while True:
            page = await self.message_page(ref, after, before)
            for message in page:
                yield message
            if len(page) < BACKLOG_PAGE:
                return
            after = page[-1]["seq"]

    async def message_page(self, ref: ConversationRef, after: int, before: int | None = None) -> list[dict[str, Any]]:
        """Up to BACKLOG_PAGE messages with after < seq (< before), oldest first, in wire form
        (a socket writes a backlog page at once, server/session.py)."""
        page = await self._conversations.messages_after(ref, after, BACKLOG_PAGE, before)
        return [message_to_wire(doc) for doc in page]
