"""Per-user reads: /api/v1/users/{id}/groups and /api/v1/users/{id}/presence."""

from __future__ import annotations

from handlers.base import BaseHandler
from models.groups import group_to_wire
from models.validation import check_id


class UserGroupsHandler(BaseHandler):
    async def get(self, user_id: str) -> None:
        principal = self.authenticate()
        user = check_id(user_id, "id")
        principal.require_self_or_staff(user, "id")
        groups = await self.services.groups.list_for_user(user)
        self.write_json({"groups": [group_to_wire(g) for g in groups]})


class PresenceHandler(BaseHandler):
    async def get(self, user_id: str) -> None:
        """{"user", "online", "lastSeen"}; patients see only themselves and people they talk to."""
        principal = self.authenticate()
        user = check_id(user_id, "id")
        await self.services.presence.check_visible(principal, user)
        self.write_json(await self.services.presence.get(user))
