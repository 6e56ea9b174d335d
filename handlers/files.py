"""POST /api/v1/files (multipart upload of an image or voice note) and GET /api/v1/files/{id}."""

from __future__ import annotations

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import StreamClosedError

from handlers.base import BaseHandler
from models.files import FILE_FIELD, UPLOAD_OVERHEAD_BYTES, parse_byte_range, parse_upload
from models.validation import check_id
from server.auth import Principal
from server.errors import IMError, TooLarge, Unauthenticated

# A body declared larger than the cap is still read (and dropped) up to this many times the cap, so
# that the client, which is busy sending it, reliably receives the 413 envelope. Beyond that the
# 413 goes out at once and the connection closes, which a client may see as a reset.
DRAIN_FACTOR = 4
DOWNLOAD_CACHE_CONTROL = "private, max-age=86400"


@tornado.web.stream_request_body
class FileUploadHandler(BaseHandler):
    SUPPORTED_METHODS = ("POST",)

    def initialize(self) -> None:
        self._body = bytearray()
        self._principal: Principal | None = None
        self._rejection: IMError | None = None

    @property
    def _body_cap(self) -> int:
        return self.services.settings.limits.max_file_bytes + UPLOAD_OVERHEAD_BYTES

    def prepare(self) -> None:
        """Runs before the body arrives: authenticate, and size the body limit for this upload."""
        try:
            self._principal = self.authenticate()
        except Unauthenticated as exc:
            self._rejection = exc  # answered once the body is drained (and dropped)
        cap = self._body_cap
        declared = self.request.headers.get("Content-Length", "")
        length = int(declared) if declared.isdigit() else None
        if length is None:
            # Chunked: data_received notices the excess and drains; the connection stops at this.
            connection_cap = cap * DRAIN_FACTOR
        elif length > cap:
            too_large = TooLarge(f"{FILE_FIELD}: the upload is {length} bytes; files may be at "
                                 f"most {self.services.settings.limits.max_file_bytes} bytes")
            self._rejection = self._rejection or too_large  # a 401 still comes first
            if length > cap * DRAIN_FACTOR:
                raise self._rejection
            connection_cap = length
        else:
            connection_cap = cap
        if isinstance(self.request.connection, HTTP1Connection):
            self.request.connection.set_max_body_size(connection_cap)

    def data_received(self, chunk: bytes) -> None:
        if self._rejection is not None:
            return
        if len(self._body) + len(chunk) > self._body_cap:  # chunked uploads declare no length
            limit = self.services.settings.limits.max_file_bytes
            self._rejection = TooLarge(f"{FILE_FIELD}: files may be at most {limit} bytes")
            self._body = bytearray()
            return
        self._body += chunk

    async def post(self) -> None:
        """Store an image or voice upload: 201 {"id", "url", "mimeType", "size"}."""
        if self._rejection is not None:
            raise self._rejection
        assert self._principal is not None
        owner = self.query().get("owner")
        upload = parse_upload(self.request.headers.get("Content-Type", ""), bytes(self._body))
        self._body = bytearray()
        stored = await self.services.files.save_upload(
            self._principal, upload, self.services.settings.limits.max_file_bytes,
            owner=None if owner is None else check_id(owner, "owner"),
        )
        self.set_header("Location", stored["url"])
        self.write_json(stored, 201)

    def on_connection_close(self) -> None:
        self._body = bytearray()


class FileDownloadHandler(BaseHandler):
    SUPPORTED_METHODS = ("GET", "HEAD")

    async def get(self, file_id: str, include_body: bool = True) -> None:
        """Stream a file the caller may read, chunk by chunk; 404 if missing or forbidden alike."""
        principal = self.authenticate()
        download = await self.services.files.open_download(principal, file_id)
        try:
            etag = f'"{download.id}"'  # files never change, so the id is a strong validator
            self.set_header("Content-Type", download.mime_type)
            # inline: shown in the chat; nosniff (a BaseHandler default) keeps browsers from
            # reading a file as anything other than the type its bytes were checked to be.
            self.set_header("Content-Disposition", f'inline; filename="{download.download_name}"')
            self.set_header("Cache-Control", DOWNLOAD_CACHE_CONTROL)
            self.set_header("ETag", etag)
            self.set_header("Accept-Ranges", "bytes")
            if etag in self.request.headers.get("If-None-Match", ""):
                self.set_status(304)
                return
            byte_range = parse_byte_range(self.request.headers.get("Range"), download.size)
            start, end = byte_range or (0, download.size - 1)
            if byte_range is not None:
                self.set_status(206)
                self.set_header("Content-Range", f"bytes {start}-{end}/{download.size}")
            self.set_header("Content-Length", end - start + 1)
            if not include_body:
                return
            async for chunk in download.iter_chunks(start, end):
                self.write(chunk)
                await self.flush()
        except StreamClosedError:
            return  # the client went away mid-download
        finally:
            await download.close()

    async def head(self, file_id: str) -> None:
        """Headers only (size, type) without the body."""
        await self.get(file_id, include_body=False)
