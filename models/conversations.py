"""Conversations: keys, per-conversation summaries, and per-user received/read cursors.

A conversation is the unordered pair of users (pm), the group (gm) or the recipient (sm). Its key
`conv` is stored on every message; `seq` counts within it. Receipts are cursors, not rows: one
document per (user, conversation) holding the highest received and read seq.

Real sizes (a doctor with 2,000 residents, groups of 5,000) shape what is stored where, so that
nothing a client reads costs O(conversations) or O(messages), and no message costs a write per
group member:

- A pm/sm summary carries, per party ("side" A = the lower id, B = the higher; sm: A only), its
  `activity<side>` sort key (the user, then the last message's time and the key: one single-field
  index pages a user's list newest first), `pending<side>` (set by every message, cleared once the
  party's received marker reaches lastSeq: the backlog finds news without reading every
  conversation), and mirrors of the party's markers (`received<side>`, `read<side>`) with
  `own<side>`, the party's own seqs above its read marker.
- unread = lastSeq - read - (own messages in (read, lastSeq]): exact without counting messages.
  For gm the own seqs sit on the sender's cursor, the only per-user write a group message costs.
  The own arrays keep the latest OWN_SEQS_KEPT seqs, so a party that sends for months without
  marking read does not grow the document every send rewrites; a full array means older own seqs
  may have been dropped, and that conversation's unread is counted from the messages instead.

nx-27017 (tests, development) uses single-field indexes only, answers `$or` and `$in` on ordinary
fields by scanning, and counts in Python; every query here is an equality, a range on one indexed
field, or `_id $in` (tests/test_indexes.py checks the plans).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pymongo import ASCENDING, DESCENDING, UpdateOne, WriteConcern
from pymongo.errors import DuplicateKeyError

from models.batching import BatchedUpdates
from models.clock import iso, utcnow
from models.database import Database

log = logging.getLogger(__name__)

# Separates a user id from the rest of a sort key; ids hold no control characters, so a range of
# keys starting with user + SEP holds exactly that user's conversations.
SEP = "\x01"
SEP_END = "\x02"
SIDES = ("A", "B")
MARKER_RETRIES = 2
# The own seqs an array keeps (the latest pushed). Enough that counting from the messages is rare:
# only a party with this many own messages above its read marker. (nx-27017 ignores $push's $sort,
# so the order is push order: a seq another process added late may outlive a larger one, and after
# a read the count may miss that one dropped seq until the next read passes it.)
OWN_SEQS_KEPT = 100
RECOUNTS_AT_ONCE = 8  # unread counted from the messages (full own arrays) in parallel, at most


def pm_conv(a: str, b: str) -> str:
    """The pm key of an unordered pair; length-prefixed so ids may contain any character."""
    low, high = sorted((a, b))
    return f"{len(low)}:{low}|{high}"


@dataclasses.dataclass(frozen=True)
class ConversationRef:
    channel: str
    conv: str

    @property
    def key(self) -> str:
        """Unique across channels: the _id of the summary document."""
        return f"{self.channel}:{self.conv}"

    @classmethod
    def from_key(cls, key: str) -> ConversationRef:
        channel, _, conv = key.partition(":")
        return cls(channel, conv)

    def pm_pair(self) -> list[str]:
        """The two users of a pm conversation, sorted (see pm_conv)."""
        length, _, rest = self.conv.partition(":")
        return [rest[: int(length)], rest[int(length) + 1 :]]

    def parties(self) -> list[str]:
        """Who the summary keeps per-party state for: the pm pair (sides A, B), the sm recipient."""
        if self.channel == "pm":
            return self.pm_pair()
        if self.channel == "sm":
            return [self.conv]
        return []  # a group: per-member state would cost a write per member per message

    def side_of(self, user: str) -> str | None:
        """ "A" or "B": where the summary keeps this party's state; None for groups and strangers."""
        for side, party in zip(SIDES, self.parties(), strict=False):
            if party == user:
                return side
        return None

    @classmethod
    def pm(cls, a: str, b: str) -> ConversationRef:
        return cls("pm", pm_conv(a, b))

    @classmethod
    def gm(cls, group: str) -> ConversationRef:
        return cls("gm", group)

    @classmethod
    def sm(cls, user: str) -> ConversationRef:
        return cls("sm", user)


class ConversationStore:
    def __init__(self, db: Database, write_concern: WriteConcern):
        self._summaries = db.conversations
        # Journaled like the messages: after a crash the summary must still point at them.
        self._summary_updates = BatchedUpdates(db.get_collection("conversations", write_concern=write_concern))
        self._summary_advances = BatchedUpdates(
            db.get_collection("conversations", write_concern=write_concern), report_newer=True
        )
        self._cursors = db.cursors
        self._db = db

    async def record_message(self, ref: ConversationRef, message: dict[str, Any], members: list[str] | None) -> None:
        """Advance the summary to this message; never moves it backwards (safe to repeat).

        Batched with other conversations' updates (models/batching.py): an upsert whose filter
        misses because the summary is already at or past this seq fails with a duplicate key,
        which counts as done — after the sender's own seq is added by a second, unconditional
        update: a summary already past this seq (another process stored a newer message first,
        or this is a repeat) must still learn it, or the sender's unread would count its own
        message. Only then: one document written per send, not two.

        The first update appends the own seq and trims the array to its latest OWN_SEQS_KEPT
        (repeat-safe: it only runs while lastSeq is below seq); the second, rare, adds it as a set
        member (repeat-safe itself; the next send trims).
        """
        seq = message["seq"]
        activity = activity_key(ref, message["createdAt"])
        on_insert: dict[str, Any] = {"channel": ref.channel, "conv": ref.conv}
        if members is not None:
            on_insert["members"] = members
        fields: dict[str, Any] = {
            "lastSeq": seq,
            "lastMessage": message,
            "updatedAt": message["createdAt"],
            "activityAt": activity,
        }
        own: dict[str, int] = {}
        for side, user in zip(SIDES, ref.parties(), strict=False):
            fields[f"activity{side}"] = f"{user}{SEP}{activity}"
            fields[f"pending{side}"] = user  # news for this party (cleared by its received marker)
            if user == message.get("from"):
                own[f"own{side}"] = seq
            else:
                # Created empty: nx-27017's $addToSet ignores a missing array (MongoDB creates it).
                on_insert[f"own{side}"] = []
        update: dict[str, Any] = {"$set": fields, "$setOnInsert": on_insert}
        if own:
            update["$push"] = {field: {"$each": [seq], "$slice": -OWN_SEQS_KEPT} for field in own}
        try:
            await self._summary_advances.update(
                UpdateOne({"_id": ref.key, "lastSeq": {"$lt": seq}}, update, upsert=True)
            )
        except DuplicateKeyError:
            if own:
                await self._summary_updates.update(UpdateOne({"_id": ref.key}, {"$addToSet": own}))

    async def record_own_message(
        self, ref: ConversationRef, message: Mapping[str, Any], recipients: Sequence[str]
    ) -> None:
        """A group message's sender (when a member) keeps its seq on its own cursor, for unread.

        pm and sm keep their parties' own seqs in the summary (record_message); a group cannot
        (one write per member), so only the sender's cursor is written.
        """
        sender = message.get("from")
        if ref.channel != "gm" or not isinstance(sender, str) or sender not in recipients:
            return
        push = {"$push": {"own": {"$each": [message["seq"]], "$slice": -OWN_SEQS_KEPT}}}
        key = {"user": sender, "channel": ref.channel, "conv": ref.conv}
        added = await self._cursors.update_one(key, push)
        if not added.matched_count:
            # A repeat (a retried send) pushes the seq again: harmless, count_unread counts
            # distinct seqs and the array stays bounded.
            await self._upsert_cursor(sender, ref, {**push, "$setOnInsert": {"received": 0, "read": 0}})

    async def show_changed_message(self, ref: ConversationRef, message: dict[str, Any]) -> None:
        """A recalled or edited message that is still the summary's lastMessage shows as it now is
        (SPEC §14); conditional, so a newer lastMessage is never replaced. Journaled."""
        await self._summary_updates.update(
            UpdateOne({"_id": ref.key, "lastMessage._id": {"$eq": message["_id"]}}, {"$set": {"lastMessage": message}})
        )

    async def get_summary(self, ref: ConversationRef) -> dict[str, Any] | None:
        return await self._summaries.find_one({"_id": ref.key})

    async def find_summaries(self, user: str, group_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The user's pm and sm summaries and those of the given groups (unordered)."""
        found = await self.find_recent(user, list(group_ids), before=None, limit=None)
        return found

    async def find_recent(
        self, user: str, group_ids: Sequence[str], *, before: str | None, limit: int | None
    ) -> list[dict[str, Any]]:
        """The user's summaries with activityAt < before, newest activity first, at most limit.

        Three index walks (the user's side A and side B keys, the groups by _id), each stopping
        after limit documents, merged here: O(page), not O(conversations), for pm and sm.
        """
        upper = f"{user}{SEP}{before}" if before is not None else f"{user}{SEP_END}"
        queries = []
        for side in SIDES:
            field = f"activity{side}"
            cursor = self._summaries.find({field: {"$gt": f"{user}{SEP}", "$lt": upper}}).sort(field, DESCENDING)
            queries.append(cursor if limit is None else cursor.limit(limit))
        if group_ids:
            filter_: dict[str, Any] = {"_id": {"$in": [ConversationRef.gm(g).key for g in group_ids]}}
            if before is not None:
                filter_["activityAt"] = {"$lt": before}
            cursor = self._summaries.find(filter_).sort("activityAt", DESCENDING)
            queries.append(cursor if limit is None else cursor.limit(limit))
        pages = await asyncio.gather(*(cursor.to_list() for cursor in queries))
        merged = sorted(
            (doc for page in pages for doc in page if "activityAt" in doc),
            key=lambda doc: doc["activityAt"],
            reverse=True,
        )
        return merged if limit is None else merged[:limit]

    async def find_pending(self, user: str) -> list[dict[str, Any]]:
        """pm/sm summaries with messages the user may not have received (O(news))."""
        pages = await asyncio.gather(
            *(
                self._summaries.find(
                    {f"pending{side}": user}, {"channel": 1, "conv": 1, "lastSeq": 1, "purgedSeq": 1}
                ).to_list()
                for side in SIDES
            )
        )
        return [doc for page in pages for doc in page]

    async def get_last_seqs(self, refs: Sequence[ConversationRef]) -> dict[str, int]:
        """lastSeq by conversation key, for the given conversations that have messages."""
        return {key: last for key, (last, _purged) in (await self.get_seq_ranges(refs)).items()}

    async def get_seq_ranges(self, refs: Sequence[ConversationRef]) -> dict[str, tuple[int, int]]:
        """(lastSeq, purgedSeq) by conversation key: purgedSeq is the highest seq retention deleted
        (models/retention.py; 0 when none), so what is left is seq purgedSeq + 1 .. lastSeq."""
        if not refs:
            return {}
        found = self._summaries.find({"_id": {"$in": [ref.key for ref in refs]}}, {"lastSeq": 1, "purgedSeq": 1})
        return {doc["_id"]: (doc["lastSeq"], doc.get("purgedSeq", 0)) async for doc in found}

    async def clear_pending(self, user: str, ref: ConversationRef, received: int) -> None:
        """Drop the user's news flag on a conversation it has received up to lastSeq."""
        side = ref.side_of(user)
        if side is not None:
            await self._summaries.update_one(
                {"_id": ref.key, "lastSeq": {"$lte": received}, f"pending{side}": user},
                {"$unset": {f"pending{side}": ""}},
            )

    async def get_cursors(self, user: str) -> dict[str, dict[str, Any]]:
        """All of a user's cursors keyed by conversation key."""
        found = self._cursors.find({"user": user}, {"_id": 0})
        return {f"{doc['channel']}:{doc['conv']}": doc async for doc in found}

    async def get_group_cursors(self, user: str, groups: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The user's cursors of the given groups, keyed by conversation key."""
        if not groups:
            return {}
        found = self._cursors.find({"user": user, "channel": "gm", "conv": {"$in": list(groups)}}, {"_id": 0})
        return {f"gm:{doc['conv']}": doc async for doc in found}

    async def move_cursor(self, user: str, ref: ConversationRef, seq: int, *, read: bool) -> dict[str, Any]:
        """Raise the received (and, for read, the read) marker to seq; markers never go back."""
        now = utcnow()
        update: dict[str, Any] = {"$max": {"received": seq}, "$setOnInsert": {}}
        if read:
            update["$max"]["read"] = seq
            update["$set"] = {"readAt": now}
            if ref.channel == "gm":
                update["$pull"] = {"own": {"$lte": seq}}  # no longer above the read marker
        else:
            update["$set"] = {"receivedAt": now}
        defaults = {"received": 0, "read": 0}
        update["$setOnInsert"] = {k: v for k, v in defaults.items() if k not in update["$max"]}
        if not update["$setOnInsert"]:
            del update["$setOnInsert"]
        doc = await self._upsert_cursor(user, ref, update)
        side = ref.side_of(user)
        if side is not None:
            await self._mirror_markers(user, ref, side, doc, read=read)
        return doc

    async def _upsert_cursor(self, user: str, ref: ConversationRef, update: dict[str, Any]) -> dict[str, Any]:
        key = {"user": user, "channel": ref.channel, "conv": ref.conv}
        for _attempt in range(MARKER_RETRIES):
            try:
                await self._cursors.update_one(key, update, upsert=True)
                break
            except DuplicateKeyError:
                continue  # two first-time upserts raced; the second attempt updates the winner
        doc = await self._cursors.find_one(key, {"_id": 0})
        assert doc is not None
        return doc

    async def _mirror_markers(
        self, user: str, ref: ConversationRef, side: str, cursor: Mapping[str, Any], *, read: bool
    ) -> None:
        """Copy a pm/sm party's markers (the cursor's, which never go back) into the summary."""
        received, read_seq = cursor.get("received", 0), cursor.get("read", 0)
        update: dict[str, Any] = {"$max": {f"received{side}": received, f"read{side}": read_seq}}
        if read:
            update["$pull"] = {f"own{side}": {"$lte": read_seq}}
        await self._summaries.update_one({"_id": ref.key}, update)
        # Conditional, so a message stored meanwhile (lastSeq above received) keeps the flag set.
        await self.clear_pending(user, ref, received)

    async def unread_counts(
        self, user: str, summaries: Sequence[Mapping[str, Any]], group_cursors: Mapping[str, Mapping[str, Any]]
    ) -> list[int]:
        """The user's unread in each of these conversations (group_cursors: get_group_cursors).

        From the own seqs alone unless an array is full (older ones may have been dropped, see
        OWN_SEQS_KEPT): those few conversations count the user's messages above its read marker.
        Messages retention deleted (up to purgedSeq) are not waiting to be read.
        """
        counts: list[int] = []
        recount: list[tuple[int, ConversationRef, int, int]] = []
        for index, summary in enumerate(summaries):
            ref = ConversationRef(summary["channel"], summary["conv"])
            _received, read, own = party_markers(user, ref, summary, group_cursors)
            last_seq = summary["lastSeq"]
            read = max(read, summary.get("purgedSeq", 0))
            counts.append(count_unread(last_seq, read, own))
            if len(own) >= OWN_SEQS_KEPT and read < last_seq:
                recount.append((index, ref, last_seq, read))
        # A few at a time: a push badge sums every conversation of the user, and a doctor who never
        # marks read may have many full arrays; the pool is shared with every send.
        for start in range(0, len(recount), RECOUNTS_AT_ONCE):
            chunk = recount[start : start + RECOUNTS_AT_ONCE]
            found = await asyncio.gather(*(self._count_from_messages(user, *item[1:]) for item in chunk))
            for (index, *_rest), count in zip(chunk, found, strict=True):
                counts[index] = count
        return counts

    async def _count_from_messages(self, user: str, ref: ConversationRef, last_seq: int, read: int) -> int:
        own_above = await self._db[ref.channel].count_documents(
            {"conv": ref.conv, "seq": {"$gt": read, "$lte": last_seq}, "from": user}
        )
        return max(0, last_seq - read - own_above)

    async def messages_after(
        self, ref: ConversationRef, after_seq: int, limit: int, before_seq: int | None = None
    ) -> list[dict[str, Any]]:
        seq_range: dict[str, int] = {"$gt": after_seq}
        if before_seq is not None:
            seq_range["$lt"] = before_seq
        found = self._db[ref.channel].find({"conv": ref.conv, "seq": seq_range})
        return [doc async for doc in found.sort("seq", ASCENDING).limit(limit)]

    async def upgrade_summaries(self) -> int:
        """Give summaries written before the per-party fields existed their sort keys, news flags,
        marker mirrors and own seqs (once; later starts find none). Returns how many."""
        upgraded = 0
        async for summary in self._summaries.find({"activityAt": {"$exists": False}, "lastSeq": {"$gt": 0}}):
            ref = ConversationRef(summary["channel"], summary["conv"])
            await self._upgrade_summary(ref, summary)
            upgraded += 1
        if upgraded:
            log.info("upgraded %d conversation summaries", upgraded)
        return upgraded

    async def _upgrade_summary(self, ref: ConversationRef, summary: dict[str, Any]) -> None:
        last_seq = summary["lastSeq"]
        created = summary["lastMessage"]["createdAt"]
        if isinstance(created, str):
            created = datetime.datetime.fromisoformat(created).replace(tzinfo=datetime.UTC)
        activity = activity_key(ref, created)
        fields: dict[str, Any] = {"activityAt": activity}
        markers: dict[str, dict[str, Any]] = {}
        for side, user in zip(SIDES, ref.parties(), strict=False):
            cursor = await self._cursors.find_one({"user": user, "channel": ref.channel, "conv": ref.conv}) or {}
            markers[user] = cursor
            fields[f"activity{side}"] = f"{user}{SEP}{activity}"
            fields[f"received{side}"] = cursor.get("received", 0)
            fields[f"read{side}"] = cursor.get("read", 0)
            if cursor.get("received", 0) < last_seq:
                fields[f"pending{side}"] = user
        if ref.channel == "gm":
            markers = {doc["user"]: doc async for doc in self._cursors.find({"channel": "gm", "conv": ref.conv})}
        own: dict[str, list[int]] = {}
        lowest_read = min((m.get("read", 0) for m in markers.values()), default=0) if ref.channel != "gm" else 0
        async for doc in self._db[ref.channel].find(
            {"conv": ref.conv, "seq": {"$gt": lowest_read}}, {"from": 1, "seq": 1}
        ):
            sender = doc.get("from")
            if isinstance(sender, str) and (sender in markers or ref.channel == "gm"):
                own.setdefault(sender, []).append(doc["seq"])
        for side, user in zip(SIDES, ref.parties(), strict=False):
            fields[f"own{side}"] = sorted(s for s in own.get(user, []) if s > fields[f"read{side}"])[-OWN_SEQS_KEPT:]
        await self._summaries.update_one({"_id": ref.key}, {"$set": fields})
        if ref.channel == "gm":
            for sender, seqs in own.items():
                read_seq = markers.get(sender, {}).get("read", 0)
                above = sorted(s for s in seqs if s > read_seq)
                if above:
                    await self._upsert_cursor(
                        sender,
                        ref,
                        {
                            "$push": {"own": {"$each": above, "$slice": -OWN_SEQS_KEPT}},
                            "$setOnInsert": {"received": 0, "read": 0},
                        },
                    )


def activity_key(ref: ConversationRef, created_at: datetime.datetime) -> str:
    """Sorts conversations by their last message's time (ISO 8601 sorts as time), then key."""
    return f"{iso(created_at)}{SEP}{ref.key}"


def party_markers(
    user: str, ref: ConversationRef, summary: Mapping[str, Any], group_cursors: Mapping[str, Mapping[str, Any]]
) -> tuple[int, int, list[int]]:
    """(received, read, own seqs) of the user in a conversation: the summary's mirrors for a pm/sm
    party, the user's cursor (from get_group_cursors) for a group."""
    side = ref.side_of(user)
    if side is not None:
        return summary.get(f"received{side}", 0), summary.get(f"read{side}", 0), summary.get(f"own{side}", [])
    marker = group_cursors.get(ref.key, {})
    return marker.get("received", 0), marker.get("read", 0), marker.get("own", [])


def count_unread(last_seq: int, read: int, own: Iterable[int]) -> int:
    """Messages from others above the read marker: all above it, less the reader's own there."""
    own_above = sum(1 for seq in set(own) if read < seq <= last_seq)
    return max(0, last_seq - read - own_above)
