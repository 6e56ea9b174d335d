"""Admin calls on a user's account (SPEC §17): suspend, reactivate, revoke its tokens."""

from __future__ import annotations

from handlers.base import BaseHandler


class SuspendHandler(BaseHandler):
    async def post(self, user: str) -> None:
        """Suspend `user`: its tokens are refused and its sockets closed (4003) on every process."""
        self.write_json(await self.services.account_admin.suspend(self.authenticate(), user, self.json_body()))


class ReactivateHandler(BaseHandler):
    async def post(self, user: str) -> None:
        """Undo a suspension."""
        self.json_body(optional=True)  # none expected; a malformed one is still a 400
        self.write_json(await self.services.account_admin.reactivate(self.authenticate(), user))


class RevokeTokensHandler(BaseHandler):
    async def post(self, user: str) -> None:
        """Refuse every token of `user` issued until now (401 token_revoked); its sockets close with 4001."""
        self.json_body(optional=True)
        self.write_json(await self.services.account_admin.revoke_tokens(self.authenticate(), user))
