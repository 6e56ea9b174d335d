"""In-order delivery per socket: every conversation's messages leave in seq order, once.

With one process, messages reach a socket in seq order by construction (sends are serialised per
conversation). With several processes, a message stored elsewhere arrives through the change stream
a little later than a newer one stored here could be published; so a socket may see seq 7 before
seq 6. Releasing 7 at once and dropping 6 as "already past" would lose 6 (the client marks 7 as
received). Instead a frame that skips ahead is held until the missing seq arrives, and if it does
not arrive within GAP_REPAIR_SECS the missing messages are read from the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

GAP_REPAIR_SECS = 0.5

FetchMissing = Callable[[str, int, int], Awaitable[list[tuple[int, str]]]]


class InOrderDelivery:
    __slots__ = ("_send", "_fetch_missing", "_gap_repair_secs", "_sent", "_pending", "_repairs")  # one per socket

    def __init__(
        self, send: Callable[[str], None], fetch_missing: FetchMissing, gap_repair_secs: float = GAP_REPAIR_SECS
    ):
        self._send = send
        self._fetch_missing = fetch_missing
        self._gap_repair_secs = gap_repair_secs
        self._sent: dict[str, int] = {}
        # Frames held behind a gap; None marks a seq the socket has another way (its own ack).
        self._pending: dict[str, dict[int, str | None]] = {}
        self._repairs: dict[str, asyncio.TimerHandle] = {}

    def set_baseline(self, key: str, seq: int) -> None:
        """The socket's user already has everything in this conversation up to seq."""
        if seq > self._sent.get(key, 0):
            self._sent[key] = seq

    def offer(self, key: str, seq: int, frame: str | None) -> bool:
        """Send now if next in line, hold if ahead, drop if already sent. True when sent now."""
        last = self._sent.get(key)
        if last is None and not key.startswith("gm:"):
            # Every pm/sm conversation the user had at connect time has a baseline, so this one
            # began since: the user is in it from seq 1.
            last = 0
        if last is not None and seq <= last:
            return False
        # A group new to this socket (joined since connect) starts at its first message.
        if last is None or seq == last + 1:
            self._release(key, seq, frame)
            return True
        self._pending.setdefault(key, {})[seq] = frame
        if key not in self._repairs:
            loop = asyncio.get_running_loop()
            self._repairs[key] = loop.call_later(self._gap_repair_secs, self._start_repair, key)
        return False

    def note_delivered(self, key: str, seq: int) -> None:
        """The socket has this message already (it sent it): advance without sending it again."""
        self.offer(key, seq, None)

    def close(self) -> None:
        for handle in self._repairs.values():
            handle.cancel()
        self._repairs.clear()
        self._pending.clear()

    def _release(self, key: str, seq: int, frame: str | None) -> None:
        if frame is not None:
            self._send(frame)
        self._sent[key] = seq
        pending = self._pending.get(key)
        while pending and seq + 1 in pending:
            seq += 1
            held = pending.pop(seq)
            if held is not None:
                self._send(held)
            self._sent[key] = seq
        if pending is not None and not pending:
            del self._pending[key]
            handle = self._repairs.pop(key, None)
            if handle is not None:
                handle.cancel()

    def _start_repair(self, key: str) -> None:
        asyncio.get_running_loop().create_task(self._repair(key))

    async def _repair(self, key: str) -> None:
        self._repairs.pop(key, None)
        pending = self._pending.get(key)
        if not pending:
            return
        after, first_held = self._sent.get(key, 0), min(pending)
        try:
            missing = await self._fetch_missing(key, after, first_held)
        except Exception as exc:  # the database is away: release what we hold rather than stall
            log.warning("gap repair of %s (%d..%d) failed: %s", key, after, first_held, exc)
            missing = []
        for seq, frame in missing:
            self.offer(key, seq, frame)
        pending = self._pending.get(key)
        if pending and min(pending) > self._sent.get(key, 0) + 1:
            # What is still missing is not this user's to see (e.g. before it joined a group).
            first_held = min(pending)
            self._release(key, first_held, pending.pop(first_held))
            if self._pending.get(key) and key not in self._repairs:
                self._repairs[key] = asyncio.get_running_loop().call_later(
                    self._gap_repair_secs, self._start_repair, key
                )
