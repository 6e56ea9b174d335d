"""/ws?token=<jwt>: the live connection of patients (and any other live client).

Authentication happens before the upgrade (a bad token is a 401 response, never an accepted then
dropped socket). After the upgrade the connection's session (server/session.py) registers with the
hub and sends the backlog, then live messages; this handler only answers the client's frames, each
with one service call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import tornado.websocket
from tornado import httputil
from tornado.util import ObjectDict

from handlers.base import log_handler_exception
from handlers.errors import error_frame, finish_with_error, to_im_error
from models.audit import asked_target, record_denied
from models.errors import IMError, InternalError, InvalidField
from models.principal import Principal
from models.validation import parse_client_msg_id, parse_json_object
from server.hub import encode_frame
from server.services import Services
from server.session import ChatSession
from server.transport import WebSocketTransport

log = logging.getLogger(__name__)


class ChatSocketHandler(tornado.websocket.WebSocketHandler):
    # Slots, not keys of the instance dict: Tornado's own attributes fill it to the brim, and three
    # more would make each socket's handler dict grow to its next size (~1.7 KiB per socket).
    __slots__ = ("principal", "token_issued_at", "session", "transport")
    principal: Principal
    token_issued_at: float | None
    session: ChatSession | None
    transport: WebSocketTransport | None

    def initialize(self) -> None:
        self.token_issued_at = None
        self.session = None
        self.transport = None

    @property
    def services(self) -> Services:
        services: Services = self.application.settings["services"]
        return services

    # ---- handshake ----------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Refuse before the upgrade: 401 for a bad token, 429 over the connection caps."""
        try:
            token = self.get_query_argument("token", None)
            self.principal, self.token_issued_at = self.services.tokens.verify_issued(token)
            self.services.directory.note_principal(self.principal)  # who is a doctor (models/directory.py)
            limits = self.services.settings.limits
            self.services.hub.check_room(
                self.principal.user_id, limits.max_connections_per_user, limits.max_connections_total
            )
        except IMError as exc:
            finish_with_error(self, exc)

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
        """Register the connection's session with the hub, then let it send the backlog."""
        services = self.services
        self.transport = transport = WebSocketTransport(self, self.principal.user_id)
        services.heartbeat.watch(transport)
        self.session = ChatSession(
            self.principal,
            transport,
            services.inbox,
            services.backlog_planner,
            services.backlog_slots,
            token_issued_at=self.token_issued_at,
            on_backlog_sent=services.metrics.note_backlog,
        )
        services.hub.register(self.session)
        # A suspend or revoke that landed since the handshake closes it now (4003 / 4001).
        services.accounts.apply_to_socket(self.session)
        log.info("socket opened for %s (%s)", self.principal.user_id, self.principal.role)
        self.session.start()
        self._drop_handshake_state()

    def _drop_handshake_state(self) -> None:
        """An open socket keeps its handler and request for life: let go of what only the handshake
        needed. The query string is the bearer token (not kept in memory longer than needed); the
        request's and the 101 answer's headers are ~3 KiB a socket, most of what 10,000 idle ones cost."""
        request = self.request
        request.uri, request.query = request.path, ""
        request.arguments, request.query_arguments = {}, {}
        request.headers = httputil.HTTPHeaders()
        # Sent with the 101: after it Tornado writes frames only, never a response through these.
        self._headers = httputil.HTTPHeaders()
        self._transforms = []
        self.ui = ObjectDict()  # templates' helpers: a socket renders none

    def on_pong(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.note_pong()

    def on_close(self) -> None:
        """Unregister: no more fan-out to this connection."""
        if self.session is not None:
            self.services.hub.unregister(self.session)
            self.session.end()
            log.info("socket closed for %s (code %s)", self.principal.user_id, self.close_code)

    # ---- client frames ------------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        """Dispatch a frame on its type; a failure is an error frame (with the frame's clientMsgId)."""
        assert self.session is not None  # Tornado reads frames only after open()
        client_msg_id: str | None = None
        frame: dict[str, Any] = {}
        kind: object = None
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
            await handler(self, self.session, frame)
        except Exception as exc:
            error = to_im_error(exc)
            if isinstance(error, InternalError):
                log.exception("frame from %s failed", self.principal.user_id)
            if error.status == 403:  # stored before the refusal is reported (SPEC §13)
                # A recall/edit frame names its message `id` (SPEC §14): the target's messageId.
                asked = asked_target(frame, {"channel": kind, "messageId": frame.get("id")})
                await record_denied(self.services.audit, self.principal, "ws", asked)
            self.session.push_frame(encode_frame(error_frame(error, client_msg_id)))

    async def _on_send(self, session: ChatSession, frame: dict[str, Any]) -> None:
        # Live sends are always the token's user's own (no "from"), and always idempotent.
        if parse_client_msg_id(frame) is None:
            raise InvalidField("clientMsgId", "is required on WebSocket sends")
        data = {k: v for k, v in frame.items() if k not in ("type", "from")}
        message, _created = await self.services.chat.send(self.principal, frame["type"], data, origin=session)
        session.push_frame(encode_frame({"type": "ack", "clientMsgId": message["clientMsgId"], "message": message}))

    async def _on_change(self, session: ChatSession, frame: dict[str, Any]) -> None:
        """recall / edit (SPEC §14): answered by an ack carrying the changed message."""
        client_msg_id = parse_client_msg_id(frame)
        if client_msg_id is None:
            raise InvalidField("clientMsgId", "is required on WebSocket recalls and edits")
        channel = frame.get("channel")
        if channel not in ("sm", "pm", "gm"):
            raise InvalidField("channel", "must be one of sm, pm, gm")
        data = {k: v for k, v in frame.items() if k not in ("type", "channel", "id")}
        change = self.services.chat.recall if frame["type"] == "recall" else self.services.chat.edit
        message = await change(self.principal, channel, frame.get("id"), data, via="ws")
        session.push_frame(encode_frame({"type": "ack", "clientMsgId": client_msg_id, "message": message}))

    async def _on_received(self, session: ChatSession, frame: dict[str, Any]) -> None:
        await self.services.chat.mark(self.principal, self.principal.user_id, frame, read=False, via="ws")

    async def _on_read(self, session: ChatSession, frame: dict[str, Any]) -> None:
        await self.services.chat.mark(self.principal, self.principal.user_id, frame, read=True, via="ws")

    async def _on_ping(self, session: ChatSession, frame: dict[str, Any]) -> None:
        session.push_frame(encode_frame({"type": "pong"}))


FrameHandler = Callable[[ChatSocketHandler, ChatSession, dict[str, Any]], Awaitable[None]]
FRAME_HANDLERS: dict[str, FrameHandler] = {
    "pm": ChatSocketHandler._on_send,
    "gm": ChatSocketHandler._on_send,
    "recall": ChatSocketHandler._on_change,
    "edit": ChatSocketHandler._on_change,
    "received": ChatSocketHandler._on_received,
    "read": ChatSocketHandler._on_read,
    "ping": ChatSocketHandler._on_ping,
}
