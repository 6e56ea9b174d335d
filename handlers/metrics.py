"""GET /metrics: the Prometheus text exposition (SPEC §17); open in dev/test, admin token in prod."""

from __future__ import annotations

from handlers.base import BaseHandler
from models.errors import Forbidden, NotFound
from server.metrics import CONTENT_TYPE


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        """Every instrument of this process, the webhook outbox counted now."""
        services = self.services
        settings = services.settings.metrics
        if not settings.enabled:
            raise NotFound("metrics are disabled ([metrics] enabled = false)")
        if not settings.public and self.authenticate().role != "admin":
            raise Forbidden("only admin tokens may read /metrics")
        body = await services.metrics.exposition(services.db)
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(body)
