"""Suspension and revocation as every process sees them (SPEC §17).

Each process keeps the whole `accounts` collection that matters (users with a suspension or a
revoke: few) in memory, so `authenticate()` stays synchronous: one dict lookup per request, also
for tokens the verifier had cached. The view is loaded at start-up and kept current through the
database, not a side channel: the process that takes an action applies it at once (and closes its
own sockets), the others learn it from a change stream on `accounts` and close theirs — 4003 for a
suspension, 4001 for revoked tokens. On nx-27017, which answers change-stream polls at once, the
follower paces its polls with fanout.PollPacer (at most ACCOUNTS_QUIET_POLL_MAX_SECS behind when
quiet, in the same wake-ups as the message followers); on MongoDB the server holds the poll open.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

from models.accounts import NO_STATE, AccountState, AccountStore, account_to_wire, parse_reason, state_of
from models.errors import Forbidden
from models.principal import Principal
from server.fanout import QUIET_POLL_MAX_SECS, STOP_TIMEOUT_SECS, PollPacer, follow_collection
from server.hub import Hub, Socket

log = logging.getLogger(__name__)

# When quiet, the follower polls nx-27017 at most this far apart: a change reaches every process
# well within SPEC §17's 2 s, at half the idle cost of the message followers' 0.6 s (and, a
# multiple of their pace, in the same wake-ups).
ACCOUNTS_QUIET_POLL_MAX_SECS = 2 * QUIET_POLL_MAX_SECS
WS_TOKEN_REVOKED = 4001
WS_ACCOUNT_SUSPENDED = 4003


class AuditRecorder(Protocol):
    """models/audit.py AuditLog (SPEC §13)."""

    async def record_for(
        self, principal: Principal, action: str, via: str, target: Mapping[str, Any], outcome: str = "ok"
    ) -> None: ...


class EventSink(Protocol):
    """models/outbox.py: the webhook outbox (SPEC §11)."""

    async def emit(self, type: str, data: dict[str, Any], *, event_id: str | None = None) -> None: ...


class AccountView:
    """The in-memory account states of this process, kept current from the database."""

    def __init__(self, store: AccountStore, hub: Hub):
        self._store = store
        self._hub = hub
        self._states: dict[str, AccountState] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def check(self, user_id: str, issued_at: float | None) -> None:
        """Raise AccountSuspended / TokenRevoked when this user's token issued at issued_at is refused."""
        state = self._states.get(user_id)
        if state is not None:
            state.check(issued_at)

    def apply(self, user_id: str, doc: dict[str, Any] | None) -> None:
        """Take a user's stored state and close the sockets it no longer admits."""
        state = state_of(doc)
        if state == NO_STATE:
            self._states.pop(user_id, None)
        else:
            self._states[user_id] = state
        for socket in self._hub.sockets_of(user_id):
            self.apply_to_socket(socket)

    def apply_to_socket(self, socket: Socket) -> None:
        """Close the socket if its user is suspended (4003) or its token revoked (4001)."""
        state = self._states.get(socket.user_id)
        if state is None:
            return
        if state.suspended:
            socket.close(WS_ACCOUNT_SUSPENDED, "account suspended")
        elif not state.is_valid_issue(socket.token_issued_at):
            socket.close(WS_TOKEN_REVOKED, "token revoked")

    async def load(self) -> None:
        """Read every restricted account (start-up, and after the follower lost its place)."""
        docs = [doc async for doc in self._store.find_restricted()]
        self._states = {}
        for doc in docs:
            self.apply(doc["_id"], doc)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # Bounded: a cancellation lost in the driver (see server/fanout.py) ends the loop only
            # at its next look at _stopping, after its back-off.
            await asyncio.wait([self._task], timeout=STOP_TIMEOUT_SECS)

    async def _follow(self) -> None:
        """Follow `accounts` forever; the first stream's opening loads every account."""
        await follow_collection(
            self._store.collection,
            self._on_change,
            stopping=lambda: self._stopping,
            pacer=PollPacer(max_secs=ACCOUNTS_QUIET_POLL_MAX_SECS),
            on_open=self.load,
        )

    async def _on_change(self, change: dict[str, Any]) -> None:
        user_id = (change.get("documentKey") or {}).get("_id")
        if isinstance(user_id, str):
            self.apply(user_id, await self._store.find(user_id))


class AccountAdmin:
    """The admin calls: suspend, reactivate, revoke-tokens (stored journaled, then applied here)."""

    def __init__(
        self,
        store: AccountStore,
        view: AccountView,
        audit: AuditRecorder | None = None,
        events: EventSink | None = None,
    ):
        self._store = store
        self._view = view
        self._audit = audit
        self._events = events

    async def suspend(self, principal: Principal, user: str, data: dict[str, Any]) -> dict[str, Any]:
        _require_admin(principal, "suspend users")
        doc = await self._store.suspend(user, principal.user_id, parse_reason(data))
        return await self._done("user.suspended", user, principal, doc)

    async def reactivate(self, principal: Principal, user: str) -> dict[str, Any]:
        _require_admin(principal, "reactivate users")
        doc = await self._store.reactivate(user, principal.user_id)
        return await self._done("user.reactivated", user, principal, doc)

    async def revoke_tokens(self, principal: Principal, user: str) -> dict[str, Any]:
        """Refuse every token of `user` minted up to the end of this second (models/accounts.py).

        Answers once that second is over, so that a token minted after the answer works.
        """
        _require_admin(principal, "revoke tokens")
        valid_from = math.floor(time.time()) + 1
        doc = await self._store.revoke_tokens(user, principal.user_id, valid_from)
        wire = await self._done("user.tokens_revoked", user, principal, doc)
        await asyncio.sleep(max(0.0, valid_from - time.time()))
        return wire

    async def _done(self, kind: str, user: str, principal: Principal, doc: dict[str, Any]) -> dict[str, Any]:
        self._view.apply(user, doc)  # this process at once; the others through the change stream
        log.info("%s: %s by %s", kind, user, principal.user_id)
        # Both stored (journaled) before the call answers; the receiver is never waited on.
        if self._audit is not None:
            await self._audit.record_for(principal, kind, "rest", {"user": user})
        if self._events is not None:
            await self._events.emit(kind, {"user": user, "by": principal.user_id})
        return account_to_wire(doc)


def _require_admin(principal: Principal, action: str) -> None:
    if principal.role != "admin":
        raise Forbidden(f"only admin tokens may {action}")
