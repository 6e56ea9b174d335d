"""The one send path and the one marker path, shared by REST (handlers/chats.py,
handlers/conversations.py) and the WebSocket (handlers/ws.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.conversations import ConversationRef
from models.inbox import Inbox
from models.messages import MessageService
from models.principal import Principal
from server.hub import Hub
from server.ratelimit import SendRateLimiter


class ChatService:
    def __init__(self, messages: MessageService, inbox: Inbox, hub: Hub, send_limiter: SendRateLimiter) -> None:
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
        self, principal: Principal, user: str, data: Mapping[str, Any], *, read: bool
    ) -> tuple[ConversationRef, dict[str, Any]]:
        """Move user's received (or read) marker: (conversation, cursor). A read sends the other
        party (other group members) a receipt on their sockets."""
        principal.require_self_or_staff(user, "user_id")
        ref, others, cursor = await self._inbox.mark(user, data, read=read)
        if read:
            self._hub.send_receipt(ref, user, cursor["read"], others)
        return ref, cursor
