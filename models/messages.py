"""Messages: validation, authorization, dense per-conversation seq, durable store, then publish.

The order of a send is the contract: validate → allocate seq and insert with a journaled write
concern → advance the conversation summary → publish to live sockets → acknowledge. A message is
never published or acknowledged before it is stored, and seq has no gaps because a seq exists only
once its message does (the unique (conv, seq) index turns a concurrent writer into a retry, never
into a hole).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, WriteConcern
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError

from models import validation as v
from models.audit import AuditRecorder, record_messages_read
from models.batching import ENCODING_ERRORS, BatchedInserts
from models.clock import iso, unix_ms, utcnow
from models.conversations import ConversationRef, ConversationStore
from models.database import Database
from models.errors import ClientMsgIdReused, DatabaseUnavailable, InvalidBody, InvalidField, NotAMember
from models.groups import GroupStore
from models.inflight import InFlight
from models.keyed_locks import KeyedLocks
from models.outbox import EventSink, NullSink
from models.principal import Principal, require_own_user
from models.recent import RecentIds

log = logging.getLogger(__name__)

DEFAULT_PAGE_LIMIT = 50
WINDOW_SLACK = 50  # extra documents read per batch for the boundary seconds (see _find_page)
MAX_WINDOW_BATCHES = 100
MAX_PAGE_LIMIT = 200
SEQ_RETRIES = 20
SEQ_CACHE_SIZE = 100_000
DATABASE_DOWN_HOLD_SECS = 1.0
# Stored field order for the wire; `conv` and `_id` are internal.
WIRE_FIELDS = (
    "channel",
    "from",
    "to",
    "group",
    "groupType",
    "at",
    "title",
    "summary",
    "contentType",
    "content",
    "seq",
    "createdAt",
    "clientMsgId",
    "event",
    "consultationId",
    "doctor",
    "patient",
    "members",
    # Recall and edit (SPEC §14; models/recall.py): on a notice, the message it is about and, in
    # pm, the conversation's two users (its `from` is the operator, who may be staff); on a
    # changed message, its state.
    "target",
    "parties",
    "recalled",
    "recalledAt",
    "recalledBy",
    "editedAt",
    "editedBy",
    "editCount",
)
# Times set by an update, not the insert: nx-27017 hands those back as text (models/clock.py).
CHANGE_TIME_FIELDS = ("recalledAt", "editedAt")
# What makes a repeated send the same request; `from` and `channel` are part of the key itself.
SAME_REQUEST_FIELDS = ("to", "group", "at", "title", "summary", "contentType", "content")
# The group event whose removed members still receive it (models/membership.py sends it).
EVENT_MEMBER_REMOVED = "group.member_removed"


def message_to_wire(doc: Mapping[str, Any]) -> dict[str, Any]:
    wire: dict[str, Any] = {"id": doc["_id"]}
    for field in WIRE_FIELDS:
        if field in doc:
            wire[field] = doc[field]
    wire["createdAt"] = iso(doc["createdAt"])
    for field in CHANGE_TIME_FIELDS:
        if field in wire:
            wire[field] = iso(wire[field])
    if "recalled" in wire:
        wire["recalled"] = bool(wire["recalled"])  # nx-27017 stores a $set True as 1
    return wire


def recipients_of(ref: ConversationRef, message: Mapping[str, Any], group_members: Sequence[str] = ()) -> list[str]:
    """Who receives a message, about to be stored (a Draft) or stored by another process (fan-out).

    pm: the conversation's pair, not from/to (a staff operator sends consultation events for the
    pair); sm: its `to`; gm: the group's members, plus for group.member_removed the members it
    removed (they hear of it, then nothing more from the group).
    """
    if ref.channel == "pm":
        return ref.pm_pair()
    if ref.channel == "sm":
        return [message["to"]]
    recipients = list(group_members)
    if message.get("event") == EVENT_MEMBER_REMOVED:
        recipients += message.get("members", [])
    return recipients


class Publisher(Protocol):
    """Delivers a stored message to live sockets (the hub)."""

    def publish_message(
        self, ref: ConversationRef, message: dict[str, Any], recipients: list[str], origin: object | None
    ) -> None: ...


@dataclasses.dataclass
class Draft:
    """A validated, authorized send waiting for its seq."""

    ref: ConversationRef
    fields: dict[str, Any]
    recipients: list[str]
    summary_members: list[str] | None  # who finds this conversation by membership (pm, sm)


class FileChecker(Protocol):
    async def check_attachable(self, file_id: str, sender: str) -> None: ...


class MessageService:
    def __init__(
        self,
        db: Database,
        write_concern: WriteConcern,
        conversations: ConversationStore,
        groups: GroupStore,
        publisher: Publisher,
        files: FileChecker,
        max_content_chars: int,
        on_stored: Callable[[str], None] | None = None,  # per stored message, its channel (metrics)
        events: EventSink | None = None,  # message.created, stored before the ack (SPEC §11)
        *,
        audit: AuditRecorder | None = None,  # messages.read (SPEC §13; list_messages is REST only)
    ):
        self._audit = audit
        self._events = events or NullSink()
        self._on_stored = on_stored
        self._db = db
        self._collections = {ch: db.get_collection(ch, write_concern=write_concern) for ch in ("sm", "pm", "gm")}
        self._inserts = {ch: BatchedInserts(collection) for ch, collection in self._collections.items()}
        self._conversations = conversations
        self._groups = groups
        self._publisher = publisher
        self._max_content_chars = max_content_chars
        self._conversation_locks = KeyedLocks()
        self._last_seq: OrderedDict[str, int] = OrderedDict()
        self._files = files
        self.inflight = InFlight()
        self._database_down_until = 0.0
        # Messages this process stored (and so published itself): the change-stream fan-out skips them.
        self.stored_ids = RecentIds()

    # ---- validation and authorization: one function per channel ------------------------------

    async def _check_content(self, fields: dict[str, Any], data: Mapping[str, Any], sender: str) -> None:
        content_type, content = v.parse_content(data, self._max_content_chars)
        fields["contentType"] = content_type
        fields["content"] = content
        if content_type in v.MEDIA_CONTENT_TYPES and v.FILE_ID_RE.match(content):
            await self._files.check_attachable(content, sender)
        client_msg_id = v.parse_client_msg_id(data)
        if client_msg_id is not None:
            fields["clientMsgId"] = client_msg_id

    async def draft_pm(self, principal: Principal, data: Mapping[str, Any]) -> Draft:
        sender = v.optional_id(data, "from") or principal.user_id
        principal.require_self_or_staff(sender, "from")
        to = v.require_id(data, "to")
        if to == sender:
            raise InvalidField("to", "must differ from the sender")
        fields: dict[str, Any] = {"channel": "pm", "from": sender, "to": to}
        await self._check_content(fields, data, sender)
        ref = ConversationRef.pm(sender, to)
        pair = recipients_of(ref, fields)
        return Draft(ref, fields, pair, pair)

    async def draft_gm(self, principal: Principal, data: Mapping[str, Any]) -> Draft:
        sender = v.optional_id(data, "from") or principal.user_id
        principal.require_self_or_staff(sender, "from")
        group_id = v.require_id(data, "group")
        group_type = v.optional_int(data, "groupType", allow_numeric_string=True, maximum=2**31)
        at = data.get("at")
        mentioned = None if at is None else v.parse_id_list(at, "at", max_items=v.MAX_AT_MEMBERS, allow_single=True)
        fields: dict[str, Any] = {"channel": "gm", "from": sender, "group": group_id}
        await self._check_content(fields, data, sender)
        group = await self._groups.get(group_id)
        if sender not in group["members"]:
            raise NotAMember(f"from: {sender!r} is not a member of group {group_id!r}")
        if group_type is not None and group_type != group["groupType"]:
            raise InvalidField("groupType", f"does not match the group's type {group['groupType']}")
        fields["groupType"] = group["groupType"]
        if mentioned is not None:
            strangers = [m for m in mentioned if m not in group["members"]]
            if strangers:
                raise InvalidField("at", f"{strangers[0]!r} is not a member of the group")
            fields["at"] = mentioned
        # Keep the original field order of the wire format.
        ordered = {k: fields[k] for k in WIRE_FIELDS if k in fields}
        ref = ConversationRef.gm(group_id)
        return Draft(ref, ordered, recipients_of(ref, ordered, group["members"]), None)

    async def draft_sm(self, principal: Principal, data: Mapping[str, Any]) -> Draft:
        principal.require_staff("send system messages")
        to = v.require_id(data, "to")
        fields: dict[str, Any] = {"channel": "sm", "from": principal.user_id, "to": to}
        fields["title"] = v.parse_text(data, "title", max_chars=v.MAX_TITLE_CHARS)
        fields["summary"] = v.parse_text(data, "summary", max_chars=v.MAX_SUMMARY_CHARS, required=False) or ""
        await self._check_content(fields, data, principal.user_id)
        ref = ConversationRef.sm(to)
        recipient = recipients_of(ref, fields)
        return Draft(ref, fields, recipient, recipient)

    # ---- storing ------------------------------------------------------------------------------

    async def send(self, draft: Draft, origin: object | None = None) -> tuple[dict[str, Any], bool]:
        """Store and publish; returns (message, created). A repeated clientMsgId returns the original."""
        with self.inflight.track():
            try:
                return await self._send(draft, origin)
            except ConnectionFailure:
                self._database_down_until = time.monotonic() + DATABASE_DOWN_HOLD_SECS
                raise

    def _check_database(self) -> None:
        """Fail fast while the database was just found unreachable, instead of every queued send
        waiting out its own timeout."""
        if time.monotonic() < self._database_down_until:
            raise DatabaseUnavailable()

    async def _send(self, draft: Draft, origin: object | None) -> tuple[dict[str, Any], bool]:
        ref = draft.ref
        inserts = self._inserts[ref.channel]
        self._check_database()
        async with self._conversation_locks.hold(ref.key):
            self._check_database()
            for _attempt in range(SEQ_RETRIES):
                seq = await self._next_seq(ref)
                created = utcnow()
                # createdMs: the same time as a number, what the retention purge walks by
                # (models/retention.py; nx-27017 compares dates without its index).
                doc = {"_id": str(ObjectId()), "conv": ref.conv, **draft.fields, "seq": seq}
                doc.update(createdAt=created, createdMs=unix_ms(created))
                hook = self._events.message_fields(doc["_id"])  # its message.created is stored with it
                doc.update(hook)
                # Known as this process's own before it is sent: the change stream can hand the
                # insert back (server/fanout.py) before its reply arrives here, and it would go
                # to the sender's own socket as someone else's message.
                self.stored_ids.add(doc["_id"])
                try:
                    await inserts.insert(doc)
                except DuplicateKeyError:
                    if hook:
                        self._events.message_not_stored(doc["_id"])
                    original = await self._find_by_client_msg_id(draft)
                    if original is not None:
                        _check_same_request(original, draft)
                        wire = message_to_wire(original)
                        await self._events.message_created(ref.channel, wire, {})  # its event is stored
                        # A retry: finish what the first attempt may not have (summary, a group
                        # sender's own seq, delivery); repeating them is harmless and sockets
                        # drop what they have.
                        await self._conversations.record_message(ref, original, draft.summary_members)
                        await self._conversations.record_own_message(ref, original, draft.recipients)
                        self._publisher.publish_message(ref, wire, draft.recipients, origin)
                        return wire, False
                    self._last_seq.pop(ref.key, None)  # another process took this seq: reload
                    continue
                except ENCODING_ERRORS:
                    if hook:
                        self._events.message_not_stored(doc["_id"])
                    # Validation rejects what BSON cannot hold; this is the backstop: a 400, not a 500.
                    raise InvalidBody("body: holds text that cannot be stored (not valid Unicode)") from None
                except PyMongoError:
                    self._last_seq.pop(ref.key, None)  # unknown outcome: reload next time
                    raise
                self._remember_seq(ref.key, seq)
                if self._on_stored is not None:
                    self._on_stored(ref.channel)
                await self._conversations.record_message(ref, doc, draft.summary_members)
                # A group sender's own seq (pm/sm keep theirs in the summary): exact unread counts.
                await self._conversations.record_own_message(ref, doc, draft.recipients)
                wire = message_to_wire(doc)
                await self._events.message_created(ref.channel, wire, hook)  # before publish/ack
                # Published inside the lock so every socket sees a conversation in seq order.
                self._publisher.publish_message(ref, wire, draft.recipients, origin)
                return wire, True
        raise RuntimeError(f"could not allocate a seq for {ref.key} after {SEQ_RETRIES} attempts")

    async def _find_by_client_msg_id(self, draft: Draft) -> dict[str, Any] | None:
        """The stored message holding the draft's idempotency key: a system event's eventKey, or
        the sender's clientMsgId (two key spaces, so no client can pre-claim an event's key)."""
        collection = self._collections[draft.ref.channel]
        event_key = draft.fields.get("eventKey")
        if event_key is not None:
            return await collection.find_one({"eventKey": event_key})
        client_msg_id = draft.fields.get("clientMsgId")
        if client_msg_id is None:
            return None
        return await collection.find_one({"from": draft.fields["from"], "clientMsgId": client_msg_id})

    async def _next_seq(self, ref: ConversationRef) -> int:
        last = self._last_seq.get(ref.key)
        if last is None:
            newest = await self._collections[ref.channel].find_one(
                {"conv": ref.conv}, {"seq": 1}, sort=[("seq", DESCENDING)]
            )
            last = newest["seq"] if newest else 0
        return last + 1

    def _remember_seq(self, key: str, seq: int) -> None:
        self._last_seq[key] = seq
        self._last_seq.move_to_end(key)
        if len(self._last_seq) > SEQ_CACHE_SIZE:
            self._last_seq.popitem(last=False)

    # ---- reading ------------------------------------------------------------------------------

    async def list_messages(self, principal: Principal, channel: str, query: Mapping[str, str]) -> dict[str, Any]:
        """A page of messages, oldest first: {"messages": [...], "next": cursor or None}; audited
        (messages.read, one entry per conversation of the page with the seq range returned)."""
        page = await self._list_messages(principal, channel, query)
        if self._audit is not None:
            await record_messages_read(self._audit, principal, channel, query, page["messages"])
        return page

    async def _list_messages(self, principal: Principal, channel: str, query: Mapping[str, str]) -> dict[str, Any]:
        limit = parse_limit(query.get("limit"))
        created = _created_at_filter(query)
        ref: ConversationRef | None = None
        convs: list[str] = []
        if channel == "gm":
            group_id = v.check_id(query.get("group"), "group") if "group" in query else None
            if group_id is None:
                raise InvalidField("group", "is required")
            await self._groups.get_as_member(group_id, principal)
            ref = ConversationRef.gm(group_id)
        else:
            user = require_own_user(principal, query)
            if channel == "sm":
                ref = ConversationRef.sm(user)
            elif "peer" in query:
                ref = ConversationRef.pm(user, v.check_id(query.get("peer"), "peer"))
            else:
                summaries = await self._conversations.find_summaries(user, [])
                convs = [s["conv"] for s in summaries if s["channel"] == "pm"]

        if ref is not None:
            return await self._page_of_conversation(ref, query, limit, created)
        for bound in ("after", "before"):
            if bound in query:
                raise InvalidField(bound, "needs one conversation: give peer")
        return await self._page_across(convs, query.get("cursor"), limit, created)

    async def _page_of_conversation(
        self, ref: ConversationRef, query: Mapping[str, str], limit: int, created: dict[str, datetime.datetime]
    ) -> dict[str, Any]:
        after = _optional_seq(query, "after")
        before = _optional_seq(query, "before")
        cursor = query.get("cursor")
        if cursor is not None:
            match = re.fullmatch(r"([ab])([0-9]{1,16})", cursor)
            if not match:
                raise InvalidField("cursor", "is not a cursor this server issued")
            if match.group(1) == "a":
                after = int(match.group(2))
            else:
                before = int(match.group(2))
        seq_filter: dict[str, int] = {}
        if after is not None:
            seq_filter["$gt"] = after
        if before is not None:
            seq_filter["$lt"] = before
        filter_: dict[str, Any] = {"conv": ref.conv}
        if seq_filter:
            filter_["seq"] = seq_filter
        backwards = before is not None and after is None
        docs = await self._find_page(
            ref.channel, filter_, "seq", DESCENDING if backwards else ASCENDING, limit + 1, created
        )
        more = len(docs) > limit
        docs = docs[:limit]
        if backwards:
            docs.reverse()
        next_cursor = None
        if more and docs:
            next_cursor = f"b{docs[0]['seq']}" if backwards else f"a{docs[-1]['seq']}"
        return {"messages": [message_to_wire(d) for d in docs], "next": next_cursor}

    async def _page_across(
        self, convs: list[str], cursor: str | None, limit: int, created: dict[str, datetime.datetime]
    ) -> dict[str, Any]:
        """Several conversations at once, ordered by id (ids grow with time)."""
        filter_: dict[str, Any] = {"conv": {"$in": convs}}
        if cursor is not None:
            if not re.fullmatch(r"i[0-9a-f]{24}", cursor):
                raise InvalidField("cursor", "is not a cursor this server issued")
            filter_["_id"] = {"$gt": cursor[1:]}
        if not convs:
            return {"messages": [], "next": None}
        docs = await self._find_page("pm", filter_, "_id", ASCENDING, limit + 1, created)
        more = len(docs) > limit
        docs = docs[:limit]
        return {
            "messages": [message_to_wire(d) for d in docs],
            "next": f"i{docs[-1]['_id']}" if more and docs else None,
        }

    async def _find_page(
        self,
        channel: str,
        filter_: dict[str, Any],
        order: str,
        direction: int,
        count: int,
        created: dict[str, datetime.datetime],
    ) -> list[dict[str, Any]]:
        """Up to count documents in order, within the since/until window when one is given.

        nx-27017 compares dates at whole seconds (SQLite's datetime() drops the fraction), so the
        database gets the window widened to whole seconds and the exact bounds are applied here;
        what the widening adds lies in the two boundary seconds, so this reads a little more
        than a page, continuing after the last document read if those filled a batch.
        """
        if not created:
            found = self._db[channel].find(filter_).sort(order, direction).limit(count)
            return [doc async for doc in found]
        kept: list[dict[str, Any]] = []
        batch_filter = dict(filter_)
        for _batch in range(MAX_WINDOW_BATCHES):
            wanted = count - len(kept) + WINDOW_SLACK
            query = {**batch_filter, "createdAt": _widen_to_seconds(created)}
            batch = [doc async for doc in self._db[channel].find(query).sort(order, direction).limit(wanted)]
            kept.extend(doc for doc in batch if _within(doc.get("createdAt"), created))
            if len(kept) >= count or len(batch) < wanted:
                break
            bound = dict(batch_filter.get(order, {}))
            bound["$gt" if direction == ASCENDING else "$lt"] = batch[-1][order]
            batch_filter[order] = bound
        return kept[:count]


def _check_same_request(original: Mapping[str, Any], draft: Draft) -> None:
    """A repeated clientMsgId is a retry only if it asks for the same message (Stripe's rule);
    otherwise the new message would be dropped silently: ClientMsgIdReused (409)."""
    if "eventKey" in draft.fields:
        return  # the server's own event, written again by a retry: always the same event
    # A message recalled or edited since (models/recall.py) no longer holds what was sent: its
    # conversation decides, and the retry gets the message as it now is.
    changed = bool(original.get("recalled") or original.get("editCount"))
    fields = ("to", "group") if changed else SAME_REQUEST_FIELDS
    if original.get("conv") != draft.ref.conv or any(
        original.get(field) != draft.fields.get(field) for field in fields
    ):
        raise ClientMsgIdReused(
            f"clientMsgId: {draft.fields['clientMsgId']!r} was already used for a different message "
            "(another recipient, group or content); use a new clientMsgId for a new message"
        )


def _widen_to_seconds(created: dict[str, datetime.datetime]) -> dict[str, datetime.datetime]:
    """The window rounded outwards to whole seconds (what nx-27017 compares exactly)."""
    widened = dict(created)
    if "$gte" in widened:
        widened["$gte"] = widened["$gte"].replace(microsecond=0)
    if "$lt" in widened and widened["$lt"].microsecond:
        widened["$lt"] = widened["$lt"].replace(microsecond=0) + datetime.timedelta(seconds=1)
    return widened


def _within(value: object, created: dict[str, datetime.datetime]) -> bool:
    if isinstance(value, str):  # nx-27017 hands back a date $set later as text (models/clock.py)
        value = datetime.datetime.fromisoformat(value)
    if not isinstance(value, datetime.datetime):
        return False
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return ("$gte" not in created or value >= created["$gte"]) and ("$lt" not in created or value < created["$lt"])


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE_LIMIT
    if not re.fullmatch(r"[0-9]{1,6}", raw) or int(raw) < 1:
        raise InvalidField("limit", f"must be an integer from 1 to {MAX_PAGE_LIMIT}")
    return min(int(raw), MAX_PAGE_LIMIT)


def _created_at_filter(query: Mapping[str, str]) -> dict[str, datetime.datetime]:
    """since (inclusive) / until (exclusive) as a createdAt range; {} when neither is given."""
    bounds: dict[str, datetime.datetime] = {}
    for field, operator in (("since", "$gte"), ("until", "$lt")):
        moment = _optional_time(query, field)
        if moment is not None:
            bounds[operator] = moment
    return bounds


def _optional_time(query: Mapping[str, str], field: str) -> datetime.datetime | None:
    """The query's ISO 8601 time field as UTC, or None when absent."""
    raw = query.get(field)
    return None if raw is None else v.parse_iso_time(raw, field)


def _optional_seq(query: Mapping[str, str], field: str) -> int | None:
    raw = query.get(field)
    if raw is None:
        return None
    if not re.fullmatch(r"[0-9]{1,16}", raw):
        raise InvalidField(field, "must be a non-negative integer seq")
    return int(raw)
