"""GET /api/v1/conversations and POST /api/v1/conversations/read."""

from __future__ import annotations

from handlers.base import BaseHandler
from models.messages import parse_limit
from models.principal import require_own_user
from models.validation import require_id


class ConversationsHandler(BaseHandler):
    async def get(self) -> None:
        """A page of the user's conversations, newest activity first, with unread counts."""
        principal = self.authenticate()
        query = self.query()
        user = require_own_user(principal, query)
        limit = parse_limit(query.get("limit"))
        page = await self.services.inbox.list_conversations(user, limit, query.get("cursor"))
        await self.services.audit.record_for(principal, "conversations.read", "rest", {"user": user})
        self.write_json(page)


class ReadMarkerHandler(BaseHandler):
    async def post(self) -> None:
        """Move the user's read marker; the other party gets a receipt on its sockets."""
        principal = self.authenticate()
        body = self.json_body()
        ref, cursor = await self.services.chat.mark(principal, require_id(body, "user_id"), body, read=True)
        self.write_json({"channel": ref.channel, "receivedSeq": cursor["received"], "readSeq": cursor["read"]})
