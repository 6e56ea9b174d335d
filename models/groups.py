"""Groups: who is in them, and who may manage them."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from models.clock import iso, utcnow
from models.database import Database
from models.errors import Forbidden, GroupExists, NotAMember, NotFound
from models.principal import Principal


def has_member(user: str) -> dict[str, Any]:
    """Filter for documents whose `members` array holds user.

    Spelled with $in rather than {"members": user}: same meaning in MongoDB, and the embedded
    nx-27017 answers the short form wrongly when `members` is indexed.
    """
    return {"members": {"$in": [user]}}


def group_to_wire(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": doc["_id"],
        "name": doc["name"],
        "groupType": doc["groupType"],
        "members": doc["members"],
        "createdAt": iso(doc["createdAt"]),
        "createdBy": doc["createdBy"],
    }


class GroupStore:
    def __init__(self, db: Database):
        self._groups = db.groups

    async def find(self, group_id: str) -> dict[str, Any] | None:
        return await self._groups.find_one({"_id": group_id})

    async def get(self, group_id: str) -> dict[str, Any]:
        doc = await self.find(group_id)
        if doc is None:
            raise NotFound(f"group {group_id!r} does not exist")
        return doc

    async def get_as_member(self, group_id: str, principal: Principal) -> dict[str, Any]:
        """Fetch a group the caller may see: members, and staff."""
        doc = await self.get(group_id)
        if not principal.is_staff and principal.user_id not in doc["members"]:
            raise NotAMember(f"group: {principal.user_id!r} is not a member of {group_id!r}")
        return doc

    async def create(
        self, *, group_id: str | None, name: str, group_type: int, members: list[str], created_by: str
    ) -> dict[str, Any]:
        doc = {
            "_id": group_id or str(ObjectId()),
            "name": name,
            "groupType": group_type,
            "members": members,
            "createdAt": utcnow(),
            "createdBy": created_by,
            # Bumped by every membership change: adds are conditional on it (see add_new_members).
            "rev": 0,
        }
        try:
            await self._groups.insert_one(doc)
        except DuplicateKeyError:
            raise GroupExists(f"id: group {doc['_id']!r} already exists") from None
        return doc

    async def add_new_members(self, before: dict[str, Any], new: list[str]) -> dict[str, Any] | None:
        """Add members that `before` lacks, if the group is still exactly `before` (same rev).

        Returns the group after, or None when its membership changed meanwhile (re-read and retry).
        The rev guard makes "who is new" and the size limit exact under concurrent changes.
        """
        return await self._groups.find_one_and_update(
            {"_id": before["_id"], "rev": before.get("rev")},  # None matches groups from before revs
            {"$push": {"members": {"$each": new}}, "$inc": {"rev": 1}},
            return_document=ReturnDocument.AFTER,
        )

    async def remove_member(self, group_id: str, member: str) -> tuple[dict[str, Any], bool]:
        """Remove one member; returns the group and whether it was a member."""
        after = await self._groups.find_one_and_update(
            {"$and": [{"_id": group_id}, has_member(member)]},
            {"$pull": {"members": member}, "$inc": {"rev": 1}},
            return_document=ReturnDocument.AFTER,
        )
        if after is not None:
            return after, True
        return await self.get(group_id), False

    async def list_for_user(self, user: str) -> list[dict[str, Any]]:
        return [doc async for doc in self._groups.find(has_member(user)).sort("_id", 1)]

    async def ids_for_user(self, user: str) -> list[str]:
        return [doc["_id"] async for doc in self._groups.find(has_member(user), {"_id": 1})]

    def check_manage(self, group: dict[str, Any], principal: Principal) -> None:
        """Staff manage any group; a doctor manages groups it created or belongs to."""
        if principal.is_staff:
            return
        if principal.role == "doctor" and (
            group["createdBy"] == principal.user_id or principal.user_id in group["members"]
        ):
            return
        raise Forbidden(f"{principal.user_id!r} may not manage group {group['_id']!r}")
