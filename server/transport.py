"""The wire side of a live connection: frames onto a Tornado WebSocket, and nothing about what they mean.

A session (server/session.py) decides what a connection is sent; this writes it. Fan-out frames
(server/hub.py's EncodedFrame) go to the kernel as ready bytes; a peer that stops reading is cut
off (1008) once its unsent output passes MAX_PENDING_WRITE_BYTES instead of being buffered forever.
"""

from __future__ import annotations

import asyncio
import logging

import tornado.websocket
from tornado.iostream import IOStream, SSLIOStream, StreamBufferFullError, StreamClosedError

log = logging.getLogger(__name__)

# A socket whose unsent output grows past this is too slow to keep: it is closed, not buffered forever.
MAX_PENDING_WRITE_BYTES = 4 * 1024 * 1024
WS_POLICY_VIOLATION = 1008


class WebSocketTransport:
    """write / flush / closed / close over one upgraded WebSocketHandler."""

    def __init__(self, handler: tornado.websocket.WebSocketHandler, user_id: str) -> None:
        self._handler = handler
        self._user_id = user_id  # for the slow-socket log line
        stream = getattr(handler.ws_connection, "stream", None)
        if stream is not None:
            stream.max_write_buffer_size = MAX_PENDING_WRITE_BYTES

    @property
    def closed(self) -> bool:
        connection = self._handler.ws_connection
        return connection is None or connection.is_closing()

    def write(self, frame: str) -> None:
        """Queue one text frame; a closed socket drops it, a slow one is closed (1008)."""
        connection = self._handler.ws_connection
        if connection is None or connection.is_closing():
            return
        try:
            wire = getattr(frame, "wire", None)  # an EncodedFrame of a fan-out (server/hub.py)
            stream = getattr(connection, "stream", None)
            if wire is not None and stream is not None and not getattr(connection, "_compressor", None):
                # The frame bytes as built once for every socket: no per-socket UTF-8 encoding,
                # framing or task (write_message costs each of them; 5,000 members show it).
                _write_wire(stream, wire)
            else:
                self._handler.write_message(frame).add_done_callback(_consume_write_outcome)
        except (tornado.websocket.WebSocketClosedError, StreamClosedError):
            pass
        except StreamBufferFullError:
            log.warning("closing a slow socket of %s: over %d bytes unsent", self._user_id, MAX_PENDING_WRITE_BYTES)
            self.close(WS_POLICY_VIOLATION, "too slow")

    async def flush(self) -> None:
        """Let the kernel take what is queued (back-pressure while sending a long backlog)."""
        stream = getattr(self._handler.ws_connection, "stream", None)
        if stream is not None:
            await stream.write(b"")

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self._handler.close(code, reason)


def _write_wire(stream: IOStream, wire: bytes) -> None:
    """Hand ready frame bytes to the kernel; what it does not take at once, IOStream queues.

    While nothing is queued, one send() (what IOStream would do after its buffer bookkeeping
    and a Future per write) keeps a plain socket's bytes in order. TLS streams, and any stream
    with bytes waiting, always go through IOStream.
    """
    sent = 0
    if (
        isinstance(stream, IOStream)
        and not isinstance(stream, SSLIOStream)
        and not stream.writing()
        and not stream.closed()
    ):
        try:
            sent = stream.socket.send(wire)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # reset or closed: IOStream's own write below notices and closes the stream
    if sent < len(wire):
        stream.write(wire[sent:] if sent else wire).add_done_callback(_consume_write_outcome)


def _consume_write_outcome(future: asyncio.Future[None]) -> None:
    """A write to a socket that has since closed fails; that is expected, not an error to log."""
    if not future.cancelled():
        future.exception()
