"""The audit trail (SPEC §13): an append-only log of who saw or changed what, and when.

`AuditLog.record(...)` is the one way in: it stores one entry, journaled, through the batched
inserts of models/batching.py (concurrent actions share one insert_many) and returns once it is
stored, so a caller awaits it *before* it reports its action done. Nothing here updates or
deletes an entry (tests/test_audit.py greps the code for it); only retention (§15) may delete.

Adding an action is one line in ACTIONS. An entry:
`{"id", "at", "actor", "role", "action", "via" ("rest" | "ws" | "system"), "target", "outcome"}`.

Storage: `_id` (and `key`, the same string) is the entry's time (`time_key`: UTC, milliseconds)
followed by an ObjectId, so ids sort as time: newest-first paging, `since`/`until` and the cursor
are all one `key` range, exact to the millisecond on nx-27017 too. Each filter field has a
compound index with `key` (server/db.py; nx-27017 refuses `_id` in one), which nx-27017 uses
because every query names both fields and asks the field with `$eq` (a bare value it cannot
index). `user` (entries whose target concerns a user: its `user` or its `peer`) is two such
queries merged, never an `$or` (which nx-27017 answers by scanning).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import heapq
import re
from collections.abc import Mapping
from typing import Any, Protocol

from bson import ObjectId
from pymongo import DESCENDING, WriteConcern

from models import validation as v
from models.batching import BatchedInserts
from models.clock import iso, utcnow
from models.database import Database
from models.errors import Forbidden, InvalidField
from models.principal import Principal

# SPEC §13's actions. One line each; later issues add theirs here.
ACTIONS = frozenset(
    {
        "messages.read",
        "conversations.read",
        "marker.received",
        "marker.read",
        "file.read",
        "message.recalled",
        "message.edited",
        "message.history.read",
        "consultation.started",
        "consultation.ended",
        "group.created",
        "group.members_added",
        "group.member_removed",
        "access.denied",
        "export.created",
        "audit.read",
        "user.suspended",
        "user.reactivated",
        "user.tokens_revoked",
        "hold.created",
        "hold.released",
        "retention.purged",
    }
)
VIA = ("rest", "ws", "system")
OUTCOMES = ("ok", "denied")
TARGET_FIELDS = (
    "channel",
    "peer",
    "group",
    "user",
    "messageId",
    "fromSeq",
    "toSeq",
    "seq",
    "fileId",
    "consultationId",
    "holdId",  # hold.created / hold.released (SPEC §15)
    "purged",  # retention.purged: {"sm", "pm", "gm", "audit", "webhook", "files"} counts
)
# Query parameter -> the stored field it filters on (each has an index with key, server/db.py).
FILTER_FIELDS = {
    "actor": "actor",
    "action": "action",
    "channel": "target.channel",
    "peer": "target.peer",
    "group": "target.group",
}
QUERY_PARAMS = frozenset({*FILTER_FIELDS, "user", "since", "until", "limit", "cursor"})
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
ID_RE = re.compile(r"e\d{8}T\d{9}Z-[0-9a-f]{24}")


class AuditRecorder(Protocol):
    """What the domain modules need of the log (passed to their constructors)."""

    async def record(
        self,
        actor: str,
        role: str,
        action: str,
        via: str,
        target: Mapping[str, Any],
        outcome: str = "ok",
    ) -> None: ...


def entry_to_wire(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": doc["_id"],
        "at": iso(doc["at"]) if isinstance(doc["at"], datetime.datetime) else doc["at"],
        "actor": doc["actor"],
        "role": doc["role"],
        "action": doc["action"],
        "via": doc["via"],
        "target": doc.get("target", {}),
        "outcome": doc["outcome"],
    }


class AuditLog:
    def __init__(self, db: Database, write_concern: WriteConcern, *, enabled: bool = True):
        self._collection = db.get_collection("audit", write_concern=write_concern)
        self._inserts = BatchedInserts(self._collection)
        # Off only for the side-by-side benchmark (IM_AUDIT_ENABLED=false); on in every profile.
        self.enabled = enabled

    async def record(
        self,
        actor: str,
        role: str,
        action: str,
        via: str,
        target: Mapping[str, Any],
        outcome: str = "ok",
    ) -> None:
        """Store one entry (journaled) and return once it is stored.

        actor/role: who acted (a token's sub and role; "system" for the server itself); action: one
        of ACTIONS; via: "rest", "ws" or "system"; target: the SPEC §13 names that apply (None
        values are left out); outcome: "ok" or "denied".
        """
        if action not in ACTIONS or via not in VIA or outcome not in OUTCOMES:
            raise ValueError(f"audit entry: bad action/via/outcome {action!r}/{via!r}/{outcome!r}")
        if not self.enabled:
            return
        now = utcnow()
        entry_id = f"{time_key(now)}-{ObjectId()}"
        doc = {
            "_id": entry_id,
            # The id again, as an ordinary field: nx-27017 refuses _id inside a compound index.
            "key": entry_id,
            "at": now,
            "actor": actor,
            "role": role,
            "action": action,
            "via": via,
            "target": {k: target[k] for k in TARGET_FIELDS if target.get(k) is not None},
            "outcome": outcome,
        }
        await self._inserts.insert(doc)

    async def record_for(
        self, principal: Principal, action: str, via: str, target: Mapping[str, Any], outcome: str = "ok"
    ) -> None:
        """record(...) with the caller's id and role."""
        await self.record(principal.user_id, principal.role, action, via, target, outcome)

    async def query(self, principal: Principal, params: Mapping[str, str], via: str = "rest") -> dict[str, Any]:
        """GET /api/v1/audit (admin only): {"entries", "next"}, newest first; itself an audit.read entry."""
        if principal.role != "admin":
            raise Forbidden("only admin tokens may read the audit trail")
        filter_, user, limit = parse_query(params)
        if user is None:
            queries = [filter_]
        else:
            queries = [q for q in (_with(filter_, "target.user", user), _with(filter_, "target.peer", user)) if q]
        pages = [await self._collection.find(q).sort("key", DESCENDING).limit(limit + 1).to_list() for q in queries]
        merged: list[dict[str, Any]] = []
        seen: set[str] = set()
        for doc in heapq.merge(*pages, key=lambda d: d["_id"], reverse=True):
            if doc["_id"] not in seen:
                seen.add(doc["_id"])
                merged.append(doc)
        page = merged[:limit]
        more = len(merged) > limit
        await self.record_for(principal, "audit.read", via, _query_target(params), "ok")
        return {"entries": [entry_to_wire(d) for d in page], "next": format_cursor(page[-1]["_id"]) if more else None}


def _with(filter_: dict[str, Any], field: str, value: str) -> dict[str, Any] | None:
    """filter_ plus field == value; None when filter_ already asks field for another value."""
    if field in filter_ and filter_[field] != {"$eq": value}:
        return None
    return {**filter_, field: {"$eq": value}}


def _query_target(params: Mapping[str, str]) -> dict[str, Any]:
    """What an audit query asked about, in target names (its own entry)."""
    return {name: params.get(name) for name in ("user", "channel", "peer", "group")}


def time_key(moment: datetime.datetime) -> str:
    """A time as the sortable start of an entry id: e20261128T140000123Z (UTC, milliseconds).

    Not ISO 8601 on purpose: nx-27017 compares strings that look like dates as dates (whole
    seconds), which would break the millisecond order and the cursor.
    """
    utc = moment.astimezone(datetime.UTC)
    return f"e{utc:%Y%m%dT%H%M%S}{utc.microsecond // 1000:03d}Z"


def format_cursor(entry_id: str) -> str:
    return base64.urlsafe_b64encode(entry_id.encode()).decode().rstrip("=")


def parse_cursor(cursor: str) -> str:
    try:
        decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode() if len(cursor) < 100 else ""
    except (ValueError, binascii.Error, UnicodeDecodeError):
        decoded = ""
    if not ID_RE.fullmatch(decoded):
        raise InvalidField("cursor", "is not a cursor this server issued")
    return decoded


def parse_time(raw: str, field: str) -> datetime.datetime:
    """ISO 8601 with an offset, as UTC; 400 naming the field otherwise."""
    return v.parse_iso_time(raw, field)


def parse_query(params: Mapping[str, str]) -> tuple[dict[str, Any], str | None, int]:
    """(filter, user, limit) from the query string; 400 naming the field for anything bad."""
    for name in params:
        if name not in QUERY_PARAMS:
            raise InvalidField(name, f"is not a filter of the audit trail (use {', '.join(sorted(QUERY_PARAMS))})")
    wanted: dict[str, str] = {}
    for name, field in FILTER_FIELDS.items():
        if name in params:
            wanted[field] = v.check_id(params[name], name)  # a string, never "$..." (no operator injection)
    if "action" in wanted and wanted["action"] not in ACTIONS:
        raise InvalidField("action", f"must be one of {', '.join(sorted(ACTIONS))}")
    if wanted.get("target.channel", "pm") not in ("sm", "pm", "gm"):
        raise InvalidField("channel", "must be one of sm, pm, gm")
    # {"$eq": value}, not a bare value: nx-27017 compiles a bare equality to an array-aware
    # subquery that no index serves (so it walked the whole `key` range); $eq uses (field, key).
    # The same match on MongoDB. bench/s9_audit.py checks the plan with explain.
    filter_: dict[str, Any] = {field: {"$eq": value} for field, value in wanted.items()}
    user = v.check_id(params["user"], "user") if "user" in params else None
    # Always a key bound: nx-27017 uses a compound (field, key) index only when both are named.
    id_range: dict[str, str] = {"$gte": "e"}
    if "since" in params:
        id_range["$gte"] = time_key(parse_time(params["since"], "since"))
    if "until" in params:
        id_range["$lt"] = time_key(parse_time(params["until"], "until"))
    if "cursor" in params:
        after = parse_cursor(params["cursor"])
        id_range["$lt"] = min(after, id_range.get("$lt", after))
    filter_["key"] = id_range
    raw_limit = params.get("limit")
    if raw_limit is None:
        limit = DEFAULT_LIMIT
    elif re.fullmatch(r"[0-9]{1,6}", raw_limit) and int(raw_limit) >= 1:
        limit = min(int(raw_limit), MAX_LIMIT)
    else:
        raise InvalidField("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return filter_, user, limit


# Request fields (query, body, WebSocket frame) -> the target name an access.denied entry keeps.
ASKED_FIELDS = (
    ("user_id", "user"),
    ("user", "user"),
    ("from", "user"),
    ("peer", "peer"),
    ("to", "peer"),
    ("group", "group"),
    ("channel", "channel"),
    ("seq", "seq"),
    ("messageId", "messageId"),
    ("fileId", "fileId"),
    ("consultationId", "consultationId"),
)


def asked_target(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """What a refused request asked for, in target names: plain ids and seqs only (never content)."""
    target: dict[str, Any] = {}
    for source in sources:
        for field, name in ASKED_FIELDS:
            value = source.get(field)
            if name in target or value is None:
                continue
            if name == "channel" and value not in ("sm", "pm", "gm"):
                continue
            is_seq = name == "seq" and isinstance(value, int) and not isinstance(value, bool)
            is_id = isinstance(value, str) and 0 < len(value) <= v.MAX_ID_CHARS and not value.startswith("$")
            if is_seq or is_id:
                target[name] = value
    return target


async def record_denied(audit: AuditRecorder, principal: Principal, via: str, target: Mapping[str, Any]) -> None:
    """access.denied for a refusal (a 403, or the 404 hiding a forbidden file), before it is answered."""
    await audit.record(principal.user_id, principal.role, "access.denied", via, target, "denied")


async def record_messages_read(
    audit: AuditRecorder, principal: Principal, channel: str, query: Mapping[str, str], messages: list[dict[str, Any]]
) -> None:
    """messages.read for a REST page: one entry per conversation in it, with the seq range returned."""
    user = query.get("user_id") if channel != "gm" else None
    base = {"channel": channel, "user": user, "group": query.get("group") if channel == "gm" else None}
    ranges: dict[str, dict[str, Any]] = {}
    for message in messages:
        if channel == "pm":
            # A consultation event's from is its operator: its parties are doctor and patient.
            pair = ("doctor", "patient") if "doctor" in message else ("from", "to")
            peer = next((message.get(f) for f in pair if message.get(f) != user), user)
            key = str(peer)
        else:
            peer, key = None, ""
        entry = ranges.setdefault(key, {**base, "peer": peer, "fromSeq": message["seq"], "toSeq": message["seq"]})
        entry["fromSeq"] = min(entry["fromSeq"], message["seq"])
        entry["toSeq"] = max(entry["toSeq"], message["seq"])
    if not ranges:  # an empty page is still a read of what was asked
        ranges[""] = {**base, "peer": query.get("peer") if channel == "pm" else None}
    for target in ranges.values():
        await audit.record(principal.user_id, principal.role, "messages.read", "rest", target)
