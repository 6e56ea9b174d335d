"""Input checks shared by REST and WebSocket. Each failure names the field (InvalidField).

Every value that reaches a MongoDB filter passes through here first, so a client can never smuggle
in an operator: ids are plain strings that cannot start with "$", numbers are real integers.
"""

from __future__ import annotations

import datetime
import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from models.errors import InvalidBody, InvalidField

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
# Unicode categories an id must not hold: controls (C0, DEL, C1), format characters (zero-width
# space and joiners, bidi overrides and isolates, BOM, soft hyphen), surrogates, line and
# paragraph separators. Each makes two ids that look the same, or reorders what a screen shows.
_ID_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# URLs: RFC 3986 excludes these ASCII characters; browsers percent-encode them, so a raw one means
# the string was not a URL a person copied (an attribute or markup break-out, a log injection).
_URL_FORBIDDEN_ASCII_RE = re.compile(r'[\x00-\x20\x7f"<>\\^`{|}]')  # and space and C0 controls
_URL_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Zs"})  # beyond ASCII


# A lone surrogate (JSON "\ud800") is a valid Python str but no UTF-8 exists for it: BSON cannot
# store it and a UTF-8 frame cannot carry it. (A paired escape, "\ud83d\ude00", decodes to one
# code point, so any surrogate left in a decoded string is unpaired.)
def has_surrogates(value: str) -> bool:
    """True when value holds an unpaired surrogate, so it cannot be encoded as UTF-8 (or BSON)."""
    if value.isascii():
        return False
    try:  # in C, about twice as fast as a regex search on CJK text (it runs on every frame)
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def id_problem(value: object) -> str | None:
    """Why value is not a user or group id, or None when it is one."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        return "must be a string of 1-128 characters"
    if value.startswith("$"):
        return "must not start with '$'"
    if value.isascii():  # the common case, without a per-character scan
        if _CONTROL_CHARS_RE.search(value):
            return "must not hold control characters"
    else:
        for char in value:
            category = unicodedata.category(char)
            if category == "Cs":
                return f"must be valid Unicode text (an unpaired surrogate U+{ord(char):04X})"
            if category in _ID_FORBIDDEN_CATEGORIES:
                return f"must not hold control, format or invisible characters (U+{ord(char):04X})"
            if category == "Zs" and char != " ":  # a no-break or ideographic space looks like " "
                return f"must not hold spaces other than U+0020 (U+{ord(char):04X})"
        # Rejected rather than normalised: normalising could merge two users that already exist.
        if not unicodedata.is_normalized("NFC", value):
            return "must be in Unicode NFC (composed) form"
    if value != value.strip():
        return "must not start or end with whitespace"
    return None


def is_valid_id(value: object) -> bool:
    """A user or group id (rules in id_problem); server/auth.py applies it to a token's sub too."""
    return id_problem(value) is None


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
    problem = id_problem(value)
    if problem is not None:
        raise InvalidField(field, problem)
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


def parse_int(
    value: object, field: str, *, minimum: int = 0, maximum: int = MAX_SEQ, allow_numeric_string: bool = False
) -> int:
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
    if has_surrogates(value):
        raise InvalidField(field, "must be valid Unicode text (it holds an unpaired surrogate)")
    if required and not value.strip():
        raise InvalidField(field, "must not be empty")
    if len(value) > max_chars:
        raise InvalidField(field, f"must be at most {max_chars} characters")
    return value


def is_http_url(value: str) -> bool:
    """An absolute http(s) URL with a host that parses cleanly: no whitespace, control, format
    or RFC 3986-excluded characters anywhere. Non-ASCII letters may stay (browsers accept IRIs)."""
    if _URL_FORBIDDEN_ASCII_RE.search(value):
        return False
    if not value.isascii() and any(
        unicodedata.category(char) in _URL_FORBIDDEN_CATEGORIES for char in value if not char.isascii()
    ):
        return False
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError unless a number in 0-65535
    except ValueError:
        return False
    # No userinfo: "https://clinic.example@evil.example/" shows one host and opens another.
    return (
        parts.scheme in ("http", "https")
        and value[len(parts.scheme) :].startswith("://")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and port != 0
    )


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
    if has_surrogates(value):
        raise InvalidField("clientMsgId", "must be valid Unicode text (it holds an unpaired surrogate)")
    return value


ISO_TIME_RE = re.compile(r"\d{4}-\d\d-\d\d[T ][0-9:.,]+(Z|z|[+-][0-9:]+)")
MAX_TIME_CHARS = 40  # the longest ISO 8601 form with microseconds and an offset


def parse_iso_time(raw: str, field: str) -> datetime.datetime:
    """ISO 8601 with an offset (Z, +08:00, -0500), as UTC; 400 naming the field otherwise."""
    # An unencoded "+08:00" reaches us as " 08:00" (form decoding turns + into a space).
    text = re.sub(r" (\d\d(:?\d\d)?)$", r"+\1", raw)
    moment: datetime.datetime | None = None
    if len(text) <= MAX_TIME_CHARS and ISO_TIME_RE.fullmatch(text):
        try:
            moment = datetime.datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            moment = None
    if moment is None or moment.tzinfo is None:
        raise InvalidField(field, "must be an ISO 8601 date and time with an offset, e.g. 2026-11-28T14:00:00+08:00")
    try:
        return moment.astimezone(datetime.UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 has no UTC year
        raise InvalidField(field, "is out of range") from None
