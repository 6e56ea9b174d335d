"""The HTTP server in front of the application: what one connection may cost, and the headers
every answer carries.

Tornado's HTTPServer alone keeps a half-sent request open for an hour, drops a connection whose
headers are too large without a word, and closes a socket that still holds unread request bytes,
which makes the kernel send a reset that can destroy the answer just written. Here: a cap on open
HTTP connections, header and body timeouts from [http], a 431 envelope for oversized headers, and
a lingering close (half-close, drop what still arrives for a moment, then close).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, UnsatisfiableReadError

from models.errors import HeadersTooLarge, error_body
from server.config import Settings

log = logging.getLogger(__name__)

SERVER_NAME = "im-server"  # the Server header: no framework or version for a scanner to match
# The regex HTTP1Connection reads a request's start line and headers up to.
HEADER_END_PATTERN = b"\r?\n\r?\n"
# Closing with unread bytes sends a TCP reset; read and drop at most this much for at most this long.
LINGER_SECS = 2.0
LINGER_MAX_BYTES = 1024 * 1024
LINGER_READ_BYTES = 64 * 1024
CAP_WARNING_INTERVAL_SECS = 60.0
DEFAULT_MAX_CONNECTIONS = 5000

# Every answer (REST, /sdk/ files, refused WebSocket handshakes) carries these (SPEC §5).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # /ws?token=... must never travel in a Referer
}
# The demo pages load only same-origin scripts and styles, show images and voice notes from http(s)
# URLs in messages, and open a WebSocket to their own origin's /ws.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' http: https: data:; "
    "media-src 'self' http: https:; connect-src 'self' ws: wss:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Everything else (JSON, scripts, uploaded files) is never a document that may run or load anything.
RESOURCE_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def content_security_policy(content_type: str) -> str:
    """The policy for an answer of this type (HTML pages get the one their scripts need)."""
    return PAGE_CSP if content_type.lower().startswith("text/html") else RESOURCE_CSP


def headers_too_large_answer(max_header_bytes: int) -> bytes:
    """The whole 431 response, written before the connection closes (Tornado would just drop it)."""
    # The envelope of every other answer (handlers/errors.py renders the same error_body); written
    # here because no handler runs for a request whose headers never finished.
    body = json.dumps(error_body(HeadersTooLarge(f"request headers: larger than {max_header_bytes} bytes"))).encode()
    lines = [
        "HTTP/1.1 431 Request Header Fields Too Large",
        "Content-Type: application/json; charset=UTF-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        f"Content-Security-Policy: {RESOURCE_CSP}",
        *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items()),
        f"Server: {SERVER_NAME}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def close_lingering(sock: socket.socket, linger_secs: float = LINGER_SECS, max_bytes: int = LINGER_MAX_BYTES) -> None:
    """Half-close, then read and drop what the peer still sends until it closes, max_bytes or
    linger_secs, and only then close: the peer reads our last answer instead of a reset."""
    io_loop = IOLoop.current()
    try:
        sock.shutdown(socket.SHUT_WR)
        fd = sock.fileno()
    except OSError:
        sock.close()
        return
    drained = 0
    done = False

    def finish() -> None:
        nonlocal done
        if not done:
            done = True
            io_loop.remove_handler(fd)
            io_loop.remove_timeout(timer)
            sock.close()

    def on_readable(_fd: int, _events: int) -> None:
        nonlocal drained
        try:
            data = sock.recv(LINGER_READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        drained += len(data)
        if not data or drained >= max_bytes:
            finish()

    timer = io_loop.call_later(linger_secs, finish)
    io_loop.add_handler(fd, on_readable, IOLoop.READ | IOLoop.ERROR)


def has_unread_bytes(sock: socket.socket) -> bool:
    """Whether the peer sent bytes we have not read (closing now would send a reset)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing waiting; others: the connection is gone anyway
        return False


class GuardedIOStream(IOStream):
    """An IOStream that answers 431 when a request's headers overflow, and closes lingering."""

    # Slots, not three more keys in the instance dict: those would make every stream's dict
    # (an upgraded WebSocket keeps its stream for life) grow to its next size, ~1.5 KiB more.
    __slots__ = ("_headers_too_large", "_reading_headers", "_last_answer")

    def __init__(self, sock: socket.socket, headers_too_large: bytes, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._headers_too_large = headers_too_large
        self._reading_headers = False
        self._last_answer = b""
        # Nagle off for the connection's life: a response is written whole (headers and body in
        # one write), so Nagle saves nothing there, and on a WebSocket it would hold a small frame
        # back until the previous one is acknowledged (up to a delayed ACK, 40 ms and more, on a
        # phone's network). Tornado switches it on and off around every response: two system
        # calls per request saved (set_nodelay below).
        super().set_nodelay(True)

    def set_nodelay(self, value: bool) -> None:
        """Left on (see __init__)."""

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Any:
        # Only HTTP1Connection's header read uses this pattern with a limit.
        self._reading_headers = regex == HEADER_END_PATTERN and max_bytes is not None
        return super().read_until_regex(regex, max_bytes)

    def read_until(self, delimiter: bytes, max_bytes: int | None = None) -> Any:
        self._reading_headers = False  # a chunk-size line: an overflow there is a bad body, not a 431
        return super().read_until(delimiter, max_bytes)

    def close(self, exc_info: Any = False) -> None:
        if not self.closed() and self._reading_headers and isinstance(exc_info, UnsatisfiableReadError):
            self._last_answer = self._headers_too_large
        super().close(exc_info)

    def close_fd(self) -> None:
        sock, answer = self.socket, self._last_answer
        if answer:
            with contextlib.suppress(OSError):  # small enough for the buffer of a connection never written to
                sock.send(answer)
        if answer or has_unread_bytes(sock):
            close_lingering(sock)
            self.socket = None  # type: ignore[assignment]  # as IOStream.close_fd leaves it
        else:
            super().close_fd()


class GuardedHTTPServer(HTTPServer):
    """HTTPServer with a cap on open HTTP connections (upgraded WebSockets leave the count)."""

    def initialize(
        self, *args: Any, max_connections: int = DEFAULT_MAX_CONNECTIONS, headers_too_large: bytes = b"", **kwargs: Any
    ) -> None:
        super().initialize(*args, **kwargs)
        self._max_connections = max_connections
        self._headers_too_large = headers_too_large
        self._open_connections = 0
        self._accepted_connections = 0
        self._refused_connections = 0
        self._cap_warned_at = -CAP_WARNING_INTERVAL_SECS

    @property
    def open_connections(self) -> int:
        return self._open_connections

    @property
    def accepted_connections(self) -> int:
        return self._accepted_connections

    @property
    def refused_connections(self) -> int:
        return self._refused_connections

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if self._open_connections >= self._max_connections:
            self._refused_connections += 1
            now = time.monotonic()
            if now - self._cap_warned_at >= CAP_WARNING_INTERVAL_SECS:
                self._cap_warned_at = now
                log.warning(
                    "%d HTTP connections open (the [http] max_connections cap): closing new ones (%d so far)",
                    self._open_connections,
                    self._refused_connections,
                )
            stream.close()
            return
        # TCPServer built a plain IOStream that has not read or registered anything yet; serve the
        # socket through a GuardedIOStream instead.
        guarded = GuardedIOStream(
            stream.socket,
            self._headers_too_large,
            max_buffer_size=stream.max_buffer_size,
            read_chunk_size=stream.read_chunk_size,
        )
        self._open_connections += 1
        self._accepted_connections += 1
        super().handle_stream(guarded, address)

    def on_close(self, server_conn: object) -> None:
        self._open_connections -= 1
        super().on_close(server_conn)


def make_http_server(app: Any, settings: Settings) -> GuardedHTTPServer:
    """The server run.py listens with (tests use it too): every limit from [http] and [limits]."""
    http = settings.http
    return GuardedHTTPServer(
        app,
        # No X-Real-Ip / X-Forwarded-* rewriting: nothing reads remote_ip or protocol (the access log
        # leaves addresses out), and Tornado validates the forwarded address with getaddrinfo on
        # every request, ~2 % of the server's CPU per message at the bench table's load.
        xheaders=False,
        max_connections=http.max_connections,
        headers_too_large=headers_too_large_answer(http.max_header_bytes),
        max_header_size=http.max_header_bytes,
        idle_connection_timeout=http.header_timeout_secs,  # Tornado's header timeout
        body_timeout=http.body_timeout_secs,
        # For handlers that do not stream (static files, the WebSocket handshake); REST handlers
        # size each request's own limit before its body is read (handlers/base.py).
        max_body_size=settings.limits.max_json_body_bytes,
    )
