"""POST /api/v1/files (multipart upload of an image or voice note) and GET /api/v1/files/{id}."""

from __future__ import annotations

from typing import Any

from tornado.iostream import StreamClosedError

from handlers.base import BaseHandler
from models.errors import RangeNotSatisfiable, TooLarge
from models.files import FILE_FIELD, UPLOAD_OVERHEAD_BYTES, parse_byte_range, parse_upload
from models.validation import check_id

DOWNLOAD_CACHE_CONTROL = "private, max-age=86400"


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: "*" matches any existing file; otherwise a weak comparison with each tag."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


class FileUploadHandler(BaseHandler):
    """The body is streamed (see BaseHandler) under the upload cap instead of the JSON one.

    Other methods get Tornado's default 405 once the body is read (a SUPPORTED_METHODS list would
    answer before it and cost the client its keep-alive connection).
    """

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
            principal,
            upload,
            self.services.settings.limits.max_file_bytes,
            owner=None if owner is None else check_id(owner, "owner"),
        )
        self.set_header("Location", stored["url"])
        self.write_json(stored, 201)

    def on_connection_close(self) -> None:
        self._body = bytearray()


class FileDownloadHandler(BaseHandler):
    _file_size: int | None = None

    async def get(self, file_id: str, include_body: bool = True) -> None:
        """Stream a file the caller may read, chunk by chunk; 404 if missing or forbidden alike."""
        principal = self.authenticate()
        download = await self.services.files.open_download(principal, file_id)
        self._file_size = download.size
        try:
            etag = f'"{download.id}"'  # files never change, so the id is a strong validator
            self.set_header("Content-Type", download.mime_type)
            # inline: shown in the chat; nosniff (a BaseHandler default) keeps browsers from
            # reading a file as anything other than the type its bytes were checked to be.
            self.set_header("Content-Disposition", f'inline; filename="{download.download_name}"')
            self.set_header("Cache-Control", DOWNLOAD_CACHE_CONTROL)
            self.set_header("ETag", etag)
            self.set_header("Accept-Ranges", "bytes")
            if etag_matches(self.request.headers.get("If-None-Match", ""), etag):
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

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RangeNotSatisfiable) and self._file_size is not None:
            # RFC 9110 §15.5.17: a 416 says how large the file is, so a player can ask again.
            self.set_header("Content-Range", f"bytes */{self._file_size}")
        super().write_error(status_code, **kwargs)
