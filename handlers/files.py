"""POST /api/v1/files (multipart upload of an image or voice note) and GET /api/v1/files/{id}."""

from __future__ import annotations

from tornado.iostream import StreamClosedError

from handlers.base import BaseHandler
from models.files import FILE_FIELD, UPLOAD_OVERHEAD_BYTES, parse_byte_range, parse_upload
from models.validation import check_id
from server.errors import TooLarge

DOWNLOAD_CACHE_CONTROL = "private, max-age=86400"


class FileUploadHandler(BaseHandler):
    """The body is streamed (see BaseHandler) under the upload cap instead of the JSON one."""

    SUPPORTED_METHODS = ("POST",)

    def body_cap(self) -> int:
        return self.services.settings.limits.max_file_bytes + UPLOAD_OVERHEAD_BYTES

    def too_large(self) -> TooLarge:
        limit = self.services.settings.limits.max_file_bytes
        return TooLarge(f"{FILE_FIELD}: files may be at most {limit} bytes")

    async def post(self) -> None:
        """Store an image or voice upload: 201 {"id", "url", "mimeType", "size"}."""
        principal = self.authenticate()
        owner = self.query().get("owner")
        upload = parse_upload(self.request.headers.get("Content-Type", ""), self.body())
        self._body = bytearray()
        stored = await self.services.files.save_upload(
            principal, upload, self.services.settings.limits.max_file_bytes,
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
