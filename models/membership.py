"""Group maintenance with its side effects: membership notices in the group, join-point cursors.

New members see the group's history through GET /api/v1/chats/gm (a care team shares one record),
but deferred delivery starts at the join: their received/read markers are set to the group's
current seq, so connecting does not replay the whole history as new messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo import WriteConcern
from pymongo.errors import BulkWriteError

from models import validation as v
from models.audit import AuditRecorder
from models.clock import utcnow
from models.conversations import ConversationRef, ConversationStore
from models.database import Database
from models.errors import Forbidden, GroupBusy, GroupFull, InvalidField, NotAMember
from models.groups import GroupStore, group_to_wire
from models.keyed_locks import KeyedLocks
from models.messages import EVENT_MEMBER_REMOVED, Draft, MessageService, recipients_of
from models.outbox import EventSink, NullSink
from models.principal import Principal
from models.throttling import ActionLimiter

EVENT_MEMBERS_ADDED = "group.members_added"
EVENT_GROUP_CREATED = "group.created"
# Adds retried when another process changed the group between our read and our write.
ADD_ATTEMPTS = 20
# A notice's readable content names this many members, then "and N more" (`members` has them all).
NOTICE_NAMES_SHOWN = 10
DUPLICATE_KEY = 11000


class GroupService:
    def __init__(
        self,
        groups: GroupStore,
        conversations: ConversationStore,
        messages: MessageService,
        db: Database,
        markers_write_concern: WriteConcern,
        limiter: ActionLimiter,
        max_members: int,
        *,
        audit: AuditRecorder | None = None,
        events: EventSink | None = None,  # group.created / members_added / member_removed (SPEC §11)
    ):
        self._events = events or NullSink()
        # SPEC §13: group.created / members_added / member_removed (REST calls only, so via "rest").
        self._audit = audit
        self._groups = groups
        self._conversations = conversations
        self._messages = messages
        # Join markers are written here in bulk, in the shape ConversationStore.move_cursor keeps. Not
        # journaled (as move_cursor's are not): a lost one only replays history; and nx-27017 turns
        # j:true into one fsync per document (3,000 members: seconds instead of half a second).
        self._cursors = db.get_collection("cursors", write_concern=markers_write_concern)
        self._limiter = limiter
        self._max_members = max_members
        self._group_locks = KeyedLocks()

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
        self._check_size(len(members))
        self._limiter.check(principal.user_id)  # the group.created notice is a message
        group = await self._groups.create(
            group_id=group_id, name=name, group_type=group_type, members=members, created_by=principal.user_id
        )
        await self._announce(
            group, principal.user_id, EVENT_GROUP_CREATED, members, f"{principal.user_id} created the group {name}"
        )
        await self._record(principal, EVENT_GROUP_CREATED, group["_id"], None)
        return group

    async def read(self, principal: Principal, group_id: str) -> dict[str, Any]:
        """Members, the creator and staff may read a group."""
        group = await self._groups.get(group_id)
        if not (principal.is_staff or principal.user_id in group["members"] or group["createdBy"] == principal.user_id):
            raise NotAMember(f"group: {principal.user_id!r} is not a member of {group_id!r}")
        return group

    async def add_members(self, principal: Principal, group_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Add members; only those not yet in the group get join markers and are named in the notice."""
        if data.get("members") is None:
            raise InvalidField("members", "is required")
        members = v.parse_id_list(data["members"], "members", max_items=v.MAX_GROUP_MEMBERS)
        if not members:
            raise InvalidField("members", "must name at least one member")
        self._groups.check_manage(await self._groups.get(group_id), principal)
        self._limiter.check(principal.user_id)
        ref = ConversationRef.gm(group_id)
        async with self._group_locks.hold(group_id):
            # The join point is read before the membership: a message sent to someone already a
            # member always has a seq above it, so the markers below never skip one of theirs.
            summary = await self._conversations.get_summary(ref)
            join_seq = summary["lastSeq"] if summary else 0
            for _attempt in range(ADD_ATTEMPTS):
                before = await self._groups.get(group_id)
                current = set(before["members"])
                added = [m for m in members if m not in current]
                if not added:
                    return before  # nothing changes: no markers move, no notice
                self._check_size(len(current) + len(added))
                await self._write_join_markers(added, ref, join_seq)
                group = await self._groups.add_new_members(before, added)
                if group is not None:
                    break
            else:
                raise GroupBusy(f"group {group_id!r} kept changing; retry")
        await self._announce(
            group, principal.user_id, EVENT_MEMBERS_ADDED, added, f"{principal.user_id} added {_names(added)}"
        )
        await self._record(principal, EVENT_MEMBERS_ADDED, group_id, added[0] if len(added) == 1 else None)
        return group

    async def remove_member(self, principal: Principal, group_id: str, member: str) -> dict[str, Any]:
        member = v.check_id(member, "user")
        group = await self._groups.get(group_id)
        if member != principal.user_id:  # anyone may leave; removing others needs the right to manage
            self._groups.check_manage(group, principal)
        self._limiter.check(principal.user_id)
        group, was_member = await self._groups.remove_member(group_id, member)
        if was_member:
            # The removed member hears of it too, then nothing more from this group.
            await self._announce(
                group, principal.user_id, EVENT_MEMBER_REMOVED, [member], f"{principal.user_id} removed {member}"
            )
            await self._record(principal, EVENT_MEMBER_REMOVED, group_id, member)
        return group

    def _check_size(self, size: int) -> None:
        if size > self._max_members:
            raise GroupFull(f"members: the group would have {size} members; at most {self._max_members}")

    async def _write_join_markers(self, users: list[str], ref: ConversationRef, seq: int) -> None:
        """Set the received and read markers of new members to the join point, in two bulk writes.

        One upsert per member would be a round trip each (3,000 members: many seconds); instead the
        members that already have a cursor here (they were members before) are raised with one
        update_many — $max, so never backwards — and the rest are inserted with one insert_many.
        """
        conversation = {"channel": ref.channel, "conv": ref.conv}
        existing = {
            doc["user"]
            async for doc in self._cursors.find({"user": {"$in": users}, **conversation}, {"user": 1, "_id": 0})
        }
        fresh = [u for u in users if u not in existing]
        now = utcnow()
        if fresh:
            try:
                await self._cursors.insert_many(
                    [{"user": u, **conversation, "received": seq, "read": seq, "readAt": now} for u in fresh],
                    ordered=False,
                )
            except BulkWriteError as exc:
                # A marker created meanwhile (the user read the group): raise it like the others.
                if any(error.get("code") != DUPLICATE_KEY for error in exc.details.get("writeErrors", [])):
                    raise
                existing.update(fresh)
        if existing:
            await self._cursors.update_many(
                {"user": {"$in": list(existing)}, **conversation},
                {"$max": {"received": seq, "read": seq}, "$set": {"readAt": now}},
            )

    async def _record(self, principal: Principal, action: str, group_id: str, user: str | None) -> None:
        if self._audit is not None:
            target = {"channel": "gm", "group": group_id, "user": user}
            await self._audit.record(principal.user_id, principal.role, action, "rest", target)

    async def _announce(
        self, group: dict[str, Any], operator: str, event: str, members: list[str], content: str
    ) -> None:
        fields = {
            "channel": "gm",
            "from": operator,
            "group": group["_id"],
            "groupType": group["groupType"],
            "contentType": 1,
            "content": content,
            "event": event,
            "members": members,
        }
        ref = ConversationRef.gm(group["_id"])
        draft = Draft(ref, fields, recipients_of(ref, fields, group["members"]), None)
        await self._messages.send(draft)
        await self._events.emit(event, {"group": group_to_wire(group), "members": members, "by": operator})


def _names(members: list[str]) -> str:
    """The members' names for a notice, as "A, B and 2,998 more": readable (and small) for a bulk add."""
    shown = ", ".join(members[:NOTICE_NAMES_SHOWN])
    hidden = len(members) - NOTICE_NAMES_SHOWN
    return f"{shown} and {hidden:,} more" if hidden > 0 else shown
