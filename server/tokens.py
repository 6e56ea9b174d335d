"""Mint a development token: python -m server.tokens --sub Rose --role doctor"""

from __future__ import annotations

import argparse
import sys

from models.principal import ROLES
from server.auth import DEFAULT_TTL_SECS, mint_token
from server.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.tokens",
        description="Print a JWT signed with the current profile's secret (IM_PROFILE, IM_AUTH_SECRET).",
    )
    parser.add_argument("--sub", required=True, help="user id")
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL_SECS,
        help="lifetime in seconds (at most the profile's max_token_ttl_secs)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if not 0 < args.ttl <= settings.max_token_ttl_secs:
            raise ValueError(
                f"--ttl must be 1-{settings.max_token_ttl_secs} seconds "
                "(max_token_ttl_secs): the server refuses longer-lived tokens"
            )
        print(mint_token(settings.auth_secret, args.sub, args.role, args.ttl))  # sets iat
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
