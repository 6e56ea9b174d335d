"""Account state set by operations (SPEC §17): suspended users and revoked tokens.

Collection `accounts` ({_id: user, suspended, reason, suspendedAt, suspendedBy, reactivatedAt,
reactivatedBy, tokensValidFrom, revokedAt, revokedBy, updatedAt}), kept apart from `users`
(models/directory.py: roles seen in tokens) so that every process can load the whole of it at
start-up cheaply: it holds only the users operations acted on.

The revoke rule, in whole seconds because `iat` is whole seconds: a revoke at time t stores
`tokensValidFrom` = floor(t) + 1. A token is refused when it has no `iat` or `iat` <
tokensValidFrom, i.e. every token minted in the revoke's second or earlier, including one minted
in the same second just before the revoke. The revoke call answers only once that second is
over (server/accounts.py), so every token minted after the answer carries an `iat` >=
tokensValidFrom and works. The minting clock (the platform back end) is assumed to be within a
second of ours, as JWT `iat` checks already assume.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pymongo import ReturnDocument, WriteConcern

from models.clock import iso, utcnow
from models.database import Database
from models.errors import InvalidField, Unauthenticated

MAX_REASON_CHARS = 1000


class AccountSuspended(Unauthenticated):
    """The token's user is suspended by operations (SPEC §17)."""

    code = "account_suspended"


class TokenRevoked(Unauthenticated):
    """The token was issued before its user's tokens were revoked, or carries no `iat` (SPEC §17)."""

    code = "token_revoked"


@dataclasses.dataclass(frozen=True)
class AccountState:
    """What decides whether a user's token is accepted."""

    suspended: bool = False
    tokens_valid_from: int | None = None  # unix seconds; tokens with iat below it are revoked

    def check(self, issued_at: float | None) -> None:
        """Raise AccountSuspended / TokenRevoked for a token of this user issued at `issued_at`."""
        if self.suspended:
            raise AccountSuspended("account suspended")
        if self.tokens_valid_from is not None and not self.is_valid_issue(issued_at):
            raise TokenRevoked("token revoked: issued before this user's tokens were revoked; get a new one")

    def is_valid_issue(self, issued_at: float | None) -> bool:
        """False for a token issued (or without iat) before the last revoke."""
        return self.tokens_valid_from is None or (issued_at is not None and issued_at >= self.tokens_valid_from)


NO_STATE = AccountState()


def state_of(doc: Mapping[str, Any] | None) -> AccountState:
    if not doc:
        return NO_STATE
    valid_from = doc.get("tokensValidFrom")
    return AccountState(bool(doc.get("suspended")), int(valid_from) if valid_from is not None else None)


def parse_reason(data: Mapping[str, Any]) -> str:
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidField("reason", "is required: a non-empty string")
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidField("reason", f"at most {MAX_REASON_CHARS} characters")
    return reason


class AccountStore:
    """Journaled writes of suspensions and revokes (stored before the call reports them done)."""

    def __init__(self, db: Database, write_concern: WriteConcern):
        self.collection = db.get_collection("accounts", write_concern=write_concern)

    async def suspend(self, user: str, by: str, reason: str) -> dict[str, Any]:
        now = utcnow()
        return await self._update(
            user,
            {"suspended": True, "reason": reason, "suspendedAt": now, "suspendedBy": by, "updatedAt": now},
        )

    async def reactivate(self, user: str, by: str) -> dict[str, Any]:
        now = utcnow()
        return await self._update(
            user, {"suspended": False, "reactivatedAt": now, "reactivatedBy": by, "updatedAt": now}
        )

    async def revoke_tokens(self, user: str, by: str, valid_from: int) -> dict[str, Any]:
        now = utcnow()
        return await self._update(
            user, {"revokedAt": now, "revokedBy": by, "updatedAt": now}, {"$max": {"tokensValidFrom": valid_from}}
        )

    async def _update(self, user: str, fields: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        doc = await self.collection.find_one_and_update(
            {"_id": user},
            {"$set": fields, **(extra or {})},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None
        return doc

    async def find(self, user: str) -> dict[str, Any] | None:
        return await self.collection.find_one({"_id": user})

    async def find_restricted(self) -> AsyncIterator[dict[str, Any]]:
        """Every account that refuses some token (loaded by each process at start-up)."""
        query = {"$or": [{"suspended": True}, {"tokensValidFrom": {"$ne": None}}]}
        async for doc in self.collection.find(query):
            yield doc


def account_to_wire(doc: Mapping[str, Any]) -> dict[str, Any]:
    def when(name: str) -> str | None:
        value = doc.get(name)
        return iso(value) if isinstance(value, datetime.datetime) else None

    valid_from = doc.get("tokensValidFrom")
    return {
        "user": doc["_id"],
        "suspended": bool(doc.get("suspended")),
        "reason": doc.get("reason") if doc.get("suspended") else None,
        "suspendedAt": when("suspendedAt") if doc.get("suspended") else None,
        "suspendedBy": doc.get("suspendedBy") if doc.get("suspended") else None,
        "tokensValidFrom": (
            iso(datetime.datetime.fromtimestamp(valid_from, datetime.UTC)) if valid_from is not None else None
        ),
        "revokedAt": when("revokedAt"),
        "revokedBy": doc.get("revokedBy"),
    }
