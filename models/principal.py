"""The caller's identity as the domain sees it: a user id and a role from a verified token."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from models.errors import Forbidden, InvalidField
from models.validation import check_id

ROLES = ("doctor", "patient", "service", "admin")
STAFF_ROLES = frozenset({"service", "admin"})


@dataclasses.dataclass(frozen=True, slots=True)  # one per open socket: no instance dict
class Principal:
    """Who is calling: the token's subject and role."""

    user_id: str
    role: str

    @property
    def is_staff(self) -> bool:
        """service (the platform back end acting for users) and admin (operations)."""
        return self.role in STAFF_ROLES

    def require_staff(self, action: str) -> None:
        if not self.is_staff:
            raise Forbidden(f"only service or admin tokens may {action}")

    def require_self_or_staff(self, user_id: str, field: str) -> None:
        """A doctor or patient acts only as itself; staff may act for anyone."""
        if not self.is_staff and user_id != self.user_id:
            raise Forbidden(f"{field} must be the token's own user")


def require_own_user(principal: Principal, query: Mapping[str, object], field: str = "user_id") -> str:
    """The user a read is about (query[field]): required, a valid id, and the caller itself unless
    the caller is staff (a doctor or patient reads only its own conversations, consultations, groups)."""
    if field not in query:
        raise InvalidField(field, "is required")
    user = check_id(query[field], field)
    principal.require_self_or_staff(user, field)
    return user
