"""Per-user calls: /api/v1/users/{id}/groups, /presence and /role."""

from __future__ import annotations

from handlers.base import BaseHandler
from models.groups import group_to_wire
from models.principal import require_own_user
from models.validation import check_id


class UserGroupsHandler(BaseHandler):
    async def get(self, user_id: str) -> None:
        user = require_own_user(self.authenticate(), {"id": user_id}, "id")
        groups = await self.services.groups.list_for_user(user)
        self.write_json({"groups": [group_to_wire(g) for g in groups]})


class PresenceHandler(BaseHandler):
    async def get(self, user_id: str) -> None:
        """{"user", "online", "lastSeen"}; patients see only themselves and people they talk to."""
        principal = self.authenticate()
        user = check_id(user_id, "id")
        await self.services.presence.check_visible(principal, user)
        self.write_json(await self.services.presence.get(user))


class UserRoleHandler(BaseHandler):
    async def put(self, user_id: str) -> None:
        """Staff declare a user's role: {"role": "doctor" | "patient"} (who may be a consultation's doctor)."""
        principal = self.authenticate()
        user = check_id(user_id, "id")
        self.write_json(await self.services.directory.declare_role(principal, user, self.json_body()))
