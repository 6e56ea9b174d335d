"""Recall and edit, with the original kept for the record (SPEC §14).

A change rewrites the stored message itself, so every list, backlog, conversation summary and
export shows it as it now is: recalled → `recalled`, `recalledAt`, `recalledBy`, `content` ""; edited
→ the new `content` (and `contentType`), `editedAt`, `editedBy`, `editCount`. What it was is kept in
`message_versions`, one document per version (`created`, each `edited`, `recalled`), journaled before
the answer. Then a notice is appended to the same conversation through the ordinary send path
(models/messages.py: its own seq, the change stream, the backlog), with `event` `message.recalled`
/ `message.edited`, `target` = the message id, `from` = the operator and, for an edit, the new
content, so connected, offline and other-process clients converge on the same view.

Concurrency: changes of one message are serialised per process (KeyedLocks) and made with
conditional updates across processes: an edit applies only while the message is not recalled and
still has the editCount it read; a recall applies only while not recalled, and empties the
content whatever edit came first. So a recall racing an edit ends recalled and empty, never
recalled with new content. Edit notices carry the edited content; a recall empties them too (and an
edit whose notice lands after a recall empties it again), so no copy of recalled text stays in a
conversation.

Idempotency: a repeated recall changes nothing and answers the message; an edit repeated with the
same operator and clientMsgId changes nothing (another edit under that clientMsgId is 409
client_msg_id_reused, as for sends). A repeat also finishes what a crashed first attempt may have
left undone (the version, the notice, the event): each is keyed, so doing it again stores nothing new.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pymongo import ReturnDocument, WriteConcern
from pymongo.errors import DuplicateKeyError

from models import validation as v
from models.audit import AuditRecorder
from models.clock import iso, utcnow
from models.conversations import ConversationRef, ConversationStore
from models.database import Database
from models.errors import (
    ClientMsgIdReused,
    Forbidden,
    InvalidField,
    MessageBusy,
    MessageRecalled,
    NotEditable,
    NotFound,
    WindowExpired,
)
from models.groups import GroupStore
from models.keyed_locks import KeyedLocks
from models.messages import WIRE_FIELDS, Draft, FileChecker, MessageService, message_to_wire, recipients_of
from models.outbox import EventSink, NullSink
from models.principal import Principal
from models.throttling import ActionLimiter

log = logging.getLogger(__name__)

EVENT_RECALLED = "message.recalled"
EVENT_EDITED = "message.edited"
VERSIONS_COLLECTION = "message_versions"
CHANNELS = ("sm", "pm", "gm")
MAX_REASON_CHARS = 1000
EDIT_ATTEMPTS = 20  # conditional updates retried while other processes edit the same message
# A version's place in the history: created 0, the n-th edit n, the recall last of all.
CREATED_ORDER = 0
RECALLED_ORDER = 2**31
# Titles of the notices in sm conversations (an sm message always has one).
NOTICE_TITLES = {EVENT_RECALLED: "Message recalled", EVENT_EDITED: "Message edited"}


@dataclasses.dataclass(frozen=True)
class ChangeWindows:
    """[messages]: how long after sending a sender may recall / edit (service and admin: always)."""

    recall_secs: float
    edit_secs: float


def as_datetime(value: object) -> datetime.datetime:
    """A stored time as an aware datetime (nx-27017 hands dates set by $set back as text)."""
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    assert isinstance(value, datetime.datetime), value
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def is_recalled(doc: Mapping[str, Any]) -> bool:
    return bool(doc.get("recalled"))


def version_to_wire(doc: Mapping[str, Any]) -> dict[str, Any]:
    wire = {
        "action": doc["action"],
        "content": doc["content"],
        "contentType": doc["contentType"],
        "at": iso(doc["at"]),
        "by": doc["by"],
    }
    if doc.get("reason"):
        wire["reason"] = doc["reason"]
    return wire


class MessageChanges:
    """recall / edit / history of stored messages; REST and WebSocket reach it through server/chat.py."""

    def __init__(
        self,
        db: Database,
        write_concern: WriteConcern,
        messages: MessageService,
        conversations: ConversationStore,
        groups: GroupStore,
        files: FileChecker,
        limiter: ActionLimiter,  # a change posts a notice: it costs one message of the send budget
        windows: ChangeWindows,
        max_content_chars: int,
        *,
        audit: AuditRecorder,  # message.recalled / message.edited / message.history.read (SPEC §13)
        events: EventSink | None = None,  # message.recalled / message.edited (SPEC §11)
        clock: Callable[[], datetime.datetime] = utcnow,
    ):
        self._collections = {ch: db.get_collection(ch, write_concern=write_concern) for ch in CHANNELS}
        self._versions = db.get_collection(VERSIONS_COLLECTION, write_concern=write_concern)
        self._messages = messages
        self._conversations = conversations
        self._groups = groups
        self._files = files
        self._limiter = limiter
        self._windows = windows
        self._max_content_chars = max_content_chars
        self._audit = audit
        self._events = events or NullSink()
        self._clock = clock
        self._locks = KeyedLocks()

    # ---- recall -------------------------------------------------------------------------------

    async def recall(
        self, principal: Principal, channel: str, message_id: object, data: Mapping[str, Any], via: str = "rest"
    ) -> dict[str, Any]:
        """Recall a message: content emptied, marked recalled; the changed message (SPEC §14)."""
        operator = self._operator(principal, data)
        reason = v.parse_text(data, "reason", max_chars=MAX_REASON_CHARS, required=False)
        doc = await self._get(channel, message_id)
        self._authorize(principal, doc, "recall")
        async with self._locks.hold(doc["_id"]):
            doc = await self._get(channel, doc["_id"])
            if is_recalled(doc):
                await self._finish_recall(doc, None)  # a repeat: nothing changes (see the module doc)
                return message_to_wire(doc)
            if not principal.is_staff:
                self._check_window(doc, self._windows.recall_secs, "recall")
            self._limiter.check(principal.user_id)
            await self._keep_original(doc)
            now = self._clock()
            changed = await self._collections[channel].find_one_and_update(
                # $exists, not $ne: nx-27017's updates do not match a missing field with $ne.
                {"_id": doc["_id"], "recalled": {"$exists": False}},
                {"$set": {"recalled": True, "recalledAt": now, "recalledBy": operator, "content": ""}},
                return_document=ReturnDocument.AFTER,
            )
            if changed is None:  # another process recalled it meanwhile: the same end state
                doc = await self._get(channel, doc["_id"])
                await self._finish_recall(doc, None)
                return message_to_wire(doc)
            await self._store_recall_version(changed, reason)
            await self._audit.record(principal.user_id, principal.role, EVENT_RECALLED, via, self._target(changed))
            await self._complete_recall(changed)
            log.info("message %s (%s) recalled by %s", changed["_id"], channel, operator)
            return message_to_wire(changed)

    async def _finish_recall(self, doc: dict[str, Any], reason: str | None) -> None:
        """Everything after the update, safe to repeat (see the module doc)."""
        await self._store_recall_version(doc, reason)
        await self._complete_recall(doc)

    async def _store_recall_version(self, doc: dict[str, Any], reason: str | None) -> None:
        operator = doc.get("recalledBy") or doc["from"]
        at = as_datetime(doc["recalledAt"])
        await self._store_version(doc, "recalled", RECALLED_ORDER, "", doc["contentType"], at, operator, None, reason)

    async def _complete_recall(self, doc: dict[str, Any]) -> None:
        """No recalled text left in edit notices or the summary; then the event and the notice."""
        operator = doc.get("recalledBy") or doc["from"]
        await self._empty_edit_notices(doc)
        ref = ConversationRef(doc["channel"], doc["conv"])
        await self._conversations.show_changed_message(ref, doc)
        wire = message_to_wire(doc)
        await self._events.emit(EVENT_RECALLED, {"message": wire, "by": operator}, event_id=f"{doc['_id']}.recalled")
        await self._send_notice(doc, operator, EVENT_RECALLED, 1, f"{operator} recalled a message", "")

    async def _empty_edit_notices(self, doc: Mapping[str, Any]) -> None:
        """Edit notices carry the edited text: once the message is recalled, they carry nothing."""
        # $eq: nx-27017 serves it from the single-field index (server/db.py notice_target).
        collection = self._collections[doc["channel"]]
        await collection.update_many(
            {"target": {"$eq": doc["_id"]}, "event": {"$eq": EVENT_EDITED}},
            {"$set": {"content": "", "recalled": True}},
        )
        # The summary keeps a copy of its newest message: an edit notice stored after the recall
        # notice (a race between processes) is that copy.
        ref = ConversationRef(doc["channel"], doc["conv"])
        last = ((await self._conversations.get_summary(ref)) or {}).get("lastMessage") or {}
        if last.get("target") == doc["_id"] and last.get("event") == EVENT_EDITED:
            emptied = await collection.find_one({"_id": last["_id"]})
            if emptied is not None:
                await self._conversations.show_changed_message(ref, emptied)

    # ---- edit ---------------------------------------------------------------------------------

    async def edit(
        self, principal: Principal, channel: str, message_id: object, data: Mapping[str, Any], via: str = "rest"
    ) -> dict[str, Any]:
        """Replace a message's content (and contentType); the changed message (SPEC §14)."""
        operator = self._operator(principal, data)
        client_msg_id = v.parse_client_msg_id(data)
        if data.get("content") is None:
            raise InvalidField("content", "is required")
        doc = await self._get(channel, message_id)
        self._authorize(principal, doc, "edit")
        async with self._locks.hold(doc["_id"]):
            doc = await self._get(channel, doc["_id"])
            if is_recalled(doc):
                raise MessageRecalled(f"id: message {doc['_id']!r} has been recalled; it can no longer be edited")
            content_type, content = v.parse_content(
                {"contentType": data.get("contentType", doc["contentType"]), "content": data["content"]},
                self._max_content_chars,
            )
            if client_msg_id is not None and await self._is_repeat(doc, operator, client_msg_id, content_type, content):
                return message_to_wire(doc)
            if not principal.is_staff:
                self._check_window(doc, self._windows.edit_secs, "edit")
            if content_type in v.MEDIA_CONTENT_TYPES and v.FILE_ID_RE.match(content):
                await self._files.check_attachable(content, doc["from"])  # the message stays its sender's
            if content == doc["content"] and content_type == doc["contentType"]:
                return message_to_wire(doc)  # nothing to change: no version, no notice
            self._limiter.check(principal.user_id)
            await self._keep_original(doc)
            changed, now = await self._apply_edit(doc, operator, client_msg_id, content_type, content)
            count = changed["editCount"]
            await self._store_version(changed, "edited", count, content, content_type, now, operator, client_msg_id)
            await self._audit.record(principal.user_id, principal.role, EVENT_EDITED, via, self._target(changed))
            await self._finish_edit(changed)
            log.info("message %s (%s) edited by %s (edit %d)", changed["_id"], channel, operator, count)
            return message_to_wire(changed)

    async def _apply_edit(
        self, doc: dict[str, Any], operator: str, client_msg_id: str | None, content_type: int, content: str
    ) -> tuple[dict[str, Any], datetime.datetime]:
        """The conditional update: only while not recalled and still at the editCount read."""
        collection = self._collections[doc["channel"]]
        for _attempt in range(EDIT_ATTEMPTS):
            count = doc.get("editCount", 0)
            now = self._clock()
            fields: dict[str, Any] = {
                "content": content,
                "contentType": content_type,
                "editedAt": now,
                "editedBy": operator,
                # The latest edit's key, in the same write: a retry of it is found without the versions.
                "editClientMsgId": client_msg_id,
            }
            changed = await collection.find_one_and_update(
                {"_id": doc["_id"], "recalled": {"$exists": False}, "editCount": count or {"$exists": False}},
                {"$set": fields, "$inc": {"editCount": 1}},
                return_document=ReturnDocument.AFTER,
            )
            if changed is not None:
                return changed, now
            doc = await self._get(doc["channel"], doc["_id"])  # another process changed it meanwhile
            if is_recalled(doc):
                raise MessageRecalled(f"id: message {doc['_id']!r} has been recalled; it can no longer be edited")
        raise MessageBusy(f"id: message {doc['_id']!r} kept changing; retry")

    async def _finish_edit(self, doc: dict[str, Any]) -> None:
        """After the update, safe to repeat: the summary, the event, the notice."""
        count = doc["editCount"]
        operator = doc.get("editedBy") or doc["from"]
        ref = ConversationRef(doc["channel"], doc["conv"])
        await self._conversations.show_changed_message(ref, doc)
        wire = message_to_wire(doc)
        event_id = f"{doc['_id']}.edited.{count}"
        await self._events.emit(EVENT_EDITED, {"message": wire, "by": operator}, event_id=event_id)
        await self._send_notice(doc, operator, EVENT_EDITED, doc["contentType"], doc["content"], f":{count}")
        # A recall that landed between our update and our notice emptied the notices before ours.
        now = await self._collections[doc["channel"]].find_one({"_id": doc["_id"]}, {"recalled": 1})
        if now is not None and is_recalled(now):
            await self._empty_edit_notices(doc)

    async def _is_repeat(
        self, doc: dict[str, Any], operator: str, client_msg_id: str, content_type: int, content: str
    ) -> bool:
        """An edit already made by this operator with this clientMsgId: True (after finishing it,
        if it was the latest), ClientMsgIdReused if it asked for other content, False if new."""
        if doc.get("editClientMsgId") == client_msg_id and doc.get("editedBy") == operator:
            same = doc["content"] == content and doc["contentType"] == content_type
            if same:
                await self._store_version(
                    doc,
                    "edited",
                    doc["editCount"],
                    content,
                    content_type,
                    as_datetime(doc["editedAt"]),
                    operator,
                    client_msg_id,
                )
                await self._finish_edit(doc)
        else:
            found = await self._versions.find_one(
                {"messageId": {"$eq": doc["_id"]}, "clientMsgId": {"$eq": client_msg_id}, "by": {"$eq": operator}}
            )
            if found is None:
                return False
            same = found["content"] == content and found["contentType"] == content_type
        if not same:
            raise ClientMsgIdReused(
                f"clientMsgId: {client_msg_id!r} was already used for another edit of this message; "
                "use a new clientMsgId for a new edit"
            )
        return True

    # ---- history ------------------------------------------------------------------------------

    async def history(
        self, principal: Principal, channel: str, message_id: object, via: str = "rest"
    ) -> dict[str, Any]:
        """{"message", "versions"} oldest first (admin only); audited as message.history.read."""
        if principal.role != "admin":
            raise Forbidden("only admin tokens may read a message's history")
        doc = await self._get(channel, message_id)
        stored = {d["order"]: d async for d in self._versions.find({"messageId": {"$eq": doc["_id"]}})}
        # What a crash between an update and its version left out is still on the message itself.
        stored.setdefault(CREATED_ORDER, self._created_version(doc))
        count = doc.get("editCount", 0)
        if count and count not in stored and not is_recalled(doc):
            stored[count] = {
                "action": "edited",
                "content": doc["content"],
                "contentType": doc["contentType"],
                "at": doc["editedAt"],
                "by": doc.get("editedBy") or doc["from"],
            }
        if is_recalled(doc) and RECALLED_ORDER not in stored:
            stored[RECALLED_ORDER] = {
                "action": "recalled",
                "content": "",
                "contentType": doc["contentType"],
                "at": doc["recalledAt"],
                "by": doc.get("recalledBy") or doc["from"],
            }
        await self._audit.record(principal.user_id, principal.role, "message.history.read", via, self._target(doc))
        return {
            "message": message_to_wire(doc),
            "versions": [version_to_wire(stored[order]) for order in sorted(stored)],
        }

    # ---- the parts --------------------------------------------------------------------------------

    async def _get(self, channel: str, message_id: object) -> dict[str, Any]:
        if channel not in CHANNELS:
            raise InvalidField("channel", "must be one of sm, pm, gm")
        if not isinstance(message_id, str):
            raise InvalidField("id", "must be a message id (a string)")
        doc = None
        if v.OBJECT_ID_RE.match(message_id):  # anything else cannot exist (server-assigned ids)
            doc = await self._collections[channel].find_one({"_id": message_id})
        if doc is None:
            raise NotFound(f"id: no {channel} message {message_id!r}")
        return doc

    @staticmethod
    def _operator(principal: Principal, data: Mapping[str, Any]) -> str:
        """Staff name the operator (whom the notice is from); anyone else is the operator."""
        if principal.is_staff:
            return v.require_id(data, "operator")
        if data.get("operator") is not None and data["operator"] != principal.user_id:
            raise Forbidden("operator: only service or admin tokens may name another operator")
        return principal.user_id

    @staticmethod
    def _authorize(principal: Principal, doc: Mapping[str, Any], action: str) -> None:
        if not principal.is_staff and doc.get("from") != principal.user_id:
            raise Forbidden(f"only the message's sender (or service/admin) may {action} it")
        if doc.get("event"):
            raise NotEditable(f"id: {doc['_id']!r} is an event message ({doc['event']}); it cannot be changed")

    def _check_window(self, doc: Mapping[str, Any], window_secs: float, action: str) -> None:
        age = (self._clock() - as_datetime(doc["createdAt"])).total_seconds()
        if window_secs <= 0 or age > window_secs:
            raise WindowExpired(
                f"id: a message may be {action}ed by its sender within {window_secs:g} seconds of sending; "
                f"this one was sent {age:.0f} seconds ago"
            )

    @staticmethod
    def _created_version(doc: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "action": "created",
            "content": doc["content"],
            "contentType": doc["contentType"],
            "at": doc["createdAt"],
            "by": doc["from"],
        }

    async def _keep_original(self, doc: dict[str, Any]) -> None:
        """The message as sent, stored before its first change (unchanged messages cost nothing)."""
        if doc.get("editCount") or is_recalled(doc):
            return  # its first change stored it
        at, by = as_datetime(doc["createdAt"]), doc["from"]
        await self._store_version(doc, "created", CREATED_ORDER, doc["content"], doc["contentType"], at, by, None)

    async def _store_version(
        self,
        doc: Mapping[str, Any],
        action: str,
        order: int,
        content: str,
        content_type: int,
        at: datetime.datetime,
        by: str,
        client_msg_id: str | None,
        reason: str | None = None,
    ) -> None:
        """One version, journaled; its _id (message id and place) makes storing it again a no-op."""
        version: dict[str, Any] = {
            "_id": f"{doc['_id']}:{order}",
            "messageId": doc["_id"],
            "channel": doc["channel"],
            "conv": doc["conv"],
            "order": order,
            "action": action,
            "content": content,
            "contentType": content_type,
            "at": at,
            "by": by,
        }
        if client_msg_id is not None:
            version["clientMsgId"] = client_msg_id
        if reason:
            version["reason"] = reason
        try:
            await self._versions.insert_one(version)
        except DuplicateKeyError:
            return

    async def _send_notice(
        self, doc: Mapping[str, Any], operator: str, event: str, content_type: int, content: str, key_suffix: str
    ) -> None:
        """The notice in the message's conversation, through the ordinary send path (a new seq)."""
        channel = doc["channel"]
        ref = ConversationRef(channel, doc["conv"])
        fields: dict[str, Any] = {"channel": channel, "from": operator}
        members: list[str] = []
        if channel == "pm":
            pair = ref.pm_pair()
            # The party who is not the operator; with a staff operator, the message's recipient.
            fields["to"] = [p for p in pair if p != operator][0] if operator in pair else doc["to"]
            fields["parties"] = pair
        elif channel == "sm":
            fields["to"] = doc["to"]
            fields["title"] = NOTICE_TITLES[event]
            fields["summary"] = ""
        else:
            group = await self._groups.find(doc["group"])
            members = group["members"] if group else []
            fields["group"] = doc["group"]
            fields["groupType"] = doc.get("groupType", group["groupType"] if group else 0)
        fields.update({"contentType": content_type, "content": content, "event": event, "target": doc["_id"]})
        ordered = {k: fields[k] for k in WIRE_FIELDS if k in fields}
        # One notice per recall and per edit, however often the change is retried (SPEC §4's key
        # space of the server's own events, out of clients' reach).
        ordered["eventKey"] = f"{event}:{doc['_id']}{key_suffix}"
        recipients = recipients_of(ref, ordered, members)
        await self._messages.send(Draft(ref, ordered, recipients, recipients if channel != "gm" else None))

    @staticmethod
    def _target(doc: Mapping[str, Any]) -> dict[str, Any]:
        """The audit target of a change (SPEC §13 names)."""
        target: dict[str, Any] = {"channel": doc["channel"], "messageId": doc["_id"], "seq": doc["seq"]}
        if doc["channel"] == "pm":
            target.update({"user": doc["from"], "peer": doc.get("to")})
        elif doc["channel"] == "sm":
            target["user"] = doc.get("to")
        else:
            target.update({"group": doc.get("group"), "user": doc["from"]})
        return target
