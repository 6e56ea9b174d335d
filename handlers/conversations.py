"""GET /api/v1/conversations and POST /api/v1/conversations/read."""

from __future__ import annotations

from handlers.base import BaseHandler
from models.errors import InvalidField
from models.messages import parse_limit
from models.validation import check_id, require_id


class ConversationsHandler(BaseHandler):
    async def get(self) -> None:
        """A page of the user's conversations, newest activity first, with unread counts."""
        principal = self.authenticate()
        query = self.query()
        if "user_id" not in query:
            raise InvalidField("user_id", "is required")
        user = check_id(query["user_id"], "user_id")
        principal.require_self_or_staff(user, "user_id")
        limit = parse_limit(query.get("limit"))
        self.write_json(await self.services.inbox.list_conversations(user, limit, query.get("cursor")))


class ReadMarkerHandler(BaseHandler):
    async def post(self) -> None:
        """Move the user's read marker; the other party gets a receipt on its sockets."""
        principal = self.authenticate()
        body = self.json_body()
        user = require_id(body, "user_id")
        principal.require_self_or_staff(user, "user_id")
        ref, others, cursor = await self.services.inbox.mark(user, body, read=True)
        self.services.hub.send_receipt(ref, user, cursor["read"], others)
        self.write_json({"channel": ref.channel, "receivedSeq": cursor["received"], "readSeq": cursor["read"]})
