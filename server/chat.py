"""The one send path, the one marker path and the one change path (recall, edit: SPEC §14),
shared by REST (handlers/chats.py, handlers/conversations.py) and the WebSocket (handlers/ws.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from models.audit import AuditRecorder
from models.clock import iso, utcnow
from models.conversations import ConversationRef
from models.inbox import Inbox
from models.messages import MessageService
from models.outbox import EventSink, NullSink
from models.principal import Principal
from models.recall import MessageChanges
from models.receipts import MarkerMoves
from server.hub import Hub
from server.push import where
from server.ratelimit import SendRateLimiter


class ChatService:
    def __init__(
        self,
        messages: MessageService,
        inbox: Inbox,
        hub: Hub,
        send_limiter: SendRateLimiter,
        audit: AuditRecorder,
        marker_moves: MarkerMoves,
        events: EventSink | None = None,  # message.read (SPEC §11)
        *,
        changes: MessageChanges,  # recall and edit (SPEC §14)
    ) -> None:
        self._changes = changes
        self._events = events or NullSink()
        self._audit = audit
        self._marker_moves = marker_moves
        self._messages = messages
        self._inbox = inbox
        self._hub = hub
        self._send_limiter = send_limiter
        self._drafts = {"pm": messages.draft_pm, "gm": messages.draft_gm, "sm": messages.draft_sm}

    async def send(
        self, principal: Principal, channel: str, data: Mapping[str, Any], origin: object | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Validate, rate-limit, store and publish: (message, created); created is False for a
        repeated clientMsgId. origin (the sender's own session) gets no copy, only its ack."""
        # Validated before the budget is charged: a refused message costs the sender nothing.
        draft = await self._drafts[channel](principal, data)
        self._send_limiter.check(principal.user_id)
        return await self._messages.send(draft, origin=origin)

    async def mark(
        self, principal: Principal, user: str, data: Mapping[str, Any], *, read: bool, via: str = "rest"
    ) -> tuple[ConversationRef, dict[str, Any]]:
        """Move user's received (or read) marker: (conversation, cursor). A read sends the other
        party (other group members) a receipt on their sockets. The move and its audit entry are
        stored (marker history, SPEC §13) before it is reported, here or as a receipt."""
        principal.require_self_or_staff(user, "user_id")
        ref, others, cursor, previous = await self._inbox.mark(user, data, read=read)
        kind = "read" if read else "received"
        target = {"channel": ref.channel, "user": user, "fromSeq": previous, "toSeq": cursor[kind]}
        if ref.channel == "pm":
            target["peer"] = others[0]
        elif ref.channel == "gm":
            target["group"] = ref.conv
        await asyncio.gather(
            self._marker_moves.record_move(user, ref, kind, previous, cursor[kind]),
            self._audit.record(principal.user_id, principal.role, f"marker.{kind}", via, target),
        )
        if read:
            read_event = {"user": user, **where(ref, user), "seq": cursor["read"], "readAt": iso(utcnow())}
            await self._events.emit("message.read", read_event)  # stored before the move is reported
            self._hub.send_receipt(ref, user, cursor["read"], others)
        return ref, cursor

    # ---- recall and edit (SPEC §14) -------------------------------------------------------------

    async def recall(
        self, principal: Principal, channel: str, message_id: object, data: Mapping[str, Any], via: str = "rest"
    ) -> dict[str, Any]:
        """Recall a message (sender within the window, or staff naming an operator): the changed
        message, once it, its version, the audit entry, the event and the notice are stored."""
        return await self._changes.recall(principal, channel, message_id, data, via)

    async def edit(
        self, principal: Principal, channel: str, message_id: object, data: Mapping[str, Any], via: str = "rest"
    ) -> dict[str, Any]:
        """Edit a message's content: the changed message (stored, versioned, noticed)."""
        return await self._changes.edit(principal, channel, message_id, data, via)

    async def message_history(self, principal: Principal, channel: str, message_id: str) -> dict[str, Any]:
        """Every version of a message, oldest first (admin only; audited)."""
        return await self._changes.history(principal, channel, message_id)
