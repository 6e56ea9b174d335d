"""Admin API of the webhook outbox (SPEC §11): list events by status, queue a failed one again."""

from __future__ import annotations

import re

from handlers.base import BaseHandler
from models.errors import Forbidden, InvalidField, NotFound
from models.messages import parse_limit
from models.outbox import STATUSES, Outbox
from models.principal import Principal

EVENT_ID_RE = re.compile(r"[0-9a-f]{24}")


class WebhookHandler(BaseHandler):
    def admin_outbox(self) -> tuple[Principal, Outbox]:
        """The caller must be an admin; 404 when no webhook or push url is configured."""
        principal = self.authenticate()
        if principal.role != "admin":
            raise Forbidden("only admin tokens may see webhook events")
        if self.services.outbox is None:
            raise NotFound("webhooks are off: no [webhooks] url is configured")
        return principal, self.services.outbox


class WebhookEventsHandler(WebhookHandler):
    async def get(self) -> None:
        """A page of events, newest first: {"events", "next"}."""
        _principal, outbox = self.admin_outbox()
        query = self.query()
        status = query.get("status")
        if status is not None and status not in STATUSES:
            raise InvalidField("status", f"must be one of {', '.join(STATUSES)}")
        cursor = query.get("cursor")
        if cursor is not None and not EVENT_ID_RE.fullmatch(cursor):
            raise InvalidField("cursor", "is not a cursor this server issued")
        self.write_json(await outbox.list_events(status, parse_limit(query.get("limit")), cursor))


class WebhookEventRetryHandler(WebhookHandler):
    async def post(self, event_id: str) -> None:
        """Queue a failed event again (attempts from 1)."""
        _principal, outbox = self.admin_outbox()
        if not EVENT_ID_RE.fullmatch(event_id):
            raise NotFound(f"event {event_id!r} does not exist")
        self.write_json(await outbox.retry(event_id))
