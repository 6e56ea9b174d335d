"""The one AsyncMongoClient per process, start-up wait, and the indexes every query relies on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pymongo
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, WriteConcern, monitoring
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from models.database import Database
from server.config import Settings

log = logging.getLogger(__name__)

MESSAGE_COLLECTIONS = ("sm", "pm", "gm")
# Short timeouts: during an outage a request fails fast with 503 instead of hanging.
SERVER_SELECTION_TIMEOUT_MS = 2000
OPERATION_TIMEOUT_MS = 5000
HEALTH_CHECK_TIMEOUT_SECS = 1.0


def process_token() -> str:
    """Who holds a lease or a claim in the database: this host and process, and a random part
    (a restarted process with the same pid is someone else)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def create_client(
    settings: Settings, listeners: Sequence[monitoring.CommandListener] = ()
) -> AsyncMongoClient[dict[str, Any]]:
    """Build the client; it connects lazily on the running loop. `listeners`: metrics (server/metrics.py)."""
    return AsyncMongoClient(
        settings.mongo_uri,
        event_listeners=list(listeners),
        serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
        timeoutMS=OPERATION_TIMEOUT_MS,
        tz_aware=True,
        appname="im-server",
    )


def message_write_concern(settings: Settings) -> WriteConcern:
    """Journaled (and majority, where configured) writes before a message is acknowledged."""
    if settings.write_concern_w is not None:
        return WriteConcern(w=settings.write_concern_w, j=settings.write_concern_j)
    return WriteConcern(j=settings.write_concern_j)


async def wait_for_database(client: AsyncMongoClient[dict[str, Any]], timeout_secs: float) -> None:
    """Ping until the database answers; raise ConnectionFailure after timeout_secs."""
    deadline = time.monotonic() + timeout_secs
    attempt = 0
    while True:
        attempt += 1
        try:
            await client.admin.command("ping")
            return
        except ConnectionFailure as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("database not reachable yet (attempt %d): %s", attempt, exc)
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


async def is_database_healthy(db: Database) -> bool:
    try:
        with pymongo.timeout(HEALTH_CHECK_TIMEOUT_SECS):
            await db.command("ping")
        return True
    except PyMongoError:
        return False


async def ensure_indexes(db: Database) -> None:
    """Create every index the server needs; create_indexes is idempotent."""
    for name in MESSAGE_COLLECTIONS:
        await db[name].create_indexes(
            [
                # seq is dense per conversation; the unique index is what makes concurrent writers
                # from several processes safe (a loser retries with the next seq).
                IndexModel([("conv", ASCENDING), ("seq", ASCENDING)], unique=True, name="conv_seq"),
                # Redundant on MongoDB (conv_seq's prefix serves it), but the embedded nx-27017 uses a
                # compound index only when the query names every one of its fields (explain shows
                # conv_seq for conv + seq): without it a query on conv alone scans the collection.
                IndexModel([("conv", ASCENDING)], name="conv"),
                # For nx-27017: it cannot use the partial index below (its filter is not implied by
                # the query), so the idempotency lookup of a retried send scanned every message.
                IndexModel([("clientMsgId", ASCENDING)], name="client_msg_id", sparse=True),
                # Idempotent sends: one message per (sender, clientMsgId).
                IndexModel(
                    [("from", ASCENDING), ("clientMsgId", ASCENDING)],
                    unique=True,
                    name="sender_client_msg_id",
                    partialFilterExpression={"clientMsgId": {"$exists": True}},
                ),
                # Events the server writes itself (consultations): their own key space, out of clients' reach.
                IndexModel(
                    [("eventKey", ASCENDING)],
                    unique=True,
                    name="event_key",
                    partialFilterExpression={"eventKey": {"$exists": True}},
                ),
                # The notices about one message (models/recall.py: a recall empties its edit notices).
                IndexModel([("target", ASCENDING)], name="notice_target", sparse=True),
                # Who may read an attachment: messages whose content is the file id (models/files.py).
                IndexModel(
                    [("content", ASCENDING)],
                    name="media_content",
                    partialFilterExpression={"contentType": {"$gte": 2, "$lte": 3}},
                ),
            ]
        )
    await db.conversations.create_indexes(
        [
            IndexModel([("members", ASCENDING)], name="members"),
            # Per-party keys of pm/sm summaries (models/conversations.py): "<user>\x01<time>\x01<key>"
            # pages a user's conversation list newest first with one range per side; single-field,
            # so nx-27017 walks them too (a members + updatedAt compound it would not use).
            IndexModel([("activityA", ASCENDING)], name="activity_a", sparse=True),
            IndexModel([("activityB", ASCENDING)], name="activity_b", sparse=True),
            # Set while the party may have messages above its received marker: the backlog's O(news).
            IndexModel([("pendingA", ASCENDING)], name="pending_a", sparse=True),
            IndexModel([("pendingB", ASCENDING)], name="pending_b", sparse=True),
        ]
    )
    await db.cursors.create_indexes(
        [
            IndexModel(
                [("user", ASCENDING), ("channel", ASCENDING), ("conv", ASCENDING)],
                unique=True,
                name="user_conversation",
            ),
            IndexModel([("user", ASCENDING)], name="user"),  # for nx-27017, as above
        ]
    )
    await db.groups.create_indexes([IndexModel([("members", ASCENDING)], name="members")])
    # SPEC §14: a message's versions (models/recall.py); _id is "<message id>:<place>".
    await db.message_versions.create_indexes([IndexModel([("messageId", ASCENDING)], name="message_id")])
    await ensure_audit_indexes(db)
    await ensure_retention_indexes(db)
    await db.consultations.create_indexes(
        [
            IndexModel([("doctor", ASCENDING), ("startedAt", DESCENDING)], name="doctor_started"),
            IndexModel([("patient", ASCENDING), ("startedAt", DESCENDING)], name="patient_started"),
            IndexModel([("doctor", ASCENDING)], name="doctor"),  # for nx-27017, as above
            IndexModel([("patient", ASCENDING)], name="patient"),
            # One open consultation per (doctor, patient): models/consultations.open_key. The partial
            # filter spares documents stored before the field existed (MongoDB; nx-27017 ignores it).
            IndexModel(
                [("openKey", ASCENDING)],
                unique=True,
                name="open_key",
                partialFilterExpression={"openKey": {"$exists": True}},
            ),
        ]
    )


async def ensure_audit_indexes(db: Database) -> None:
    """SPEC §13: the audit filters and the marker history (models/audit.py, models/receipts.py).

    Audit ids (and `key`, the same string) sort as time, so each filter is a compound (field, key)
    index that serves the field, the since/until/cursor range and the newest-first order at once;
    nx-27017 uses a compound index only when the query names all its fields, and every audit query
    names key (models/audit.py); it refuses _id inside a compound index, hence key.
    """
    await db.audit.create_indexes(
        [IndexModel([("key", DESCENDING)], name="key")]
        + [
            IndexModel([(field, ASCENDING), ("key", DESCENDING)], name=f"{field.replace('.', '_')}_key")
            for field in ("actor", "action", "target.user", "target.peer", "target.group", "target.channel")
        ]
    )
    # The first move of a user's marker in a conversation that reaches a seq: one index walk.
    await db.marker_moves.create_indexes(
        [
            IndexModel(
                [("user", ASCENDING), ("conv", ASCENDING), ("kind", ASCENDING), ("to", ASCENDING)],
                name="user_conv_kind_to",
            )
        ]
    )
    # A group's membership notices up to a seq (members when a message was sent), per event.
    await db.gm.create_indexes(
        [
            IndexModel(
                [("conv", ASCENDING), ("event", ASCENDING), ("seq", ASCENDING)],
                name="membership_notices",  # not partial: nx-27017 would not use a partial one here
            )
        ]
    )


async def ensure_retention_indexes(db: Database) -> None:
    """SPEC §15: what the purge walks (models/retention.py): messages by age (`createdMs`), delivered
    webhook events by delivery time ($eq status + a deliveredAt range: nx-27017 uses the compound
    index), and the originals of changed messages by the file they carry."""
    for name in MESSAGE_COLLECTIONS:
        await db[name].create_indexes([IndexModel([("createdMs", ASCENDING)], name="created_ms")])
        # The createdAt index the purge walked before (nx-27017 could not use it for a date range;
        # since/until lists go by conv): one index less to write per message.
        if "created_at" in await db[name].index_information():
            with contextlib.suppress(OperationFailure):  # another process starting dropped it first
                await db[name].drop_index("created_at")
    await db.webhook_events.create_indexes(
        [IndexModel([("status", ASCENDING), ("deliveredAt", ASCENDING)], name="status_delivered_at")]
    )
    await db.message_versions.create_indexes([IndexModel([("content", ASCENDING)], name="content")])
