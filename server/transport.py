"""The wire side of a live connection: frames onto a Tornado WebSocket, and nothing about what they mean.

A session (server/session.py) decides what a connection is sent; this writes it. Fan-out frames
(server/hub.py's EncodedFrame) go to the kernel as ready bytes; a peer that stops reading is cut
off (1008) once its unsent output passes MAX_PENDING_WRITE_BYTES instead of being buffered forever.
Heartbeat pings every socket from one timer and closes those that answer no ping (SPEC §7).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import weakref
from collections.abc import Sequence

import tornado.websocket
from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream, SSLIOStream, StreamBufferFullError, StreamClosedError

from server.hub import frame_wire

log = logging.getLogger(__name__)

# A socket whose unsent output grows past this is too slow to keep: it is closed, not buffered forever.
MAX_PENDING_WRITE_BYTES = 4 * 1024 * 1024
WS_POLICY_VIOLATION = 1008
# How often Heartbeat looks for sockets due a ping or overdue a pong: a quarter of the shorter
# interval, within these bounds (20 s / 15 s in the profiles: every second).
MIN_TICK_SECS = 0.05
MAX_TICK_SECS = 1.0


class WebSocketTransport:
    """write / flush / closed / close over one upgraded WebSocketHandler."""

    # One per socket: 10,000 idle sockets show every dict. Weakly referable for Heartbeat.
    __slots__ = ("_handler", "_user_id", "awaiting_pong", "__weakref__")

    def __init__(self, handler: tornado.websocket.WebSocketHandler, user_id: str) -> None:
        self._handler = handler
        self._user_id = user_id  # for the slow-socket log line
        self.awaiting_pong = False  # a ping is out and no pong has come back yet (Heartbeat)
        stream = getattr(handler.ws_connection, "stream", None)
        if stream is not None:
            stream.max_write_buffer_size = MAX_PENDING_WRITE_BYTES

    @property
    def closed(self) -> bool:
        connection = self._handler.ws_connection
        return connection is None or connection.is_closing()

    def write(self, frame: str) -> None:
        """Queue one text frame; a closed socket drops it, a slow one is closed (1008)."""
        self.write_many((frame,))

    def write_many(self, frames: Sequence[str]) -> None:
        """Queue text frames in order, uncompressed ones as one write (a backlog page: one send()
        instead of one per frame); a closed socket drops them, a slow one is closed (1008)."""
        connection = self._handler.ws_connection
        if connection is None or connection.is_closing():
            return
        try:
            stream = getattr(connection, "stream", None)
            if stream is not None and not getattr(connection, "_compressor", None):
                # Ready frame bytes (an EncodedFrame's are built once for every socket of a
                # fan-out): no per-socket framing, Future or task (write_message costs each of them).
                wire = [getattr(frame, "wire", None) or frame_wire(frame) for frame in frames]
                _write_wire(stream, wire[0] if len(wire) == 1 else b"".join(wire))
            else:
                for frame in frames:
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

    def ping(self) -> None:
        """Send a ping frame; the pong is noted by note_pong."""
        self.awaiting_pong = True
        with contextlib.suppress(tornado.websocket.WebSocketClosedError, StreamClosedError):
            self._handler.ping(b"")

    def note_pong(self) -> None:
        self.awaiting_pong = False


class Heartbeat:
    """Pings every open socket every interval_secs and closes one that has not answered within
    timeout_secs, as Tornado's websocket_ping_interval does, but from one timer for all sockets:
    Tornado's costs a task, a coroutine, a future and a timer per socket (~1.3 KiB of each idle
    socket's memory). Both intervals are the same for every socket, so two FIFO queues ordered by
    due time hold the schedule, and a tick costs only the sockets that are due. (With a ping
    interval shorter than the timeout, a ping may leave up to their difference late.)
    """

    def __init__(self, interval_secs: float, timeout_secs: float) -> None:
        self._interval_secs = interval_secs
        self._timeout_secs = timeout_secs
        # (due time, socket): the next ping / the deadline of the pong to the last one. Weak: a
        # closed socket is freed at once, and dropped here when its turn comes.
        self._pings: collections.deque[tuple[float, weakref.ref[WebSocketTransport]]] = collections.deque()
        self._pongs: collections.deque[tuple[float, weakref.ref[WebSocketTransport]]] = collections.deque()
        self._timer: PeriodicCallback | None = None

    def watch(self, transport: WebSocketTransport) -> None:
        """Ping this socket from now on (its first ping one interval after it opened)."""
        self._pings.append((time.monotonic() + self._interval_secs, weakref.ref(transport)))
        if self._timer is None:
            # Started with the first socket: the timer belongs to the running loop.
            tick_secs = min(max(min(self._interval_secs, self._timeout_secs) / 4, MIN_TICK_SECS), MAX_TICK_SECS)
            self._timer = PeriodicCallback(self._tick, tick_secs * 1000, jitter=0.1)
            self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _tick(self) -> None:
        now = time.monotonic()
        pongs = self._pongs
        while pongs and pongs[0][0] <= now:
            transport = pongs.popleft()[1]()
            if transport is not None and transport.awaiting_pong and not transport.closed:
                transport.close(reason="ping timed out")  # as Tornado's own ping closes it
        pings = self._pings
        while pings and pings[0][0] <= now:
            ref = pings.popleft()[1]
            transport = ref()
            if transport is None or transport.closed:
                continue
            transport.ping()
            pongs.append((now + self._timeout_secs, ref))
            # Tornado's rhythm: the next ping once both the interval and the pong's wait are over.
            pings.append((now + max(self._interval_secs, self._timeout_secs), ref))


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
