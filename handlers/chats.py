"""POST/GET /api/v1/chats/{sm,pm,gm}: doctors and the platform back end send and read messages."""

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
