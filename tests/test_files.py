"""Attachments: upload to GridFS, download by streaming, and who may read a file."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import zlib

import pytest
from tornado.httpclient import HTTPRequest

from models.files import detect_mime_type
from tests.helpers import assert_error

DOCTOR = ("Rose", "doctor")
PATIENT = ("Jack", "patient")
STRANGER = ("Mallory", "patient")
SERVICE = ("platform", "service")
BOUNDARY = "----im-test-boundary-7d2f"


def png_bytes() -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def ogg_opus_bytes(payload_size: int = 600_000) -> bytes:
    """An Ogg page carrying an OpusHead, then payload: several GridFS chunks long."""
    opus_head = b"OpusHead" + bytes([1, 1]) + struct.pack("<HIhB", 312, 48000, 0, 0)
    page = (
        b"OggS" + bytes([0, 2]) + bytes(8) + struct.pack("<III", 0x1234, 0, 0) + bytes([1, len(opus_head)]) + opus_head
    )
    return page + bytes(i % 251 for i in range(payload_size))


def multipart(
    data: bytes,
    content_type: str | None = "application/octet-stream",
    field: str = "file",
    filename: str | None = "upload.bin",
) -> tuple[bytes, dict[str, str]]:
    disposition = f'form-data; name="{field}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    body = head.encode() + b"\r\n" + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def upload(api, data: bytes, content_type: str | None = "application/octet-stream", as_=DOCTOR, **kwargs):
    body, headers = multipart(data, content_type, **kwargs)
    return await api.post("/api/v1/files", as_=as_, raw_body=body, headers=headers)


async def uploaded_id(api, data: bytes | None = None, as_=DOCTOR, content_type="image/png") -> str:
    response = await upload(api, data or png_bytes(), content_type, as_=as_)
    assert response.code == 201, response.body
    return response.json["id"]  # type: ignore[no-any-return]


async def send(api, channel: str, body: dict, as_):
    return await api.post(f"/api/v1/chats/{channel}", body, as_=as_)


@pytest.mark.gen_test
async def test_upload_png_then_download_same_bytes_with_safe_headers(api):
    data = png_bytes()
    response = await upload(api, data, "image/png", filename="scan.png")
    assert response.code == 201, response.body
    stored = response.json
    assert re.fullmatch(r"[0-9a-f]{24}", stored["id"])
    assert stored == {
        "id": stored["id"],
        "url": f"/api/v1/files/{stored['id']}",
        "mimeType": "image/png",
        "size": len(data),
    }

    download = await api.get(stored["url"], as_=DOCTOR)
    assert download.code == 200
    assert download.body == data
    assert download.headers["Content-Type"] == "image/png"
    assert download.headers["Content-Length"] == str(len(data))
    assert download.headers["Content-Disposition"].startswith("inline")
    assert download.headers["X-Content-Type-Options"] == "nosniff"
    assert "private" in download.headers["Cache-Control"]


@pytest.mark.gen_test(timeout=20)
async def test_voice_upload_spanning_several_chunks_streams_back_intact(api, services):
    data = ogg_opus_bytes()
    response = await upload(api, data, "audio/ogg; codecs=opus", as_=PATIENT)
    assert response.code == 201, response.body
    assert response.json["mimeType"] == "audio/ogg"
    file_id = response.json["id"]

    download = await api.get(f"/api/v1/files/{file_id}", as_=PATIENT)
    assert download.code == 200
    assert download.body == data
    assert download.headers["Content-Type"] == "audio/ogg"

    # Stored in GridFS with who uploaded it and what the bytes are. (Its chunks are not counted
    # here: nx-27017 maps GridFS collections onto its own tables, which answer count wrongly.)
    doc = await services.db["attachments.files"].find_one({})
    assert doc["length"] == len(data) > 2 * doc["chunkSize"]
    assert doc["metadata"] == {"owner": "Jack", "uploadedBy": "Jack", "mimeType": "audio/ogg"}


@pytest.mark.gen_test
async def test_range_request_for_media_players(api):
    data = ogg_opus_bytes(300_000)
    file_id = await uploaded_id(api, data, content_type="audio/ogg")
    partial = await api.get(f"/api/v1/files/{file_id}", as_=DOCTOR, headers={"Range": "bytes=261000-261199"})
    assert partial.code == 206
    assert partial.body == data[261000:261200]  # across the first chunk boundary
    assert partial.headers["Content-Range"] == f"bytes 261000-261199/{len(data)}"

    tail = await api.get(f"/api/v1/files/{file_id}", as_=DOCTOR, headers={"Range": "bytes=-10"})
    assert tail.code == 206 and tail.body == data[-10:]

    beyond = await api.get(f"/api/v1/files/{file_id}", as_=DOCTOR, headers={"Range": f"bytes={len(data)}-"})
    assert_error(beyond, 416, "range_not_satisfiable")


@pytest.mark.gen_test
async def test_unsatisfiable_range_says_how_large_the_file_is(api):
    data = png_bytes()
    file_id = await uploaded_id(api, data)
    for header in (f"bytes={len(data)}-", "bytes=-0"):
        beyond = await api.get(f"/api/v1/files/{file_id}", as_=DOCTOR, headers={"Range": header})
        assert_error(beyond, 416, "range_not_satisfiable")
        assert beyond.headers["Content-Range"] == f"bytes */{len(data)}"  # RFC 9110 §15.5.17


@pytest.mark.parametrize("if_none_match", ["*", ' W/"{id}" ', '"other", "{id}"'])
@pytest.mark.gen_test
async def test_if_none_match_star_or_any_listed_tag_is_304_for_an_existing_file(api, if_none_match):
    file_id = await uploaded_id(api)
    again = await api.get(
        f"/api/v1/files/{file_id}", as_=DOCTOR, headers={"If-None-Match": if_none_match.replace("{id}", file_id)}
    )
    assert again.code == 304 and again.body == b""
    assert again.headers["ETag"] == f'"{file_id}"'
    other = await api.get(f"/api/v1/files/{file_id}", as_=DOCTOR, headers={"If-None-Match": '"something-else"'})
    assert other.code == 200


@pytest.mark.gen_test
async def test_head_and_conditional_get(api):
    file_id = await uploaded_id(api)
    head = await api.request("HEAD", f"/api/v1/files/{file_id}", as_=DOCTOR)
    assert head.code == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(png_bytes()))
    again = await api.get(f"/api/v1/files/{file_id}", as_=DOCTOR, headers={"If-None-Match": head.headers["ETag"]})
    assert again.code == 304


@pytest.mark.parametrize(
    "declared, data",
    [
        ("image/png", b"<html><script>alert(1)</script></html>"),  # spoofed header, HTML bytes
        ("image/png", ogg_opus_bytes(100)),  # a real voice file claiming to be an image
        ("application/octet-stream", b"%PDF-1.7 not an image"),  # unknown type
        ("image/jpeg", png_bytes()),  # the wrong image type
        ("audio/ogg", b"OggS\x00\x02" + bytes(40) + b"\x80theora"),  # Ogg video, not voice
    ],
)
@pytest.mark.gen_test
async def test_bytes_decide_the_type_not_the_header(api, declared, data):
    response = await upload(api, data, declared)
    assert_error(response, 400, "invalid_field", "file")


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (b"GIF89a\x01\x00", "image/gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "audio/wav"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00", "audio/mpeg"),
        (b"\xff\xfb\x90\x64\x00", "audio/mpeg"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00", "audio/mp4"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00", "audio/mp4"),
        (b"\xff\xf1\x50\x80\x02\x1f\xfc", "audio/aac"),
        (b"#!AMR\n\x3c", "audio/amr"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "audio/webm"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x82\x88matroska", None),
        (b"\x00\x00\x00\x18ftypqt  ", None),
        (b"hello", None),
    ],
)
def test_detect_mime_type_from_magic_numbers(head, expected):
    assert detect_mime_type(head) == expected


@pytest.mark.gen_test
async def test_missing_or_malformed_upload_names_file(api):
    no_field, headers = multipart(png_bytes(), field="picture")
    assert_error(
        await api.post("/api/v1/files", as_=DOCTOR, raw_body=no_field, headers=headers), 400, "invalid_field", "file"
    )
    as_json = await api.post("/api/v1/files", {"file": "aGVsbG8="}, as_=DOCTOR)
    assert_error(as_json, 400, "invalid_field", "file")
    truncated, headers = multipart(png_bytes())
    cut = await api.post("/api/v1/files", as_=DOCTOR, raw_body=truncated[:-30], headers=headers)
    assert_error(cut, 400, "invalid_field", "file")
    assert_error(await upload(api, b""), 400, "invalid_field", "file")


@pytest.mark.gen_test
async def test_a_file_without_filename_is_still_the_file(api):
    response = await upload(api, png_bytes(), content_type=None, filename=None)
    assert response.code == 201, response.body
    assert response.json["mimeType"] == "image/png"


@pytest.mark.gen_test(timeout=20)
async def test_too_large_upload_is_413_with_envelope(api, settings):
    limit = settings.limits.max_file_bytes
    just_over = png_bytes() + bytes(limit + 1 - len(png_bytes()))
    assert_error(await upload(api, just_over, "image/png"), 413, "too_large", "file")
    # Far beyond the body cap: refused while the body is read, still with the envelope.
    assert_error(await upload(api, bytes(limit * 2)), 413, "too_large", "file")
    exactly = png_bytes() + bytes(limit - len(png_bytes()))
    response = await upload(api, exactly, "image/png")
    assert response.code == 201, response.body
    assert response.json["size"] == limit


@pytest.mark.gen_test(timeout=20)
async def test_chunked_upload_over_the_cap_is_413_with_envelope(http_client, base_url, token, settings):
    """Without Content-Length the size is only known while reading: still a 413 envelope."""
    body, headers = multipart(bytes(settings.limits.max_file_bytes * 2))

    async def produce(write):
        for start in range(0, len(body), 256 * 1024):
            await write(body[start : start + 256 * 1024])

    headers["Authorization"] = f"Bearer {token(*DOCTOR)}"
    response = await http_client.fetch(
        HTTPRequest(f"{base_url}/api/v1/files", method="POST", headers=headers, body_producer=produce),
        raise_error=False,
    )
    assert response.code == 413, response.body
    assert json.loads(response.body)["error"]["code"] == "too_large"


@pytest.mark.gen_test
async def test_enormous_declared_length_is_refused_before_the_body(api, base_url):
    """The 413 leaves before any body byte is read (a client may stream gigabytes)."""
    host, port = re.match(r"http://([^:]+):(\d+)", base_url).groups()
    reader, writer = await asyncio.open_connection(host, int(port))
    token = api.token(*DOCTOR)
    writer.write(
        (
            f"POST /api/v1/files HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            "Content-Length: 10000000000\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), raw
    assert json.loads(body)["error"]["code"] == "too_large"


@pytest.mark.gen_test
async def test_unauthenticated_callers_get_401(api):
    body, headers = multipart(png_bytes(), "image/png")
    assert_error(await api.post("/api/v1/files", raw_body=body, headers=headers), 401)
    file_id = await uploaded_id(api)
    assert_error(await api.get(f"/api/v1/files/{file_id}"), 401)


@pytest.mark.gen_test
async def test_stranger_gets_404_exactly_like_a_missing_file(api):
    file_id = await uploaded_id(api)
    refused = await api.get(f"/api/v1/files/{file_id}", as_=STRANGER)
    assert_error(refused, 404, "not_found", "id")
    missing = await api.get(f"/api/v1/files/{'0' * 24}", as_=STRANGER)
    assert_error(missing, 404, "not_found", "id")
    assert refused.json["error"]["message"].replace(file_id, "X") == missing.json["error"]["message"].replace(
        "0" * 24, "X"
    )
    assert_error(await api.get("/api/v1/files/not-an-id", as_=DOCTOR), 404, "not_found", "id")


@pytest.mark.gen_test
async def test_pm_recipient_may_download_once_a_message_references_the_file(api):
    file_id = await uploaded_id(api)
    assert (await api.get(f"/api/v1/files/{file_id}", as_=PATIENT)).code == 404
    sent = await send(api, "pm", {"from": "Rose", "to": "Jack", "contentType": 2, "content": file_id}, as_=DOCTOR)
    assert sent.code == 201, sent.body
    assert sent.json["content"] == file_id
    download = await api.get(f"/api/v1/files/{file_id}", as_=PATIENT)
    assert download.code == 200 and download.body == png_bytes()
    assert (await api.get(f"/api/v1/files/{file_id}", as_=STRANGER)).code == 404
    # A text message that happens to contain the id grants nothing.
    await send(api, "pm", {"from": "Rose", "to": "Mallory", "contentType": 1, "content": file_id}, as_=DOCTOR)
    assert (await api.get(f"/api/v1/files/{file_id}", as_=STRANGER)).code == 404


@pytest.mark.gen_test
async def test_group_members_may_download_while_they_are_members(api):
    created = await api.post(
        "/api/v1/groups", {"id": "care-1", "name": "Care", "groupType": 1, "members": ["Rose", "Jack"]}, as_=SERVICE
    )
    assert created.code == 201, created.body
    file_id = await uploaded_id(api, ogg_opus_bytes(1000), content_type="audio/ogg")
    sent = await send(api, "gm", {"from": "Rose", "group": "care-1", "contentType": 3, "content": file_id}, as_=DOCTOR)
    assert sent.code == 201, sent.body
    assert (await api.get(f"/api/v1/files/{file_id}", as_=PATIENT)).code == 200
    assert (await api.get(f"/api/v1/files/{file_id}", as_=STRANGER)).code == 404
    removed = await api.request("DELETE", "/api/v1/groups/care-1/members/Jack", as_=SERVICE)
    assert removed.code == 200, removed.body
    assert (await api.get(f"/api/v1/files/{file_id}", as_=PATIENT)).code == 404


@pytest.mark.gen_test
async def test_system_message_recipient_and_staff_may_download(api):
    file_id = await uploaded_id(api, as_=SERVICE)
    assert (await api.get(f"/api/v1/files/{file_id}", as_=PATIENT)).code == 404
    sent = await send(
        api,
        "sm",
        {"to": "Jack", "title": "Your report", "summary": "", "contentType": 2, "content": file_id},
        as_=SERVICE,
    )
    assert sent.code == 201, sent.body
    assert (await api.get(f"/api/v1/files/{file_id}", as_=PATIENT)).code == 200
    own = await uploaded_id(api, as_=STRANGER)
    assert (await api.get(f"/api/v1/files/{own}", as_=("ops", "admin"))).code == 200


@pytest.mark.gen_test
async def test_message_with_a_file_id_the_sender_may_not_attach_is_rejected(api):
    missing = await send(
        api, "pm", {"from": "Rose", "to": "Jack", "contentType": 2, "content": "0123456789abcdef01234567"}, as_=DOCTOR
    )
    assert_error(missing, 400, "invalid_field", "content")
    others = await uploaded_id(api, as_=STRANGER)
    # Attaching someone else's file to a message to yourself would be a way to read it.
    borrowed = await send(api, "pm", {"from": "Rose", "to": "Jack", "contentType": 2, "content": others}, as_=DOCTOR)
    assert_error(borrowed, 400, "invalid_field", "content")
    assert missing.json["error"]["message"].replace("0123456789abcdef01234567", "X").replace(
        "Rose", "S"
    ) == borrowed.json["error"]["message"].replace(others, "X").replace("Rose", "S")


@pytest.mark.gen_test
async def test_recipient_may_forward_a_file_it_received(api):
    file_id = await uploaded_id(api)
    await send(api, "pm", {"from": "Rose", "to": "Jack", "contentType": 2, "content": file_id}, as_=DOCTOR)
    forwarded = await send(api, "pm", {"from": "Jack", "to": "Lily", "contentType": 2, "content": file_id}, as_=PATIENT)
    assert forwarded.code == 201, forwarded.body
    assert (await api.get(f"/api/v1/files/{file_id}", as_=("Lily", "patient"))).code == 200


@pytest.mark.gen_test
async def test_service_uploads_for_a_user_who_then_attaches_it(api):
    body, headers = multipart(png_bytes(), "image/png")
    response = await api.post("/api/v1/files?owner=Jack", as_=SERVICE, raw_body=body, headers=headers)
    assert response.code == 201, response.body
    file_id = response.json["id"]
    sent = await send(api, "pm", {"from": "Jack", "to": "Rose", "contentType": 2, "content": file_id}, as_=PATIENT)
    assert sent.code == 201, sent.body
    # Only staff upload for someone else.
    forged = await api.post("/api/v1/files?owner=Jack", as_=DOCTOR, raw_body=body, headers=headers)
    assert_error(forged, 403, "forbidden", "owner")
