"""What the domain services need from a rate limiter (server/ratelimit.py provides it)."""

from __future__ import annotations

from typing import Protocol


class ActionLimiter(Protocol):
    """Every action that writes a message takes one token of its caller's send budget."""

    def check(self, user_id: str) -> None:
        """Take one token for user_id or raise RateLimited (429)."""
