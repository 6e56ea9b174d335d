"""Legal holds (SPEC §15): what retention must not purge while a matter is open.

A hold names a user (all its conversations: its pm pairs, its system messages and the groups it
is a member of), one pm conversation (`user` + `peer`) or a group. Admin only; creating and
releasing one are audited (`hold.created`, `hold.released`). Held messages, and files attached to
them or owned by a held user, are never purged; a released hold lets the next purge take what is
past its limit.

Storage: `holds`, one document per hold `{_id, user?, peer?, group?, reason, createdAt, createdBy}`;
a release adds `releasedAt`/`releasedBy` and keeps the document, so who held what, and until when,
stays on record. The set of active holds is small (a few per legal matter) and is read whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument, WriteConcern

from models import validation as v
from models.audit import AuditRecorder
from models.clock import iso, utcnow
from models.conversations import ConversationRef, ConversationStore
from models.database import Database
from models.errors import Forbidden, InvalidField, NotFound
from models.groups import GroupStore
from models.principal import Principal

COLLECTION = "holds"
MAX_REASON_CHARS = 1000
TARGET_FIELDS = ("user", "peer", "group")


class HoldNotFound(NotFound):
    """No active hold with that id (never created, or released already)."""

    code = "hold_not_found"


class UnknownHoldTarget(NotFound):
    """A hold names a user or group this server has never known."""

    code = "unknown_hold_target"


def hold_to_wire(doc: Mapping[str, Any]) -> dict[str, Any]:
    wire: dict[str, Any] = {"id": doc["_id"]}
    for field in TARGET_FIELDS:
        if doc.get(field) is not None:
            wire[field] = doc[field]
    wire.update({"reason": doc["reason"], "createdAt": iso(doc["createdAt"]), "createdBy": doc["createdBy"]})
    if doc.get("releasedAt") is not None:
        wire["releasedAt"] = iso(doc["releasedAt"])
        wire["releasedBy"] = doc.get("releasedBy")
    return wire


@dataclasses.dataclass(frozen=True)
class HeldSet:
    """The active holds as retention applies them, resolved once per batch."""

    users: frozenset[str] = frozenset()
    pm_convs: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()  # held groups, and the groups of held users

    def holds(self, ref: ConversationRef) -> bool:
        """Is this conversation (every message of it) under a hold?"""
        if ref.channel == "pm":
            return ref.conv in self.pm_convs or any(user in self.users for user in ref.pm_pair())
        if ref.channel == "sm":
            return ref.conv in self.users
        return ref.conv in self.groups

    def holds_file_of(self, metadata: Mapping[str, Any]) -> bool:
        """A file uploaded by or for a held user (attached or not) is kept with the user's record."""
        return any(metadata.get(field) in self.users for field in ("owner", "uploadedBy"))

    @property
    def empty(self) -> bool:
        return not (self.users or self.pm_convs or self.groups)


class HoldService:
    def __init__(
        self,
        db: Database,
        write_concern: WriteConcern,
        groups: GroupStore,
        conversations: ConversationStore,
        *,
        audit: AuditRecorder | None = None,
    ):
        self._holds = db.get_collection(COLLECTION, write_concern=write_concern)
        self._db = db
        self._groups = groups
        self._conversations = conversations
        self._audit = audit

    # ---- the admin API -------------------------------------------------------------------------

    async def create(self, principal: Principal, data: Mapping[str, Any]) -> dict[str, Any]:
        """POST /api/v1/holds: {"user"} | {"user", "peer"} | {"group"}, plus "reason" → the hold."""
        _require_admin(principal, "place legal holds")
        target = parse_target(data)
        reason = v.parse_text(data, "reason", max_chars=MAX_REASON_CHARS)
        for field in ("user", "peer"):
            if field in target:
                await self._require_known_user(target[field], field)
        if "group" in target and await self._groups.find(target["group"]) is None:
            raise UnknownHoldTarget(f"group: no group {target['group']!r}")
        doc = {
            "_id": str(ObjectId()),
            **target,
            "reason": reason,
            "createdAt": utcnow(),
            "createdBy": principal.user_id,
        }
        await self._holds.insert_one(doc)
        await self._record(principal, "hold.created", doc)
        return hold_to_wire(doc)

    async def list_active(self, principal: Principal) -> list[dict[str, Any]]:
        """GET /api/v1/holds: the active holds, oldest first."""
        _require_admin(principal, "read legal holds")
        return [hold_to_wire(doc) for doc in await self._find_active()]

    async def release(self, principal: Principal, hold_id: str) -> dict[str, Any]:
        """DELETE /api/v1/holds/{id}: the hold ends now (the document stays, marked released)."""
        _require_admin(principal, "release legal holds")
        doc = None
        if v.OBJECT_ID_RE.match(hold_id):  # anything else cannot exist
            doc = await self._holds.find_one_and_update(
                {"_id": hold_id, "releasedAt": None},
                {"$set": {"releasedAt": utcnow(), "releasedBy": principal.user_id}},
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            raise HoldNotFound(f"id: no active hold {hold_id!r}")
        await self._record(principal, "hold.released", doc)
        return hold_to_wire(doc)

    # ---- what retention asks -------------------------------------------------------------------

    async def held_set(self) -> HeldSet:
        """The active holds, resolved: held users (and their groups now), pm pairs, groups."""
        users: set[str] = set()
        pm_convs: set[str] = set()
        groups: set[str] = set()
        for doc in await self._find_active():
            if doc.get("group") is not None:
                groups.add(doc["group"])
            elif doc.get("peer") is not None:
                pm_convs.add(ConversationRef.pm(doc["user"], doc["peer"]).conv)
            elif doc.get("user") is not None:
                users.add(doc["user"])
        for user in users:
            groups.update(await self._groups.ids_for_user(user))
        return HeldSet(frozenset(users), frozenset(pm_convs), frozenset(groups))

    async def _find_active(self) -> list[dict[str, Any]]:
        # The collection is small (active and released holds of legal matters): read it whole.
        return [doc async for doc in self._holds.find({}).sort("_id", 1) if doc.get("releasedAt") is None]

    async def _require_known_user(self, user: str, field: str) -> None:
        """A user this server knows: seen in a token or declared (`users`), or in a conversation or group."""
        if await self._db.users.find_one({"_id": user}, {"_id": 1}) is not None:
            return
        if await self._conversations.find_recent(user, [], before=None, limit=1):
            return
        if await self._db.cursors.find_one({"user": user}, {"_id": 1}) is not None:
            return
        if await self._groups.ids_for_user(user):
            return
        raise UnknownHoldTarget(f"{field}: no user {user!r} is known to this server")

    async def _record(self, principal: Principal, action: str, doc: Mapping[str, Any]) -> None:
        if self._audit is None:
            return
        channel = "gm" if doc.get("group") else ("pm" if doc.get("peer") else None)
        target = {"holdId": doc["_id"], "channel": channel, **{f: doc.get(f) for f in TARGET_FIELDS}}
        await self._audit.record(principal.user_id, principal.role, action, "rest", target)


def parse_target(data: Mapping[str, Any]) -> dict[str, str]:
    """What a hold covers: {"user"}, {"user", "peer"} or {"group"}; 400 naming the field otherwise."""
    user = v.optional_id(data, "user")
    peer = v.optional_id(data, "peer")
    group = v.optional_id(data, "group")
    if group is not None and (user is not None or peer is not None):
        raise InvalidField("group", "a hold names a group, or a user (with an optional peer), not both")
    if peer is not None and user is None:
        raise InvalidField("peer", "needs user: a conversation is held as user + peer")
    if peer is not None and peer == user:
        raise InvalidField("peer", "must differ from user")
    if group is not None:
        return {"group": group}
    if user is None:
        raise InvalidField("user", "is required: a hold names a user, a user + peer, or a group")
    return {"user": user} if peer is None else {"user": user, "peer": peer}


def _require_admin(principal: Principal, action: str) -> None:
    if principal.role != "admin":
        raise Forbidden(f"only admin tokens may {action}")
