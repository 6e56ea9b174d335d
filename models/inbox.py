"""A user's view of its conversations: the list with unread counts, markers, and the backlog."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from models import validation as v
from models.conversations import ConversationRef, ConversationStore
from models.groups import GroupStore, NotAMember
from models.messages import message_to_wire
from server.errors import InvalidField, NotFound

log = logging.getLogger(__name__)

BACKLOG_PAGE = 200


class Inbox:
    def __init__(self, conversations: ConversationStore, groups: GroupStore):
        self._conversations = conversations
        self._groups = groups

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

    async def mark(self, user: str, data: Mapping[str, Any], *,
                   read: bool) -> tuple[ConversationRef, list[str], dict[str, Any]]:
        """Move the user's received (or read) marker; returns (conversation, others, cursor)."""
        seq = v.parse_int(data.get("seq"), "seq")
        ref, others = await self.resolve(user, data)
        summary = await self._conversations.get_summary(ref)
        if summary is None:
            raise NotFound("conversation has no messages yet")
        # Never beyond the newest message: a later message must still count as unread.
        seq = min(seq, summary["lastSeq"])
        cursor = await self._conversations.move_cursor(user, ref, seq, read=read)
        if read:
            log.info("read marker of %s in %s moved to %d", user, ref.channel, cursor["read"])
        return ref, others, cursor

    async def list_conversations(self, user: str) -> list[dict[str, Any]]:
        group_ids = await self._groups.ids_for_user(user)
        summaries = await self._conversations.find_summaries(user, group_ids)
        cursors = await self._conversations.get_cursors(user)
        out = []
        for summary in summaries:
            ref = ConversationRef(summary["channel"], summary["conv"])
            cursor = cursors.get(ref.key, {})
            read_seq = cursor.get("read", 0)
            unread = 0
            if summary["lastSeq"] > read_seq:
                unread = await self._conversations.count_unread(ref, user, read_seq)
            entry: dict[str, Any] = {"channel": ref.channel}
            if ref.channel == "pm":
                low, high = ref.pm_pair()
                entry["peer"] = high if low == user else low
            elif ref.channel == "gm":
                entry["group"] = ref.conv
            entry.update({
                "lastMessage": message_to_wire(summary["lastMessage"]),
                "unread": unread,
                "receivedSeq": cursor.get("received", 0),
                "readSeq": read_seq,
            })
            out.append(entry)
        out.sort(key=lambda e: e["lastMessage"]["createdAt"], reverse=True)
        return out

    async def backlog_plan(self, user: str, just_stored: Mapping[str, tuple[ConversationRef, int]] | None = None,
                           ) -> list[tuple[ConversationRef, int, int]]:
        """(conversation, received marker, newest seq) for every conversation of the user.

        just_stored: conversation key -> (ref, seq) of messages this process learnt of from other
        processes whose summaries may not be written yet (server/fanout.py); they count too.
        """
        group_ids = await self._groups.ids_for_user(user)
        summaries = await self._conversations.find_summaries(user, group_ids)
        newest: dict[str, tuple[ConversationRef, int]] = {}
        for summary in summaries:
            ref = ConversationRef(summary["channel"], summary["conv"])
            newest[ref.key] = (ref, summary["lastSeq"])
        for key, (ref, seq) in (just_stored or {}).items():
            if seq > newest.get(key, (ref, 0))[1]:
                newest[key] = (ref, seq)
        if not newest:
            return []  # a new user: nothing to read, no cursors to look up
        cursors = await self._conversations.get_cursors(user)
        return [(ref, cursors.get(key, {}).get("received", 0), seq) for key, (ref, seq) in newest.items()]

    async def messages_after(self, ref: ConversationRef, after: int,
                             before: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Messages with after < seq (< before), oldest first, read in pages."""
        while True:
            page = await self._conversations.messages_after(ref, after, BACKLOG_PAGE, before)
            for doc in page:
                yield message_to_wire(doc)
            if len(page) < BACKLOG_PAGE:
                return
            after = page[-1]["seq"]
