"""/ws?token=<jwt>: the live connection of patients (and any other live client).

Authentication happens before the upgrade (a bad token is a 401 response, never an accepted then
dropped socket). After the upgrade the socket registers with the hub, then sends the backlog (every
message above the user's received marker), then live messages. Live messages that arrive while the
backlog is being sent are held and released after it; server/ordering.py keeps each conversation in
seq order on the socket, so nothing is sent twice and nothing is skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import tornado.websocket
from pymongo.errors import PyMongoError
from tornado.iostream import IOStream, SSLIOStream, StreamBufferFullError, StreamClosedError

from handlers.base import as_im_error, log_handler_exception
from models.conversations import ConversationRef
from models.errors import IMError, InvalidField, RateLimited
from models.principal import Principal
from models.validation import parse_client_msg_id, parse_json_object
from server.hub import encode_frame
from server.ordering import InOrderDelivery
from server.services import Services

log = logging.getLogger(__name__)

# A socket whose unsent output grows past this is too slow to keep: it is closed, not buffered forever.
MAX_PENDING_WRITE_BYTES = 4 * 1024 * 1024
BACKLOG_FLUSH_EVERY = 100
WS_TRY_AGAIN_LATER = 1013
BACKLOG_RETRY_DELAY_SECS = 0.5


class ChatSocketHandler(tornado.websocket.WebSocketHandler):
    principal: Principal

    @property
    def services(self) -> Services:
        services: Services = self.application.settings["services"]
        return services

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    # ---- handshake ----------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Refuse before the upgrade: 401 for a bad token, 429 over the connection caps."""
        try:
            self.principal = self.services.tokens.verify(self.get_query_argument("token", None))
            self.services.directory.note_principal(self.principal)  # who is a doctor (models/directory.py)
            limits = self.services.settings.limits
            hub = self.services.hub
            if hub.count_sockets(self.principal.user_id) >= limits.max_connections_per_user:
                raise RateLimited(f"too many connections for this user (max {limits.max_connections_per_user})",
                                  code="too_many_connections")
            if hub.socket_count >= limits.max_connections_total:
                raise RateLimited("server connection limit reached", code="too_many_connections")
        except IMError as exc:
            self.set_status(exc.status)
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish(json.dumps(exc.envelope()))

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        log_handler_exception(self.request, typ, value, tb)

    def check_origin(self, origin: str) -> bool:
        """Browsers send Origin; it must be on the allow-list. Native clients send none (not checked)."""
        allowed = self.services.settings.allowed_origins
        if "*" in allowed:
            return True
        parts = urlsplit(origin)
        return f"{parts.scheme}://{parts.netloc}".lower() in {o.lower().rstrip("/") for o in allowed}

    def open(self, *args: str, **kwargs: str) -> None:
        self._delivery = InOrderDelivery(self._write, self._fetch_missing)
        # Live frames (and acks of this socket's own sends) are held while the backlog goes out,
        # then offered after it; None stands for a message this socket already has.
        self._held: list[tuple[str, int, str | None]] | None = []
        stream = getattr(self.ws_connection, "stream", None)
        if stream is not None:
            stream.max_write_buffer_size = MAX_PENDING_WRITE_BYTES
        self.services.hub.register(self)
        log.info("socket opened for %s (%s)", self.user_id, self.principal.role)
        # The backlog runs beside the connection rather than inside open(): Tornado reads no frame,
        # not even a pong, until open() returns, so a socket queued behind a reconnect storm would
        # otherwise be closed by its own ping timeout.
        self._catching_up = asyncio.get_running_loop().create_task(self._catch_up())  # kept: tasks are weakly held

    async def _catch_up(self) -> None:
        try:
            async with self.services.backlog_slots:
                if self._is_gone():
                    return  # gone while waiting for a slot
                sent = await self._send_backlog_retrying()
        except (tornado.websocket.WebSocketClosedError, StreamClosedError):
            return
        except Exception as exc:
            # The database is away or overloaded: close with "try again later"; the client
            # reconnects and gets the rest (its received marker has not moved past what it has).
            log.warning("backlog for %s failed: %s", self.user_id, exc)
            self.close(WS_TRY_AGAIN_LATER, "backlog unavailable, reconnect")
            return
        held, self._held = self._held, None
        for key, seq, frame in held or ():
            self._delivery.offer(key, seq, frame)
        if sent:
            log.info("sent a backlog of %d messages to %s", sent, self.user_id)

    def _is_gone(self) -> bool:
        return self.ws_connection is None or self.ws_connection.is_closing()

    async def _send_backlog_retrying(self) -> int:
        """One retry after a database error: a busy moment should not cost the client a reconnect.
        Whatever the first attempt sent is not sent again (server/ordering.py drops it)."""
        try:
            return await self._send_backlog()
        except PyMongoError as exc:
            log.info("backlog for %s: retrying after %s", self.user_id, exc)
            await asyncio.sleep(BACKLOG_RETRY_DELAY_SECS)
            return await self._send_backlog()

    async def _send_backlog(self) -> int:
        """Every message above the user's received marker, oldest first per conversation."""
        inbox = self.services.inbox
        fanout = self.services.fanout
        plan = await inbox.backlog_plan(self.user_id, fanout.just_stored.for_user(self.user_id) if fanout else None)
        for ref, received, _newest in plan:
            self._delivery.set_baseline(ref.key, received)
        sent = 0
        for ref, received, newest in plan:
            if newest <= received:
                continue
            if self._is_gone():
                break
            async for message in inbox.messages_after(ref, received):
                frame = encode_frame({"type": "message", "message": message})
                if self._delivery.offer(ref.key, message["seq"], frame):
                    sent += 1
                    if sent % BACKLOG_FLUSH_EVERY == 0:
                        await self._flush()
        return sent

    async def _fetch_missing(self, key: str, after: int, before: int) -> list[tuple[int, str]]:
        """Messages a socket skipped (see server/ordering.py), read back from the database."""
        ref = ConversationRef.from_key(key)
        return [(m["seq"], encode_frame({"type": "message", "message": m}))
                async for m in self.services.inbox.messages_after(ref, after, before)]

    def on_close(self) -> None:
        if hasattr(self, "principal"):
            self.services.hub.unregister(self)
            if hasattr(self, "_delivery"):
                # The backlog task is not cancelled (a driver call cancelled mid-flight can leak its
                # connection): it stops by itself at its next page, seeing the socket closed.
                self._delivery.close()
            log.info("socket closed for %s (code %s)", self.user_id, self.close_code)

    # ---- the hub's side -----------------------------------------------------------------------

    def push_message(self, conversation_key: str, seq: int, frame: str) -> None:
        if self._held is not None:
            self._held.append((conversation_key, seq, frame))
        else:
            self._delivery.offer(conversation_key, seq, frame)

    def note_delivered(self, conversation_key: str, seq: int) -> None:
        if self._held is not None:
            self._held.append((conversation_key, seq, None))
        else:
            self._delivery.note_delivered(conversation_key, seq)

    def push_frame(self, frame: str) -> None:
        self._write(frame)

    def _write(self, frame: str) -> None:
        connection = self.ws_connection
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
                self.write_message(frame).add_done_callback(_consume_write_outcome)
        except (tornado.websocket.WebSocketClosedError, StreamClosedError):
            pass
        except StreamBufferFullError:
            log.warning("closing a slow socket of %s: over %d bytes unsent", self.user_id, MAX_PENDING_WRITE_BYTES)
            self.close(1008, "too slow")

    async def _flush(self) -> None:
        """Let the kernel take what is queued (back-pressure while sending a long backlog)."""
        stream = getattr(self.ws_connection, "stream", None)
        if stream is not None:
            await stream.write(b"")

    # ---- client frames ------------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        client_msg_id: str | None = None
        try:
            if isinstance(message, bytes):
                raise InvalidField("frame", "binary frames are not supported; send JSON text")
            frame = parse_json_object(message, "frame")
            if isinstance(frame.get("clientMsgId"), str):
                client_msg_id = frame["clientMsgId"]
            kind = frame.get("type")
            handler = FRAME_HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise InvalidField("type", f"must be one of {', '.join(sorted(FRAME_HANDLERS))}")
            await handler(self, frame)
        except Exception as exc:
            error = as_im_error(exc)
            if error is None:
                log.exception("frame from %s failed", self.user_id)
                error = IMError("internal error", code="internal_error", status=500)
            reply: dict[str, Any] = {"type": "error", "code": error.code, "message": error.message}
            if client_msg_id is not None:
                reply["clientMsgId"] = client_msg_id
            self._write(encode_frame(reply))

    async def _on_send(self, frame: dict[str, Any]) -> None:
        if parse_client_msg_id(frame) is None:
            raise InvalidField("clientMsgId", "is required on WebSocket sends")
        messages = self.services.messages
        data = {k: v for k, v in frame.items() if k not in ("type", "from")}
        draft = await (messages.draft_pm if frame["type"] == "pm" else messages.draft_gm)(self.principal, data)
        self.services.send_limiter.check(self.user_id)
        message, _created = await messages.send(draft, origin=self)
        self._write(encode_frame({"type": "ack", "clientMsgId": message["clientMsgId"], "message": message}))

    async def _on_received(self, frame: dict[str, Any]) -> None:
        await self.services.inbox.mark(self.user_id, frame, read=False)

    async def _on_read(self, frame: dict[str, Any]) -> None:
        ref, others, cursor = await self.services.inbox.mark(self.user_id, frame, read=True)
        self.services.hub.send_receipt(ref, self.user_id, cursor["read"], others)

    async def _on_ping(self, frame: dict[str, Any]) -> None:
        self._write(encode_frame({"type": "pong"}))


def _write_wire(stream: IOStream, wire: bytes) -> None:
    """Hand ready frame bytes to the kernel; what it does not take at once, IOStream queues.

    While nothing is queued, one send() (what IOStream would do after its buffer bookkeeping
    and a Future per write) keeps a plain socket's bytes in order. TLS streams, and any stream
    with bytes waiting, always go through IOStream.
    """
    sent = 0
    if isinstance(stream, IOStream) and not isinstance(stream, SSLIOStream) and not stream.writing() \
            and not stream.closed():
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


FrameHandler = Callable[[ChatSocketHandler, dict[str, Any]], Awaitable[None]]
FRAME_HANDLERS: dict[str, FrameHandler] = {
    "pm": ChatSocketHandler._on_send,
    "gm": ChatSocketHandler._on_send,
    "received": ChatSocketHandler._on_received,
    "read": ChatSocketHandler._on_read,
    "ping": ChatSocketHandler._on_ping,
}
