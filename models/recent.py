"""A bounded set of recent ids."""

from __future__ import annotations

from collections import OrderedDict

LOCAL_IDS_KEPT = 100_000


class RecentIds:
    """Ids of messages this process stored recently (bounded)."""

    def __init__(self, size: int = LOCAL_IDS_KEPT):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, message_id: str) -> None:
        self._ids[message_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids
