"""Group maintenance with its side effects: membership notices in the group, join-point cursors.

New members see the group's history through GET /api/v1/chats/gm (a care team shares one record),
but deferred delivery starts at the join: their received/read markers are set to the group's
current seq, so connecting does not replay the whole history as new messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models import validation as v
from models.conversations import ConversationRef, ConversationStore
from models.groups import GroupStore, NotAMember
from models.messages import Draft, MessageService
from server.auth import Principal
from server.errors import Forbidden, InvalidField

EVENT_MEMBERS_ADDED = "group.members_added"
EVENT_MEMBER_REMOVED = "group.member_removed"
EVENT_GROUP_CREATED = "group.created"


class GroupService:
    def __init__(self, groups: GroupStore, conversations: ConversationStore, messages: MessageService):
        self._groups = groups
        self._conversations = conversations
        self._messages = messages

    async def create(self, principal: Principal, data: Mapping[str, Any]) -> dict[str, Any]:
        if not principal.is_staff and principal.role != "doctor":
            raise Forbidden("only doctors, service and admin may create groups")
        group_id = v.optional_id(data, "id")
        name = v.parse_text(data, "name", max_chars=v.MAX_GROUP_NAME_CHARS)
        assert name is not None
        if data.get("groupType") is None:
            raise InvalidField("groupType", "is required")
        group_type = v.parse_int(data["groupType"], "groupType", maximum=2**31, allow_numeric_string=True)
        if data.get("members") is None:
            raise InvalidField("members", "is required")
        members = v.parse_id_list(data["members"], "members", max_items=v.MAX_GROUP_MEMBERS)
        if principal.role == "doctor" and principal.user_id not in members:
            members.insert(0, principal.user_id)  # a doctor's group always includes the doctor
        if not members:
            raise InvalidField("members", "must name at least one member")
        group = await self._groups.create(group_id=group_id, name=name, group_type=group_type,
                                          members=members, created_by=principal.user_id)
        await self._announce(group, principal.user_id, EVENT_GROUP_CREATED, members,
                             f"{principal.user_id} created the group {name}", group["members"])
        return group

    async def read(self, principal: Principal, group_id: str) -> dict[str, Any]:
        """Members, the creator and staff may read a group."""
        group = await self._groups.get(group_id)
        if not (principal.is_staff or principal.user_id in group["members"]
                or group["createdBy"] == principal.user_id):
            raise NotAMember(f"group: {principal.user_id!r} is not a member of {group_id!r}")
        return group

    async def add_members(self, principal: Principal, group_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
        if data.get("members") is None:
            raise InvalidField("members", "is required")
        members = v.parse_id_list(data["members"], "members", max_items=v.MAX_GROUP_MEMBERS)
        if not members:
            raise InvalidField("members", "must name at least one member")
        self._groups.check_manage(await self._groups.get(group_id), principal)
        ref = ConversationRef.gm(group_id)
        summary = await self._conversations.get_summary(ref)
        join_seq = summary["lastSeq"] if summary else 0
        for member in members:
            await self._conversations.move_cursor(member, ref, join_seq, read=True)
        group, added = await self._groups.add_members(group_id, members)
        if added:
            await self._announce(group, principal.user_id, EVENT_MEMBERS_ADDED, added,
                                 f"{principal.user_id} added {', '.join(added)}", group["members"])
        return group

    async def remove_member(self, principal: Principal, group_id: str, member: str) -> dict[str, Any]:
        member = v.check_id(member, "user")
        group = await self._groups.get(group_id)
        if member != principal.user_id:  # anyone may leave; removing others needs the right to manage
            self._groups.check_manage(group, principal)
        group, was_member = await self._groups.remove_member(group_id, member)
        if was_member:
            # The removed member hears of it too, then nothing more from this group.
            await self._announce(group, principal.user_id, EVENT_MEMBER_REMOVED, [member],
                                 f"{principal.user_id} removed {member}", [*group["members"], member])
        return group

    async def _announce(self, group: dict[str, Any], operator: str, event: str, members: list[str],
                        content: str, recipients: list[str]) -> None:
        fields = {
            "channel": "gm", "from": operator, "group": group["_id"], "groupType": group["groupType"],
            "contentType": 1, "content": content, "event": event, "members": members,
        }
        draft = Draft(ConversationRef.gm(group["_id"]), fields, recipients, None)
        await self._messages.send(draft)
