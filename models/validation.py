"""Input checks shared by REST and WebSocket. Each failure names the field (InvalidField).

Every value that reaches a MongoDB filter passes through here first, so a client can never smuggle
in an operator: ids are plain strings that cannot start with "$", numbers are real integers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from server.errors import InvalidBody, InvalidField

MAX_ID_CHARS = 128
CONTENT_TYPE_HYPERLINK = 4
MEDIA_CONTENT_TYPES = frozenset({2, 3})
MAX_TITLE_CHARS = 200
MAX_SUMMARY_CHARS = 1000
MAX_CLIENT_MSG_ID_CHARS = 128
MAX_AT_MEMBERS = 500
MAX_GROUP_MEMBERS = 5000
MAX_GROUP_NAME_CHARS = 200
MAX_SEQ = 2**53  # fits JSON numbers in every client
OBJECT_ID_RE = re.compile(r"^[0-9a-f]{24}$")  # ids the server generates (ObjectId hex)
FILE_ID_RE = OBJECT_ID_RE
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")


def is_valid_id(value: object) -> bool:
    """A user or group id: a 1-128 character string, no leading '$', no control characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_CHARS
        and not value.startswith("$")
        and not _CONTROL_CHARS_RE.search(value)
    )


def parse_json_object(body: bytes | str, what: str = "body") -> dict[str, Any]:
    """Decode a JSON object or raise InvalidBody."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidBody(f"{what} is not valid JSON") from None
    except RecursionError:  # e.g. 60,000 nested "[" fit in a 64 KiB body: a 400, not a 500
        raise InvalidBody(f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidBody(f"{what} must be a JSON object")
    return value


def require_id(data: Mapping[str, Any], field: str) -> str:
    value = data.get(field)
    if value is None:
        raise InvalidField(field, "is required")
    return check_id(value, field)


def optional_id(data: Mapping[str, Any], field: str) -> str | None:
    value = data.get(field)
    return None if value is None else check_id(value, field)


def check_id(value: object, field: str) -> str:
    if not is_valid_id(value):
        raise InvalidField(
            field, "must be a string of 1-128 characters, not starting with '$', no control characters"
        )
    assert isinstance(value, str)
    return value


def parse_id_list(value: object, field: str, *, max_items: int, allow_single: bool = False) -> list[str]:
    """A list of ids, de-duplicated in order. A single string is accepted where allow_single."""
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidField(field, "must be a list of ids")
    if len(value) > max_items:
        raise InvalidField(field, f"has more than {max_items} entries")
    ids = [check_id(item, field) for item in value]
    return list(dict.fromkeys(ids))


def parse_int(value: object, field: str, *, minimum: int = 0, maximum: int = MAX_SEQ,
              allow_numeric_string: bool = False) -> int:
    """An integer in range; bools are not integers here; "3" only where the contract allows it."""
    if allow_numeric_string and isinstance(value, str) and re.fullmatch(r"[0-9]{1,16}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field, "must be an integer")
    if not minimum <= value <= maximum:
        raise InvalidField(field, f"must be between {minimum} and {maximum}")
    return value


def optional_int(data: Mapping[str, Any], field: str, **kwargs: Any) -> int | None:
    value = data.get(field)
    return None if value is None else parse_int(value, field, **kwargs)


def parse_text(data: Mapping[str, Any], field: str, *, max_chars: int, required: bool = True) -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise InvalidField(field, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidField(field, "must be a string")
    if required and not value.strip():
        raise InvalidField(field, "must not be empty")
    if len(value) > max_chars:
        raise InvalidField(field, f"must be at most {max_chars} characters")
    return value


def is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in value


def parse_content(data: Mapping[str, Any], max_chars: int) -> tuple[int, str]:
    """contentType (1-4, int or numeric string) and content checked against it."""
    raw_type = data.get("contentType")
    if raw_type is None:
        raise InvalidField("contentType", "is required")
    try:
        content_type = parse_int(raw_type, "contentType", minimum=1, maximum=4, allow_numeric_string=True)
    except InvalidField:
        raise InvalidField("contentType", "must be 1 (text), 2 (image), 3 (voice) or 4 (hyperlink)") from None
    content = parse_text(data, "content", max_chars=max_chars)
    assert content is not None
    if content_type == CONTENT_TYPE_HYPERLINK and not is_http_url(content):
        raise InvalidField("content", "must be an http(s) URL for contentType 4")
    if content_type in MEDIA_CONTENT_TYPES and not (is_http_url(content) or FILE_ID_RE.match(content)):
        raise InvalidField("content", "must be an http(s) URL or a file id for contentType 2 and 3")
    return content_type, content


def parse_client_msg_id(data: Mapping[str, Any]) -> str | None:
    value = data.get("clientMsgId")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CLIENT_MSG_ID_CHARS:
        raise InvalidField("clientMsgId", f"must be a string of 1-{MAX_CLIENT_MSG_ID_CHARS} characters")
    return value
