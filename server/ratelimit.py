"""Per-user send rate: a token bucket in memory, shared by REST and WebSocket sends and by every
action that posts an event message (consultation start/end, group create, members add/remove)."""

from __future__ import annotations

import time
from collections.abc import Callable

from models.errors import RateLimited

IDLE_BUCKETS_SWEEP = 10_000


class SendRateLimiter:
    def __init__(self, rate_per_sec: float, burst: int, on_refused: Callable[[], None] | None = None):
        self._on_refused = on_refused  # metrics: im_rate_limit_refusals_total
        self.rate_per_sec = rate_per_sec
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, last refill time)

    def check(self, user_id: str) -> None:
        """Take one token for user_id or raise RateLimited."""
        now = time.monotonic()
        tokens, last = self._buckets.get(user_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_sec)
        if tokens < 1.0:
            self._buckets[user_id] = (tokens, now)
            if self._on_refused is not None:
                self._on_refused()
            raise RateLimited(
                f"too many messages (event messages of groups and consultations count too): "
                f"at most {self.rate_per_sec:g} per second"
            )
        self._buckets[user_id] = (tokens - 1.0, now)
        if len(self._buckets) > IDLE_BUCKETS_SWEEP:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget buckets that have refilled completely; they carry no state."""
        full_after = self.burst / self.rate_per_sec if self.rate_per_sec > 0 else float("inf")
        self._buckets = {u: b for u, b in self._buckets.items() if now - b[1] < full_after}
