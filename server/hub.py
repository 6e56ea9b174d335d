"""The connection hub: who is online on which sockets in this process, and fan-out to them."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from models.conversations import ConversationRef
from models.errors import TooManyConnections
from models.validation import has_surrogates

log = logging.getLogger(__name__)


def encode_frame(frame: dict[str, Any]) -> str:
    """Compact JSON, non-ASCII kept as is (Chinese and emoji round-trip byte for byte)."""
    text = json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
    if has_surrogates(text):
        # A lone surrogate (a client's bad clientMsgId echoed in an error frame) has no UTF-8, so
        # the frame could not be sent at all; as a JSON escape it is valid and the client can match it.
        text = json.dumps(frame, ensure_ascii=True, separators=(",", ":"))
    return text


WS_FIN_TEXT = 0x81  # RFC 6455: final fragment, opcode 1 (text)
WS_LEN_16 = 126
WS_LEN_64 = 127


def frame_wire(text: str) -> bytes:
    """A text frame's WebSocket wire form as a server sends it (unmasked, uncompressed): header +
    UTF-8 payload."""
    payload = text.encode("utf-8")  # encode_frame escapes what UTF-8 cannot hold
    size = len(payload)
    if size < WS_LEN_16:
        header = struct.pack("!BB", WS_FIN_TEXT, size)
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", WS_FIN_TEXT, WS_LEN_16, size)
    else:
        header = struct.pack("!BBQ", WS_FIN_TEXT, WS_LEN_64, size)
    return header + payload


class EncodedFrame(str):
    """A text frame that also carries its WebSocket wire form (frame_wire), built once per message
    for every socket of a fan-out: a server's frames are unmasked, so the bytes are the same for
    each uncompressed connection (server/transport.py writes them as they are)."""

    wire: bytes

    def __new__(cls, text: str) -> EncodedFrame:
        frame = super().__new__(cls, text)
        frame.wire = frame_wire(text)
        return frame


class Socket(Protocol):
    """One live connection as the hub sees it: a session of server/session.py."""

    @property
    def user_id(self) -> str: ...

    # The `iat` of the token the connection was opened with (None: none), for revokes (SPEC §17).
    token_issued_at: float | None

    def push_message(self, conversation_key: str, seq: int, frame: str) -> None:
        """Queue a message frame unless this socket already has that seq."""

    def note_delivered(self, conversation_key: str, seq: int) -> None:
        """This socket has the message another way (it sent it and got the ack)."""

    def push_frame(self, frame: str) -> None:
        """Queue any other frame (receipts)."""

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close the connection (1001 at shutdown)."""


class Hub:
    def __init__(self) -> None:
        self._sockets: dict[str, set[Socket]] = {}
        self._socket_count = 0  # kept, not summed: the handshake checks it on every connection
        self._on_first_socket: list[Callable[[str], None]] = []
        self._on_last_socket: list[Callable[[str], None]] = []

    def subscribe(self, on_first_socket: Callable[[str], None], on_last_socket: Callable[[str], None]) -> None:
        """Be told when a user's first socket here opens and when its last one closes (presence)."""
        self._on_first_socket.append(on_first_socket)
        self._on_last_socket.append(on_last_socket)

    def register(self, socket: Socket) -> None:
        sockets = self._sockets.setdefault(socket.user_id, set())
        if socket not in sockets:
            self._socket_count += 1
        sockets.add(socket)
        if len(sockets) == 1:
            for listener in self._on_first_socket:
                listener(socket.user_id)

    def unregister(self, socket: Socket) -> None:
        sockets = self._sockets.get(socket.user_id)
        if sockets is None or socket not in sockets:
            return
        sockets.discard(socket)
        self._socket_count -= 1
        if not sockets:
            del self._sockets[socket.user_id]
            for listener in self._on_last_socket:
                listener(socket.user_id)

    def check_room(self, user_id: str, max_per_user: int, max_total: int) -> None:
        """Raise TooManyConnections when one more socket of user_id would pass either cap."""
        if self.count_sockets(user_id) >= max_per_user:
            raise TooManyConnections(f"too many connections for this user (max {max_per_user})")
        if self._socket_count >= max_total:
            raise TooManyConnections("server connection limit reached")

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

    def publish_message(
        self, ref: ConversationRef, message: dict[str, Any], recipients: list[str], origin: object | None
    ) -> None:
        """Send a stored message to every online socket of its recipients, encoded once (JSON and
        WebSocket framing both: 5,000 members cost 5,000 socket writes and nothing more each)."""
        frame: EncodedFrame | None = None
        seq = message["seq"]
        key = ref.key
        by_user = self._sockets
        for user_id in recipients:
            sockets = by_user.get(user_id)
            if not sockets:
                continue  # offline: no list built for it (most members of a big group)
            for socket in tuple(sockets):  # a copy: a failing write may unregister the socket
                if socket is origin:
                    socket.note_delivered(key, seq)
                    continue
                if frame is None:
                    frame = EncodedFrame(encode_frame({"type": "message", "message": message}))
                try:
                    socket.push_message(key, seq, frame)
                except Exception:  # one broken socket never stops a broadcast
                    log.exception("delivery of %s seq %d to a socket of %s failed", ref.key, seq, user_id)

    def send_receipt(self, ref: ConversationRef, reader: str, seq: int, recipients: list[str]) -> None:
        """Tell the other party (other group members) that reader has read up to seq."""
        receipt: dict[str, Any] = {"type": "receipt", "channel": ref.channel, "user": reader, "seq": seq}
        if ref.channel == "gm":
            receipt["group"] = ref.conv
        self.send_frame(recipients, receipt)

    def send_frame(self, user_ids: Iterable[str], frame: dict[str, Any], exclude: object | None = None) -> None:
        text = encode_frame(frame)
        for user_id in user_ids:
            for socket in self.sockets_of(user_id):
                if socket is exclude:
                    continue
                try:
                    socket.push_frame(text)
                except Exception:
                    log.exception("frame to a socket of %s failed", user_id)
