"""/api/v1/chats/…: doctors and the platform back end send and read messages, and recall, edit and
look up the versions of one (SPEC §14)."""

from __future__ import annotations

from handlers.base import BaseHandler


class ChatsHandler(BaseHandler):
    async def post(self, channel: str) -> None:
        """Send a message: 201 with the message, or 200 with the original for a repeated clientMsgId."""
        principal = self.authenticate()
        message, created = await self.services.chat.send(principal, channel, self.json_body())
        self.write_json(message, 201 if created else 200)

    async def get(self, channel: str) -> None:
        """A page of messages, oldest first."""
        principal = self.authenticate()
        page = await self.services.messages.list_messages(principal, channel, self.query())
        self.write_json(page)


class MessageHandler(BaseHandler):
    """PATCH /api/v1/chats/{channel}/{id}: edit a message."""

    def initialize(self, channel: str) -> None:
        self.channel = channel  # one route per channel (handlers/routes.py)

    async def patch(self, message_id: str) -> None:
        """{content, contentType?, clientMsgId?, operator? (staff)} → 200 with the changed message."""
        principal = self.authenticate()
        message = await self.services.chat.edit(principal, self.channel, message_id, self.json_body())
        self.write_json(message)


class RecallHandler(BaseHandler):
    """POST /api/v1/chats/{channel}/{id}/recall."""

    def initialize(self, channel: str) -> None:
        self.channel = channel

    async def post(self, message_id: str) -> None:
        """{reason?, operator? (staff)} → 200 with the recalled message (again for a repeat)."""
        principal = self.authenticate()
        message = await self.services.chat.recall(principal, self.channel, message_id, self.json_body(optional=True))
        self.write_json(message)


class MessageHistoryHandler(BaseHandler):
    """GET /api/v1/chats/{channel}/{id}/history (admin)."""

    def initialize(self, channel: str) -> None:
        self.channel = channel

    async def get(self, message_id: str) -> None:
        """{"message", "versions"} oldest first; audited as message.history.read."""
        principal = self.authenticate()
        self.write_json(await self.services.chat.message_history(principal, self.channel, message_id))
