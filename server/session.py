"""One live connection's delivery: backlog first, then live messages, each conversation in seq order.

The hub talks to sessions (the Socket side of server/hub.py); a session writes through a small
Transport (server/transport.py for a Tornado WebSocket), like zulip's ClientDescriptor per
connection in front of its handler. Once registered, a session reads its backlog plan (batched
with the other sockets connecting, server/backlog.py), then sends the backlog (every message above
the user's received marker) a conversation at a time. Live messages are held only while they could
overtake that backlog: all of them until the plan is read, then those of a conversation until its
backlog is sent (so a live message in a quiet conversation never waits behind a long backlog,
nor behind other sockets'). server/ordering.py keeps each conversation in seq order on the socket,
so nothing is sent twice and nothing is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import tornado.websocket
from pymongo.errors import PyMongoError
from tornado.iostream import StreamClosedError

from models.conversations import ConversationRef
from models.inbox import BACKLOG_PAGE, Inbox
from models.principal import Principal
from server.backlog import BacklogPlanner, Plan
from server.hub import encode_frame
from server.ordering import InOrderDelivery

log = logging.getLogger(__name__)

BACKLOG_FLUSH_EVERY = 100
WS_TRY_AGAIN_LATER = 1013
BACKLOG_RETRY_DELAY_SECS = 0.5

T = TypeVar("T")


class Transport(Protocol):
    @property
    def closed(self) -> bool: ...

    def write(self, frame: str) -> None:
        """Queue one text frame (dropped once closed)."""

    def write_many(self, frames: Sequence[str]) -> None:
        """Queue text frames in order, as one write where it can."""

    async def flush(self) -> None:
        """Wait until the kernel has taken what is queued."""

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Start the closing handshake."""


class ChatSession:
    """What one connection is sent, and when; registered with the hub as one of its sockets."""

    # One per socket: 10,000 idle sockets show every per-instance dict.
    __slots__ = (
        "principal",
        "token_issued_at",
        "_on_backlog_sent",
        "_transport",
        "_inbox",
        "_planner",
        "_backlog_slots",
        "_delivery",
        "_held",
        "_planned",
        "_news",
        "_rushes",
        "_opened_at",
        "_page",
        "_catching_up",
    )

    def __init__(
        self,
        principal: Principal,
        transport: Transport,
        inbox: Inbox,
        planner: BacklogPlanner,
        backlog_slots: asyncio.Semaphore,
        token_issued_at: float | None = None,
        on_backlog_sent: Callable[[int], None] | None = None,  # metrics: messages in the backlog
    ) -> None:
        self._on_backlog_sent = on_backlog_sent
        self.principal = principal
        self.token_issued_at = token_issued_at  # closed with 4001 when a revoke covers it
        self._transport = transport
        self._inbox = inbox
        self._planner = planner
        self._backlog_slots = backlog_slots
        self._delivery = InOrderDelivery(self._send, self._fetch_missing)
        self._page: list[str] | None = None  # a backlog page being built: written at once
        # Live frames (and acks of this socket's own sends; None stands for a message this socket
        # already has) held per conversation: all of them until the plan is read, then only those
        # of conversations whose backlog is still to be sent. None: nothing is held any more.
        self._held: dict[str, list[tuple[int, str | None]]] | None = {}
        self._planned = False
        # The conversations whose backlog is still to be sent: key -> (conversation, received).
        self._news: dict[str, tuple[ConversationRef, int]] = {}
        self._rushes: set[asyncio.Task[None]] | None = None  # see _rush
        self._opened_at = time.monotonic()  # registered with the hub right after (handlers/ws.py)
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
        # ping timeout. Kept until done (the loop holds tasks only weakly), then let go.
        self._catching_up = asyncio.get_running_loop().create_task(self._catch_up())
        self._catching_up.add_done_callback(self._caught_up)

    def _caught_up(self, _task: asyncio.Task[None]) -> None:
        self._catching_up = None

    def end(self) -> None:
        """The connection has closed: stop gap repairs.

        The backlog task is not cancelled (a driver call cancelled mid-flight can leak its
        connection): it stops by itself at its next page, seeing the transport closed.
        """
        self._delivery.close()

    # ---- the hub's side -----------------------------------------------------------------------

    def push_message(self, conversation_key: str, seq: int, frame: str) -> None:
        held = self._held
        if held is not None and (not self._planned or conversation_key in held):
            held.setdefault(conversation_key, []).append((seq, frame))
            if conversation_key in self._news:
                self._rush(conversation_key)
        else:
            self._delivery.offer(conversation_key, seq, frame)

    def note_delivered(self, conversation_key: str, seq: int) -> None:
        held = self._held
        if held is not None and (not self._planned or conversation_key in held):
            held.setdefault(conversation_key, []).append((seq, None))
        else:
            self._delivery.note_delivered(conversation_key, seq)

    def push_frame(self, frame: str) -> None:
        self._transport.write(frame)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self._transport.close(code, reason)

    # ---- backlog ------------------------------------------------------------------------------

    async def _catch_up(self) -> None:
        """Plan (batched with other sockets', never behind their backlogs), release the live frames
        of conversations with nothing to catch up on, then send the backlog a conversation at a
        time, each followed by its held live frames."""
        sent = unflushed = 0
        try:
            self._apply_plan(await self._retrying(self._planner.plan_for, self.user_id))
            if self._news:
                async with self._backlog_slots:
                    if self._transport.closed:
                        return  # gone while waiting for a slot
                    while self._news:  # _rush may take some of them meanwhile
                        key = next(iter(self._news))
                        ref, received = self._news.pop(key)
                        count = await self._retrying(self._send_conversation, ref, received)
                        self._release_held(key)
                        sent, unflushed = sent + count, unflushed + count
                        if unflushed >= BACKLOG_FLUSH_EVERY:  # back-pressure across many conversations
                            await self._transport.flush()
                            unflushed = 0
        except (tornado.websocket.WebSocketClosedError, StreamClosedError):
            return
        except Exception as exc:
            # The database is away or overloaded: close with "try again later"; the client
            # reconnects and gets the rest (its received marker has not moved past what it has).
            log.warning("backlog for %s failed: %s", self.user_id, exc)
            self.close(WS_TRY_AGAIN_LATER, "backlog unavailable, reconnect")
            return
        if self._on_backlog_sent is not None:
            self._on_backlog_sent(sent)
        if sent:
            log.info("sent a backlog of %d messages to %s", sent, self.user_id)

    async def _retrying(self, read: Callable[..., Awaitable[T]], *args: Any) -> T:
        """One retry after a database error: a busy moment should not cost the client a reconnect.
        Whatever the first attempt sent is not sent again (server/ordering.py drops it)."""
        try:
            return await read(*args)
        except PyMongoError as exc:
            log.info("backlog for %s: retrying after %s", self.user_id, exc)
            await asyncio.sleep(BACKLOG_RETRY_DELAY_SECS)
            return await read(*args)

    def _apply_plan(self, plan: Plan) -> None:
        """Set every conversation's baseline, note those with news, release what is held for the
        others, and rush the backlog of those with a live message already waiting."""
        for ref, received, newest in plan:
            self._delivery.set_baseline(ref.key, received)
            if newest > received:
                self._news[ref.key] = (ref, received)
        held = self._held if self._held is not None else {}
        for key in [k for k in held if k not in self._news]:
            self._release_held(key)
        for key in self._news:
            held.setdefault(key, [])
        self._planned = True
        for key in [k for k, frames in held.items() if any(frame is not None for _seq, frame in frames)]:
            self._rush(key)
        if not held:
            self._held = None

    def _release_held(self, key: str) -> None:
        """A conversation's backlog is sent: what was held for it follows. Once nothing is held
        (and the plan is read), live frames go straight to the socket."""
        held = self._held
        if held is None:
            return
        for seq, frame in held.pop(key, ()):
            self._delivery.offer(key, seq, frame)
        if self._planned and not held:
            self._held = None

    def _rush(self, key: str) -> None:
        """A live message came for a conversation whose backlog is still queued (for a slot, or
        behind this socket's other conversations): send that conversation's backlog now, beside
        the queue, so the live message follows it at once instead of waiting for other backlogs."""
        ref, received = self._news.pop(key)
        task = asyncio.get_running_loop().create_task(self._send_rushed(ref, received))
        if self._rushes is None:
            self._rushes = set()
        self._rushes.add(task)  # kept: the loop holds tasks only weakly
        task.add_done_callback(self._rushes.discard)

    async def _send_rushed(self, ref: ConversationRef, received: int) -> None:
        try:
            await self._retrying(self._send_conversation, ref, received)
        except (tornado.websocket.WebSocketClosedError, StreamClosedError):
            return
        except Exception as exc:  # as in _catch_up: the client reconnects and gets the rest
            log.warning("backlog of %s for %s failed: %s", ref.key, self.user_id, exc)
            self.close(WS_TRY_AGAIN_LATER, "backlog unavailable, reconnect")
            return
        self._release_held(ref.key)

    async def _send_conversation(self, ref: ConversationRef, received: int) -> int:
        """One conversation's messages above the received marker, a page per write."""
        sent = 0
        after = received
        while not self._transport.closed:
            page = await self._planner.page(ref, after, self._opened_at)
            # The page leaves in one write (one send() for 20 frames instead of 20); nothing
            # awaits while it is built, so no other frame can come between.
            frames: list[str] = []
            self._page = frames
            try:
                for message in page:
                    frame = encode_frame({"type": "message", "message": message})
                    if self._delivery.offer(ref.key, message["seq"], frame):
                        sent += 1
            finally:
                self._page = None
            self._transport.write_many(frames)
            if len(page) < BACKLOG_PAGE:
                break
            after = page[-1]["seq"]
            await self._transport.flush()  # back-pressure within a long conversation
        return sent

    def _send(self, frame: str) -> None:
        if self._page is not None:
            self._page.append(frame)
        else:
            self._transport.write(frame)

    async def _fetch_missing(self, key: str, after: int, before: int) -> list[tuple[int, str]]:
        """Messages a socket skipped (see server/ordering.py), read back from the database."""
        ref = ConversationRef.from_key(key)
        return [
            (m["seq"], encode_frame({"type": "message", "message": m}))
            async for m in self._inbox.messages_after(ref, after, before)
        ]
