"""GET /api/v1/audit (admin) and GET /api/v1/chats/{channel}/{id}/receipts (SPEC §13)."""

from __future__ import annotations

from handlers.base import BaseHandler


class AuditHandler(BaseHandler):
    async def get(self) -> None:
        """A page of audit entries, newest first; the query itself is an audit.read entry."""
        principal = self.authenticate()
        self.write_json(await self.services.audit.query(principal, self.query()))


class ReceiptsHandler(BaseHandler):
    def initialize(self, channel: str) -> None:
        self.channel = channel  # one route per channel (handlers/routes.py)

    async def get(self, message_id: str) -> None:
        """When each recipient's received and read markers first reached the message."""
        principal = self.authenticate()
        self.write_json(await self.services.receipts.receipts(principal, self.channel, message_id))
