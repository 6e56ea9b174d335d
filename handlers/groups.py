"""Groups and their members: /api/v1/groups..."""

from __future__ import annotations

from handlers.base import BaseHandler
from models.groups import group_to_wire

# A member list of a full group (5,000 ids of up to 128 characters, JSON-quoted) is ~660 KB: more
# than the JSON body cap, which is sized for messages.
MEMBER_LIST_BODY_BYTES = 1024 * 1024


class MemberListHandler(BaseHandler):
    """Calls whose body may carry a whole group's member list."""

    def body_cap(self) -> int:
        return max(super().body_cap(), MEMBER_LIST_BODY_BYTES)


class GroupsHandler(MemberListHandler):
    async def post(self) -> None:
        """Create a group: {id?, name, groupType, members}."""
        principal = self.authenticate()
        group = await self.services.group_service.create(principal, self.json_body())
        self.write_json(group_to_wire(group), 201)


class GroupHandler(BaseHandler):
    async def get(self, group_id: str) -> None:
        principal = self.authenticate()
        group = await self.services.group_service.read(principal, group_id)
        self.write_json(group_to_wire(group))


class GroupMembersHandler(MemberListHandler):
    async def post(self, group_id: str) -> None:
        """Add members: {"members": [ids]}; members get a group.members_added notice."""
        principal = self.authenticate()
        group = await self.services.group_service.add_members(principal, group_id, self.json_body())
        self.write_json(group_to_wire(group))


class GroupMemberHandler(BaseHandler):
    async def delete(self, group_id: str, member: str) -> None:
        """Remove one member (or leave); it stops receiving the group's messages at once."""
        principal = self.authenticate()
        group = await self.services.group_service.remove_member(principal, group_id, member)
        self.write_json(group_to_wire(group))
