"""Per-key asyncio locks that exist only while someone holds or waits for them."""

from __future__ import annotations

import asyncio
from types import TracebackType


class KeyedLocks:
    """Serialise work per key (a conversation, a group) in this process; a key's lock is dropped when
    nobody waits, so millions of conversations leave no locks behind.

    `async with locks.hold(key):` — taken on every send, so a plain class, not an
    asynccontextmanager (whose generator costs several times as much per use).
    """

    def __init__(self) -> None:
        self._held: dict[str, _KeyLock] = {}

    def hold(self, key: str) -> _KeyLock:
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _KeyLock(self._held, key)
        return held

    def __len__(self) -> int:
        """Keys held or waited for now."""
        return len(self._held)


class _KeyLock:
    __slots__ = ("_table", "_key", "_lock", "_users")

    def __init__(self, table: dict[str, _KeyLock], key: str) -> None:
        self._table, self._key = table, key
        self._lock = asyncio.Lock()
        self._users = 0  # holding or waiting; `async with` enters right after hold(), no await between

    async def __aenter__(self) -> None:
        self._users += 1
        try:
            await self._lock.acquire()
        except BaseException:  # cancelled while waiting
            self._leave()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        self._users -= 1
        if not self._users:
            del self._table[self._key]
