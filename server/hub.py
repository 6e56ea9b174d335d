"""The connection hub: who is online on which sockets in this process, and fan-out to them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from models.conversations import ConversationRef

log = logging.getLogger(__name__)


def encode_frame(frame: dict[str, Any]) -> str:
    """Compact JSON, non-ASCII kept as is (Chinese and emoji round-trip byte for byte)."""
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


class Socket(Protocol):
    @property
    def user_id(self) -> str: ...

    def push_message(self, conversation_key: str, seq: int, frame: str) -> None:
        """Queue a message frame unless this socket already has that seq."""

    def note_delivered(self, conversation_key: str, seq: int) -> None:
        """This socket has the message another way (it sent it and got the ack)."""

    def push_frame(self, frame: str) -> None:
        """Queue any other frame (receipts)."""


class Hub:
    def __init__(self, on_first_socket: Callable[[str], None] | None = None,
                 on_last_socket: Callable[[str], None] | None = None):
        self._sockets: dict[str, set[Socket]] = {}
        self._socket_count = 0  # kept, not summed: the handshake checks it on every connection
        self._on_first_socket = on_first_socket
        self._on_last_socket = on_last_socket

    def register(self, socket: Socket) -> None:
        sockets = self._sockets.setdefault(socket.user_id, set())
        if socket not in sockets:
            self._socket_count += 1
        sockets.add(socket)
        if len(sockets) == 1 and self._on_first_socket:
            self._on_first_socket(socket.user_id)

    def unregister(self, socket: Socket) -> None:
        sockets = self._sockets.get(socket.user_id)
        if sockets is None or socket not in sockets:
            return
        sockets.discard(socket)
        self._socket_count -= 1
        if not sockets:
            del self._sockets[socket.user_id]
            if self._on_last_socket:
                self._on_last_socket(socket.user_id)

    def sockets_of(self, user_id: str) -> list[Socket]:
        return list(self._sockets.get(user_id, ()))

    def is_online(self, user_id: str) -> bool:
        return user_id in self._sockets

    def count_sockets(self, user_id: str) -> int:
        return len(self._sockets.get(user_id, ()))

    @property
    def socket_count(self) -> int:
        return self._socket_count

    @property
    def user_count(self) -> int:
        return len(self._sockets)

    def all_sockets(self) -> list[Socket]:
        return [s for sockets in self._sockets.values() for s in sockets]

    def publish_message(self, ref: ConversationRef, message: dict[str, Any],
                        recipients: list[str], origin: object | None) -> None:
        """Send a stored message to every online socket of its recipients, encoded once."""
        frame: str | None = None
        seq = message["seq"]
        for user_id in recipients:
            for socket in self.sockets_of(user_id):
                if socket is origin:
                    socket.note_delivered(ref.key, seq)
                    continue
                if frame is None:
                    frame = encode_frame({"type": "message", "message": message})
                try:
                    socket.push_message(ref.key, seq, frame)
                except Exception:  # one broken socket never stops a broadcast
                    log.exception("delivery of %s seq %d to a socket of %s failed", ref.key, seq, user_id)

    def send_receipt(self, ref: ConversationRef, reader: str, seq: int, recipients: list[str]) -> None:
        """Tell the other party (other group members) that reader has read up to seq."""
        receipt: dict[str, Any] = {"type": "receipt", "channel": ref.channel, "user": reader, "seq": seq}
        if ref.channel == "gm":
            receipt["group"] = ref.conv
        self.send_frame(recipients, receipt)

    def send_frame(self, user_ids: Iterable[str], frame: dict[str, Any],
                   exclude: object | None = None) -> None:
        text = encode_frame(frame)
        for user_id in user_ids:
            for socket in self.sockets_of(user_id):
                if socket is exclude:
                    continue
                try:
                    socket.push_frame(text)
                except Exception:
                    log.exception("frame to a socket of %s failed", user_id)
