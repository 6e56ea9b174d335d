"""Attachments: image and voice uploads in GridFS, recognised by their bytes, and who may read them.

A file is known by a 24-hex id. Messages with contentType 2 (image) or 3 (voice) may carry that id
as `content`; such a message is what lets its other party read the file. Who may read a file:
- its owner (the uploader, or the user a service/admin token uploaded it for) and its uploader;
- staff (service, admin);
- a user with access to a message whose content is the file id: a `pm` the user sent or received,
  an `sm` to the user, a `gm` in a group the user is a member of now.
A recalled message's content is emptied (models/recall.py, with the edit notices that carried its
files), so it no longer lets its recipients read its file: they get the 404 below, while the file
stays for the record (owner, uploader and staff still read it; `message_versions` names it).
Everyone else gets 404, exactly as for an id that does not exist: file ids are ObjectIds, which are
partly sequential, so access never relies on an id being hard to guess, and a refusal never tells
whether the file exists.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from bson import ObjectId
from gridfs import AsyncGridFSBucket
from gridfs.asynchronous.grid_file import AsyncGridOut
from gridfs.errors import NoFile
from pymongo import WriteConcern
from tornado.httputil import HTTPFile, HTTPInputError, parse_multipart_form_data

from models.audit import AuditRecorder, record_denied
from models.database import Database
from models.errors import InvalidField, NotFound, RangeNotSatisfiable, TooLarge
from models.groups import has_member
from models.principal import Principal
from models.validation import FILE_ID_RE

log = logging.getLogger(__name__)

BUCKET_NAME = "attachments"  # collections attachments.files and attachments.chunks
CHUNK_SIZE_BYTES = 255 * 1024  # GridFS default: each chunk document stays well under 16 MiB
FILE_FIELD = "file"  # pinned: the multipart field of POST /api/v1/files
# Multipart framing (boundaries, part headers) allowed on top of max_file_bytes.
UPLOAD_OVERHEAD_BYTES = 64 * 1024
MAX_FILENAME_CHARS = 255
MEDIA_CONTENT_TYPES_FILTER = {"$gte": 2, "$lte": 3}  # image or voice; the same range as the index

# Detected type → the declared Content-Types that may accompany it. A client may also declare
# nothing specific (GENERIC_TYPES); the bytes decide either way, the header only has to agree.
DECLARED_ALIASES: dict[str, frozenset[str]] = {
    "image/png": frozenset({"image/png", "image/x-png"}),
    "image/jpeg": frozenset({"image/jpeg", "image/jpg", "image/pjpeg"}),
    "image/gif": frozenset({"image/gif"}),
    "image/webp": frozenset({"image/webp"}),
    "audio/mpeg": frozenset({"audio/mpeg", "audio/mp3", "audio/mpeg3", "audio/x-mp3", "audio/x-mpeg"}),
    "audio/ogg": frozenset({"audio/ogg", "audio/opus", "audio/vorbis", "application/ogg"}),
    "audio/wav": frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"}),
    "audio/mp4": frozenset({"audio/mp4", "audio/m4a", "audio/x-m4a", "audio/aac", "audio/x-aac", "video/mp4"}),
    "audio/aac": frozenset({"audio/aac", "audio/x-aac", "audio/aacp"}),
    "audio/3gpp": frozenset({"audio/3gpp", "audio/3gp", "video/3gpp", "audio/amr"}),
    "audio/amr": frozenset({"audio/amr", "audio/x-amr", "audio/3gpp"}),
    "audio/amr-wb": frozenset({"audio/amr-wb", "audio/x-amr-wb"}),
    # MediaRecorder in browsers labels audio-only recordings either way.
    "audio/webm": frozenset({"audio/webm", "video/webm"}),
}
GENERIC_TYPES = frozenset({"", "application/octet-stream", "application/unknown", "binary/octet-stream"})
EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg",
    "audio/wav": "wav",
    "audio/mp4": "m4a",
    "audio/aac": "aac",
    "audio/3gpp": "3gp",
    "audio/amr": "amr",
    "audio/amr-wb": "awb",
    "audio/webm": "webm",
}
MP4_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"mp41", b"mp42", b"isom", b"iso2"})
GPP_BRANDS = frozenset({b"3gp4", b"3gp5", b"3gp6", b"3gp7"})
OGG_AUDIO_CODECS = (b"OpusHead", b"\x01vorbis", b"Speex   ")
SNIFF_BYTES = 128
_UNSAFE_FILENAME_RE = re.compile(r"[\x00-\x1f\x7f/\\]")


def detect_mime_type(head: bytes) -> str | None:
    """The image or voice type that the first bytes of a file show, or None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[:3] == b"ID3" and len(head) >= 10 and head[3] < 0xFF:
        return "audio/mpeg"
    if head[:4] == b"OggS" and any(codec in head[:SNIFF_BYTES] for codec in OGG_AUDIO_CODECS):
        return "audio/ogg"  # Ogg also carries video (Theora): only its audio codecs pass
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in MP4_AUDIO_BRANDS:
            return "audio/mp4"
        if brand in GPP_BRANDS:
            return "audio/3gpp"  # what Android's voice recorder writes
    if head.startswith(b"#!AMR-WB\n"):
        return "audio/amr-wb"
    if head.startswith(b"#!AMR\n"):
        return "audio/amr"
    if head[:4] == b"\x1a\x45\xdf\xa3" and b"webm" in head[:64]:
        return "audio/webm"  # an EBML header whose DocType is webm (not any Matroska file)
    if _is_mpeg_audio_frame(head):
        return "audio/mpeg"
    if _is_adts_frame(head):
        return "audio/aac"
    return None


def _is_mpeg_audio_frame(head: bytes) -> bool:
    """An MP3 without ID3 tag starts with a frame header: 11 sync bits, then sane version/layer."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version = (head[1] >> 3) & 0b11
    layer = (head[1] >> 1) & 0b11
    bitrate = head[2] >> 4
    sample_rate = (head[2] >> 2) & 0b11
    return version != 0b01 and layer != 0b00 and bitrate not in (0b0000, 0b1111) and sample_rate != 0b11


def _is_adts_frame(head: bytes) -> bool:
    """Raw AAC (ADTS): 12 sync bits, layer 00, then a valid sampling-frequency index."""
    return len(head) >= 7 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0 and (head[2] >> 2) & 0xF < 13


def check_declared_type(declared: str, detected: str) -> None:
    """The part's own Content-Type, if specific, must name what the bytes are."""
    base = declared.split(";", 1)[0].strip().lower()
    if base in GENERIC_TYPES or base in DECLARED_ALIASES[detected]:
        return
    raise InvalidField(FILE_FIELD, f"declared as {base!r} but its content is {detected}")


@dataclasses.dataclass(frozen=True)
class Upload:
    """The `file` part of a multipart upload."""

    data: bytes
    filename: str
    declared_type: str


def parse_upload(content_type: str, body: bytes) -> Upload:
    """Find the `file` field in a multipart/form-data body; every failure names `file`."""
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        raise InvalidField(FILE_FIELD, "send the upload as multipart/form-data with a field 'file'")
    boundary = ""
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip()
    if not boundary:
        raise InvalidField(FILE_FIELD, "multipart/form-data without a boundary")
    arguments: dict[str, list[bytes]] = {}
    files: dict[str, list[HTTPFile]] = {}
    try:
        parse_multipart_form_data(boundary.encode("latin-1", "replace"), body, arguments, files)
    except (HTTPInputError, ValueError) as exc:
        raise InvalidField(FILE_FIELD, f"malformed multipart/form-data ({exc})") from None
    parts = files.get(FILE_FIELD, [])
    if len(parts) + len(arguments.get(FILE_FIELD, [])) > 1:
        raise InvalidField(FILE_FIELD, "given more than once")
    if parts:
        part = parts[0]
        return Upload(bytes(part["body"]), part["filename"], part["content_type"])
    if FILE_FIELD in arguments:  # a part without filename: still the file, of undeclared type
        return Upload(arguments[FILE_FIELD][0], "", "")
    raise InvalidField(FILE_FIELD, "is required (a multipart/form-data field)")


def clean_filename(name: str) -> str:
    """The client's file name as a harmless label for operators; never sent back in headers."""
    return _UNSAFE_FILENAME_RE.sub("_", name)[:MAX_FILENAME_CHARS] or "upload"


def file_url(file_id: str) -> str:
    return f"/api/v1/files/{file_id}"


def file_to_wire(file_id: str, mime_type: str, size: int) -> dict[str, Any]:
    return {"id": file_id, "url": file_url(file_id), "mimeType": mime_type, "size": size}


@dataclasses.dataclass
class FileDownload:
    """An open, readable file the caller may see."""

    id: str
    mime_type: str
    size: int
    grid_out: AsyncGridOut

    @property
    def download_name(self) -> str:
        return f"{self.id}.{EXTENSIONS.get(self.mime_type, 'bin')}"

    async def iter_chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes start..end (inclusive), one GridFS chunk at a time: never all in memory."""
        last = self.size - 1 if end is None else end
        remaining = last - start + 1
        if remaining <= 0:
            return
        await self.grid_out.seek(start)
        while remaining > 0:
            chunk = await self.grid_out.readchunk()
            if not chunk:
                break
            chunk = chunk[:remaining]
            remaining -= len(chunk)
            yield chunk

    async def close(self) -> None:
        await self.grid_out.close()


def parse_byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b` range as inclusive (start, end); None to send the whole file.

    Media players (Safari's <audio> in particular) need ranges. Several ranges at once are
    rare and answered with the whole file, which RFC 9110 allows.
    """
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*([0-9]{0,18})\s*-\s*([0-9]{0,18})\s*", header)
    if not match or not (match.group(1) or match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(f"Range: {header!r} selects nothing of {size} bytes")
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None  # syntactically invalid: ignored, per RFC 9110
    if start >= size:
        raise RangeNotSatisfiable(f"Range: starts at {start}, beyond the {size} bytes of the file")
    return start, end


class FileStore:
    """Uploads and downloads in GridFS, and the access rules around them (MessageService.files)."""

    def __init__(self, db: Database, write_concern: WriteConcern, *, audit: AuditRecorder | None = None):
        self._db = db
        # SPEC §13: file.read, and access.denied for the 404 hiding a forbidden file (REST: via "rest").
        self._audit = audit
        # Journaled like messages: a file id a client received must survive a crash, since a
        # message referencing it may be acknowledged next.
        self._bucket = AsyncGridFSBucket(
            db, bucket_name=BUCKET_NAME, chunk_size_bytes=CHUNK_SIZE_BYTES, write_concern=write_concern
        )
        self._files = db.get_collection(f"{BUCKET_NAME}.files")

    async def save_upload(
        self, principal: Principal, upload: Upload, max_file_bytes: int, owner: str | None = None
    ) -> dict[str, Any]:
        """Check and store an upload; returns {"id", "url", "mimeType", "size"}.

        `owner` lets the platform back end (service/admin) upload on a user's behalf, so that the
        user may then attach the file to messages it sends.
        """
        owner = owner or principal.user_id
        principal.require_self_or_staff(owner, "owner")
        size = len(upload.data)
        if size > max_file_bytes:
            raise TooLarge(f"{FILE_FIELD}: larger than {max_file_bytes} bytes")
        if size == 0:
            raise InvalidField(FILE_FIELD, "is empty")
        mime_type = detect_mime_type(upload.data[:SNIFF_BYTES])
        if mime_type is None:
            raise InvalidField(
                FILE_FIELD,
                "is not an accepted image (png, jpeg, gif, webp) or voice recording "
                "(mp3, ogg/opus, wav, m4a/aac, 3gp, amr, webm)",
            )
        check_declared_type(upload.declared_type, mime_type)
        file_id = ObjectId()
        metadata = {"owner": owner, "uploadedBy": principal.user_id, "mimeType": mime_type}
        # upload_from_stream_with_id aborts (deletes written chunks) if any write fails: no
        # partial file is left behind.
        await self._bucket.upload_from_stream_with_id(
            file_id, clean_filename(upload.filename), upload.data, metadata=metadata
        )
        log.info("file %s stored: %s, %d bytes, owner %s, by %s", file_id, mime_type, size, owner, principal.user_id)
        return file_to_wire(str(file_id), mime_type, size)

    async def open_download(self, principal: Principal, file_id: str) -> FileDownload:
        """Open a file the caller may read; NotFound for a missing and a forbidden file alike."""
        missing = NotFound(f"id: no file {file_id!r}, or not one you may read")
        if not FILE_ID_RE.match(file_id):
            raise missing
        try:
            grid_out = await self._bucket.open_download_stream(ObjectId(file_id))
        except NoFile:
            raise missing from None
        metadata = grid_out.metadata or {}
        if not await self._may_read(principal, file_id, metadata):
            await grid_out.close()
            if self._audit is not None:
                await record_denied(self._audit, principal, "rest", {"fileId": file_id})
            raise missing
        if self._audit is not None:
            await self._audit.record(principal.user_id, principal.role, "file.read", "rest", {"fileId": file_id})
        return FileDownload(
            file_id, metadata.get("mimeType", "application/octet-stream"), int(grid_out.length), grid_out
        )

    async def check_attachable(self, file_id: str, sender: str) -> None:
        """MessageService hook: the sender may put this file in a message only if it may read it."""
        doc = await self._files.find_one({"_id": ObjectId(file_id)}, {"metadata": 1})
        if doc is None or not await self._user_may_read(sender, file_id, doc.get("metadata") or {}):
            # One answer for both cases, like downloads: attaching must not probe for ids.
            raise InvalidField("content", f"no file {file_id!r} that {sender!r} may attach")

    async def _may_read(self, principal: Principal, file_id: str, metadata: Mapping[str, Any]) -> bool:
        return principal.is_staff or await self._user_may_read(principal.user_id, file_id, metadata)

    async def _user_may_read(self, user: str, file_id: str, metadata: Mapping[str, Any]) -> bool:
        if user in (metadata.get("owner"), metadata.get("uploadedBy")):
            return True
        return await self._is_shared_with(user, file_id)

    async def _is_shared_with(self, user: str, file_id: str) -> bool:
        """Does a message the user may read carry this file?"""
        media = {"content": file_id, "contentType": MEDIA_CONTENT_TYPES_FILTER}
        if await self._db.pm.find_one({**media, "$or": [{"from": user}, {"to": user}]}, {"_id": 1}):
            return True
        if await self._db.sm.find_one({**media, "to": user}, {"_id": 1}):
            return True
        groups = await self._db.gm.distinct("group", media)
        if not groups:
            return False
        # Membership now, not when the message was sent: leaving a group ends access to its files.
        return await self._db.groups.find_one({"_id": {"$in": groups}, **has_member(user)}, {"_id": 1}) is not None
