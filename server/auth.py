"""JWT verification shared by REST and WebSocket, and the roles that decide who may do what."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

import jwt

from models.errors import Unauthenticated
from models.principal import ROLES, Principal
from models.validation import is_valid_id

ALGORITHM = "HS256"
DEFAULT_TTL_SECS = 24 * 3600
DEFAULT_MAX_TTL_SECS = 7 * 24 * 3600  # SPEC §3: max_token_ttl_secs
TOKEN_CACHE_ENTRIES = 50_000


class TokenLifetimeTooLong(Unauthenticated):
    """A token minted to live longer than max_token_ttl_secs (a leaked one would stay usable)."""

    code = "token_lifetime_too_long"


class AccountCheck(Protocol):
    """server/accounts.py AccountView: suspended users and revoked tokens (SPEC §17)."""

    def check(self, user_id: str, issued_at: float | None) -> None: ...


def _decode(token: str | None, secret: str, max_ttl_secs: float) -> tuple[Principal, float, float | None]:
    """Decode and check a JWT: (principal, expiry, iat or None); Unauthenticated for anything not usable."""
    if not token:
        raise Unauthenticated("missing token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],  # pinned: never accept "none" or an algorithm the token picks
            options={"require": ["sub", "role", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired") from None
    except jwt.InvalidTokenError:
        raise Unauthenticated("invalid token") from None
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not is_valid_id(sub):
        raise Unauthenticated("invalid token: bad sub")
    if role not in ROLES:
        raise Unauthenticated("invalid token: bad role")
    expires_at = float(claims["exp"])
    # PyJWT has checked that iat, when present, is a number and not in the future.
    claimed_iat = float(claims["iat"]) if "iat" in claims else None
    issued_at = claimed_iat if claimed_iat is not None else time.time()
    if expires_at - issued_at > max_ttl_secs:
        raise TokenLifetimeTooLong(f"token lifetime over the {max_ttl_secs:.0f}s maximum (exp - iat)")
    return Principal(user_id=sub, role=str(role)), expires_at, claimed_iat


class TokenVerifier:
    """JWT verification with a bounded cache of tokens already verified (then only expiry is checked).

    Doctors' consoles send the same token with every request; checking its signature once per
    token instead of once per request takes PyJWT off the hot path. The lifetime cap stays right
    for cached tokens: exp - iat never changes, and without iat exp - now only shrinks, so a token
    accepted once stays within the cap; refusals are never cached.

    The cache never lets a suspended user's or a revoked token through: the account check
    (an in-memory lookup kept current from the database, server/accounts.py) runs on every call,
    on cache hits too; only the signature and lifetime checks are cached.
    """

    def __init__(
        self,
        secret: str,
        max_entries: int = TOKEN_CACHE_ENTRIES,
        max_ttl_secs: float = DEFAULT_MAX_TTL_SECS,
        accounts: AccountCheck | None = None,
    ):
        self._secret = secret
        self._max_ttl_secs = max_ttl_secs
        self._max_entries = max_entries
        self._accounts = accounts
        self._verified: OrderedDict[str, tuple[Principal, float, float | None]] = OrderedDict()

    def verify(self, token: str | None) -> Principal:
        return self.verify_issued(token)[0]

    def verify_issued(self, token: str | None) -> tuple[Principal, float | None]:
        """The caller and its token's iat (None without one); Unauthenticated (or a subclass) if refused."""
        hit = self._verified.get(token) if token is not None else None
        if hit is not None and time.time() >= hit[1]:
            assert token is not None
            del self._verified[token]
            hit = None
        if hit is None:
            hit = _decode(token, self._secret, self._max_ttl_secs)
            assert token is not None
            self._verified[token] = hit
            if len(self._verified) > self._max_entries:
                self._verified.popitem(last=False)
        principal, _expires_at, issued_at = hit
        if self._accounts is not None:
            self._accounts.check(principal.user_id, issued_at)
        return principal, issued_at


def mint_token(secret: str, sub: str, role: str, ttl_secs: int = DEFAULT_TTL_SECS) -> str:
    """Sign a token (the platform back end does this in production; tests and the CLI here)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not is_valid_id(sub):
        raise ValueError("sub must be a 1-128 character id not starting with '$'")
    now = int(time.time())
    return jwt.encode({"sub": sub, "role": role, "iat": now, "exp": now + ttl_secs}, secret, ALGORITHM)
