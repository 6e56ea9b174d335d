"""Who is a doctor: each user id's roles as seen in the tokens it used, or as staff declared them.

Tokens are minted by the platform back end, so a role presented in a valid token is the platform's
word. This process remembers the (user, role) pairs it has seen in a bounded in-memory set and writes
each new pair once to the `users` collection ({_id: user, roles, firstSeenAt}), off the request
path: a request costs a set lookup, never a write. One worker writes new pairs in batches, so a
reconnect storm of thousands of users is a few bulk writes, not thousands of concurrent ones.
Staff may declare a user's role (`declaredRole`), which then wins over what tokens showed — for a
doctor who has not logged in yet, say.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from pymongo import UpdateOne
from pymongo.errors import PyMongoError

from models.clock import iso, utcnow
from models.database import Database
from models.errors import InvalidField
from models.principal import Principal

log = logging.getLogger(__name__)

# (user, role) pairs remembered as written; past this the oldest are forgotten (and, if seen
# again, written again: the upsert is idempotent).
SEEN_PAIRS_MAX = 100_000
WRITE_BATCH_PAIRS = 500
DECLARABLE_ROLES = ("doctor", "patient")


class UserDirectory:
    def __init__(self, db: Database):
        self._users = db.users
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._unwritten: dict[tuple[str, str], None] = {}  # seen, not yet stored (insertion order)
        self._worker: asyncio.Task[None] | None = None

    def note_principal(self, principal: Principal) -> None:
        """Remember the caller's role; the first sighting of a (user, role) pair is stored in the background."""
        pair = (principal.user_id, principal.role)
        if pair in self._seen:
            self._seen.move_to_end(pair)
            return
        self._seen[pair] = None
        if len(self._seen) > SEEN_PAIRS_MAX:
            self._seen.popitem(last=False)
        self._unwritten[pair] = None
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._write_pairs())

    async def _write_pairs(self) -> None:
        # No await between the last check and the end: a pair noted meanwhile is either taken
        # here or starts a new worker.
        while self._unwritten:
            batch = list(self._unwritten)[:WRITE_BATCH_PAIRS]
            for pair in batch:
                del self._unwritten[pair]
            now = utcnow()
            try:
                await self._users.bulk_write(
                    [
                        UpdateOne(
                            {"_id": user},
                            {"$addToSet": {"roles": role}, "$setOnInsert": {"firstSeenAt": now}},
                            upsert=True,
                        )
                        for user, role in batch
                    ],
                    ordered=False,
                )
            except PyMongoError as exc:  # forget them, so that their next request tries again
                log.warning("could not record the roles of %d users: %s", len(batch), exc)
                for pair in batch:
                    self._seen.pop(pair, None)

    async def drain(self) -> None:
        """Wait until every role seen so far is written (tests, shutdown)."""
        while self._worker is not None and not self._worker.done():
            await self._worker

    async def declare_role(self, principal: Principal, user: str, data: dict[str, Any]) -> dict[str, Any]:
        """Staff state a user's role: {"role": "doctor" | "patient"}."""
        principal.require_staff("declare a user's role")
        role = data.get("role")
        if role not in DECLARABLE_ROLES:
            raise InvalidField("role", f"must be one of {', '.join(DECLARABLE_ROLES)}")
        now = utcnow()
        await self._users.update_one(
            {"_id": user},
            {
                "$set": {"declaredRole": role, "declaredBy": principal.user_id, "declaredAt": now},
                "$setOnInsert": {"roles": [], "firstSeenAt": now},
            },
            upsert=True,
        )
        doc = await self._users.find_one({"_id": user})
        assert doc is not None
        return user_to_wire(doc)

    async def find_doctors(self, users: list[str]) -> set[str]:
        """Which of these users are known as doctors (a declaration wins over the tokens seen)."""
        doctors = set()
        declared: dict[str, str] = {}
        async for doc in self._users.find({"_id": {"$in": users}}):
            if doc.get("declaredRole"):
                declared[doc["_id"]] = doc["declaredRole"]
            elif "doctor" in doc.get("roles", []):
                doctors.add(doc["_id"])
        for user in users:  # seen here but perhaps not stored yet
            if user not in declared and (user, "doctor") in self._seen:
                doctors.add(user)
        return doctors | {user for user, role in declared.items() if role == "doctor"}


def user_to_wire(doc: dict[str, Any]) -> dict[str, Any]:
    declared_at = doc.get("declaredAt")
    return {
        "user": doc["_id"],
        "role": doc.get("declaredRole"),
        "seenAs": sorted(doc.get("roles", [])),
        "declaredBy": doc.get("declaredBy"),
        "declaredAt": iso(declared_at) if declared_at else None,
    }
