"""JWT verification shared by REST and WebSocket, and the roles that decide who may do what."""

from __future__ import annotations

import time
from collections import OrderedDict

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


def _decode(token: str | None, secret: str, max_ttl_secs: float) -> tuple[Principal, float]:
    """Decode and check a JWT: (principal, expiry); Unauthenticated for anything not usable."""
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
    issued_at = float(claims["iat"]) if "iat" in claims else time.time()
    if expires_at - issued_at > max_ttl_secs:
        raise TokenLifetimeTooLong(f"token lifetime over the {max_ttl_secs:.0f}s maximum (exp - iat)")
    return Principal(user_id=sub, role=str(role)), expires_at


class TokenVerifier:
    """JWT verification with a bounded cache of tokens already verified (then only expiry is checked).

    Doctors' consoles send the same token with every request; checking its signature once per
    token instead of once per request takes PyJWT off the hot path. The lifetime cap stays right
    for cached tokens: exp - iat never changes, and without iat exp - now only shrinks, so a token
    accepted once stays within the cap; refusals are never cached.
    """

    def __init__(self, secret: str, max_entries: int = TOKEN_CACHE_ENTRIES, max_ttl_secs: float = DEFAULT_MAX_TTL_SECS):
        self._secret = secret
        self._max_ttl_secs = max_ttl_secs
        self._max_entries = max_entries
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def verify(self, token: str | None) -> Principal:
        if token is not None and (hit := self._verified.get(token)) is not None:
            principal, expires_at = hit
            if time.time() < expires_at:
                return principal
            del self._verified[token]
        principal, expires_at = _decode(token, self._secret, self._max_ttl_secs)
        assert token is not None
        self._verified[token] = (principal, expires_at)
        if len(self._verified) > self._max_entries:
            self._verified.popitem(last=False)
        return principal


def mint_token(secret: str, sub: str, role: str, ttl_secs: int = DEFAULT_TTL_SECS) -> str:
    """Sign a token (the platform back end does this in production; tests and the CLI here)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not is_valid_id(sub):
        raise ValueError("sub must be a 1-128 character id not starting with '$'")
    now = int(time.time())
    return jwt.encode({"sub": sub, "role": role, "iat": now, "exp": now + ttl_secs}, secret, ALGORITHM)
