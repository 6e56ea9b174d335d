"""GET /api/v1/status: running status; connection counts for admins only."""

from __future__ import annotations

import time
from typing import Any

from handlers.base import BaseHandler
from server import __version__
from server.db import is_database_healthy


class StatusHandler(BaseHandler):
    async def get(self) -> None:
        principal = self.optional_principal()
        services = self.services
        status: dict[str, Any] = {
            "version": __version__,
            "profile": services.settings.profile,
            "uptimeSeconds": round(time.monotonic() - services.started_at, 3),
            "db": {"ok": await is_database_healthy(services.db)},
        }
        if principal is not None and principal.role == "admin":
            status["connections"] = {"sockets": services.hub.socket_count, "users": services.hub.user_count}
        self.write_json(status)
