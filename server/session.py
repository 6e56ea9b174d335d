"""One live connection's delivery: backlog first, then live messages, each conversation in seq order.

The hub talks to sessions (the Socket side of server/hub.py); a session writes through a small
Transport (server/transport.py for a Tornado WebSocket), like zulip's ClientDescriptor per
connection in front of its handler. Once registered, a session sends the backlog (every message
above the user's received marker), then live messages. Live messages that arrive while the backlog
is being sent are held and released after it; server/ordering.py keeps each conversation in seq
order on the socket, so nothing is sent twice and nothing is skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import tornado.websocket
from pymongo.errors import PyMongoError
from tornado.iostream import StreamClosedError

from models.conversations import ConversationRef
from models.inbox import Inbox
from models.principal import Principal
from server.fanout import ChangeStreamFanout
from server.hub import encode_frame
from server.ordering import InOrderDelivery

log = logging.getLogger(__name__)

BACKLOG_FLUSH_EVERY = 100
WS_TRY_AGAIN_LATER = 1013
BACKLOG_RETRY_DELAY_SECS = 0.5


class Transport(Protocol):
    @property
    def closed(self) -> bool: ...

    def write(self, frame: str) -> None:
        """Queue one text frame (dropped once closed)."""

    async def flush(self) -> None:
        """Wait until the kernel has taken what is queued."""

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Start the closing handshake."""


class ChatSession:
    """What one connection is sent, and when; registered with the hub as one of its sockets."""

    def __init__(
        self,
        principal: Principal,
        transport: Transport,
        inbox: Inbox,
        backlog_slots: asyncio.Semaphore,
        fanout: ChangeStreamFanout | None = None,
        token_issued_at: float | None = None,
        on_backlog_sent: Callable[[int], None] | None = None,  # metrics: messages in the backlog
    ) -> None:
        self._on_backlog_sent = on_backlog_sent
        self.principal = principal
        self.token_issued_at = token_issued_at  # closed with 4001 when a revoke covers it
        self._transport = transport
        self._inbox = inbox
        self._backlog_slots = backlog_slots
        self._fanout = fanout
        self._delivery = InOrderDelivery(transport.write, self._fetch_missing)
        # Live frames (and acks of this socket's own sends) are held while the backlog goes out,
        # then offered after it; None stands for a message this socket already has.
        self._held: list[tuple[str, int, str | None]] | None = []
        self._catching_up: asyncio.Task[None] | None = None

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    @property
    def closed(self) -> bool:
        return self._transport.closed

    def start(self) -> None:
        """Send the backlog beside the connection, then release what arrived meanwhile."""
        # Not awaited by the handler's open(): Tornado reads no frame, not even a pong, until open()
        # returns, so a socket queued behind a reconnect storm would otherwise be closed by its own
        # ping timeout.
        self._catching_up = asyncio.get_running_loop().create_task(self._catch_up())  # kept: tasks are weakly held

    def end(self) -> None:
        """The connection has closed: stop gap repairs.

        The backlog task is not cancelled (a driver call cancelled mid-flight can leak its
        connection): it stops by itself at its next page, seeing the transport closed.
        """
        self._delivery.close()

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
        self._transport.write(frame)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self._transport.close(code, reason)

    # ---- backlog ------------------------------------------------------------------------------

    async def _catch_up(self) -> None:
        try:
            async with self._backlog_slots:
                if self._transport.closed:
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
        if self._on_backlog_sent is not None:
            self._on_backlog_sent(sent)
        if sent:
            log.info("sent a backlog of %d messages to %s", sent, self.user_id)

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
        just_stored = self._fanout.just_stored.for_user(self.user_id) if self._fanout else None
        plan = await self._inbox.backlog_plan(self.user_id, just_stored)
        for ref, received, _newest in plan:
            self._delivery.set_baseline(ref.key, received)
        sent = 0
        for ref, received, newest in plan:
            if newest <= received:
                continue
            if self._transport.closed:
                break
            async for message in self._inbox.messages_after(ref, received):
                frame = encode_frame({"type": "message", "message": message})
                if self._delivery.offer(ref.key, message["seq"], frame):
                    sent += 1
                    if sent % BACKLOG_FLUSH_EVERY == 0:
                        await self._transport.flush()
        return sent

    async def _fetch_missing(self, key: str, after: int, before: int) -> list[tuple[int, str]]:
        """Messages a socket skipped (see server/ordering.py), read back from the database."""
        ref = ConversationRef.from_key(key)
        return [
            (m["seq"], encode_frame({"type": "message", "message": m}))
            async for m in self._inbox.messages_after(ref, after, before)
        ]
