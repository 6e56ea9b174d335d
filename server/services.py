"""Everything handlers share, built once per process and hung off the application."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from pymongo import AsyncMongoClient, WriteConcern

from models.accounts import AccountStore
from models.audit import AuditLog
from models.consultations import ConsultationService
from models.conversations import ConversationStore
from models.database import Database
from models.directory import UserDirectory
from models.export import ExportService
from models.files import FileStore
from models.groups import GroupStore
from models.holds import HoldService
from models.inbox import Inbox
from models.membership import GroupService
from models.messages import MessageService
from models.outbox import Outbox
from models.presence import Presence
from models.recall import ChangeWindows, MessageChanges
from models.receipts import ReceiptService
from models.retention import Purger, RetentionPolicy
from server.accounts import AccountAdmin, AccountView
from server.auth import TokenVerifier
from server.backlog import BacklogPlanner
from server.chat import ChatService
from server.config import Settings
from server.db import message_write_concern
from server.fanout import ChangeStreamFanout
from server.hub import Hub
from server.metrics import Metrics
from server.ratelimit import SendRateLimiter
from server.retention import LEASE_NAME, DatabaseLease, RetentionRunner
from server.transport import Heartbeat
from server.webhooks import Dispatcher, build_events

CONCURRENT_BACKLOGS = 32


@dataclasses.dataclass
class Services:
    settings: Settings
    client: AsyncMongoClient[dict[str, Any]]
    db: Database
    hub: Hub
    groups: GroupStore
    conversations: ConversationStore
    messages: MessageService
    files: FileStore
    inbox: Inbox
    group_service: GroupService
    consultations: ConsultationService
    presence: Presence
    send_limiter: SendRateLimiter
    directory: UserDirectory
    started_at: float
    tokens: TokenVerifier
    # The send and marker paths REST and WebSocket share.
    chat: ChatService
    # SPEC §13: the append-only audit log and the marker history behind per-message receipts.
    audit: AuditLog
    receipts: ReceiptService
    # SPEC §17: suspensions and revokes as this process sees them, and the admin calls.
    accounts: AccountView
    account_admin: AccountAdmin
    metrics: Metrics
    # Bounds the backlog reads of sockets connecting at once (a reconnect storm), so they queue
    # here instead of exhausting the database connection pool.
    backlog_slots: asyncio.Semaphore
    # Reads the backlog plans of sockets connecting together in batches (server/backlog.py).
    backlog_planner: BacklogPlanner
    # Pings every socket from one timer and closes those that answer none (SPEC §7).
    heartbeat: Heartbeat
    # SPEC §15/§16: legal holds, the retention purge (under a database lease) and record exports.
    holds: HoldService
    retention: RetentionRunner
    exports: ExportService
    # SPEC §11/§12: the durable outbox (admin API) and its dispatcher; None when no url is set.
    outbox: Outbox | None = None
    webhooks: Dispatcher | None = None
    # Follows the other processes' messages; None when change streams are off or unavailable.
    fanout: ChangeStreamFanout | None = None


def retention_policy(settings: Settings) -> RetentionPolicy:
    """[retention] as the purge applies it (models/retention.py)."""
    table = settings.retention
    return RetentionPolicy(
        sm_days=table.sm_days,
        pm_days=table.pm_days,
        gm_days=table.gm_days,
        audit_days=table.audit_days,
        webhook_days=table.webhook_days,
        batch_size=table.batch_size,
    )


def markers_write_concern(settings: Settings) -> WriteConcern:
    """Received/read markers: acknowledged like the messages (majority where set), not journaled.

    Explicit, not the driver default: nx-27017 keeps the last write concern it was sent per database.
    """
    return WriteConcern(w=settings.write_concern_w if settings.write_concern_w is not None else 1)


def build_services(
    settings: Settings,
    client: AsyncMongoClient[dict[str, Any]],
    *,
    follow_other_processes: bool = False,
    metrics: Metrics | None = None,
) -> Services:
    """Build every shared service; with follow_other_processes, the change-stream fan-out too."""
    db = client[settings.db_name]
    hub = Hub()
    audit = AuditLog(db, message_write_concern(settings), enabled=settings.audit.enabled)
    receipts = ReceiptService(db, message_write_concern(settings))
    metrics = metrics or Metrics(settings.metrics.enabled)
    metrics.track_connections(lambda: hub.socket_count, lambda: hub.user_count)
    account_store = AccountStore(db, message_write_concern(settings))
    accounts = AccountView(account_store, hub)
    presence = Presence(db, hub)
    groups = GroupStore(db)
    conversations = ConversationStore(db, message_write_concern(settings))
    files = FileStore(db, message_write_concern(settings), audit=audit)
    events, outbox, dispatcher = build_events(settings, db, hub, groups, conversations, presence.instance_id)
    messages = MessageService(
        db,
        message_write_concern(settings),
        conversations,
        groups,
        hub,
        files,
        settings.limits.max_content_chars,
        on_stored=metrics.note_stored,
        audit=audit,
        events=events,
    )
    # One send budget per caller for messages and for every action that writes one (events).
    send_limiter = SendRateLimiter(
        settings.limits.send_rate_per_sec, settings.limits.send_burst, on_refused=metrics.note_rate_limited
    )
    directory = UserDirectory(db)
    fanout = (
        ChangeStreamFanout(
            db,
            hub,
            groups,
            messages.stored_ids,
            instance_id=presence.instance_id,
            on_lag=metrics.note_change_stream_lag,
        )
        if follow_other_processes
        else None
    )
    inbox = Inbox(conversations, groups, db)
    holds = HoldService(db, message_write_concern(settings), groups, conversations, audit=audit)
    # SPEC §14: recall and edit, with every version kept (message_versions).
    changes = MessageChanges(
        db,
        message_write_concern(settings),
        messages,
        conversations,
        groups,
        files,
        send_limiter,
        ChangeWindows(settings.messages.recall_window_secs, settings.messages.edit_window_secs),
        settings.limits.max_content_chars,
        audit=audit,
        events=events,
    )
    return Services(
        settings=settings,
        client=client,
        db=db,
        hub=hub,
        groups=groups,
        conversations=conversations,
        messages=messages,
        files=files,
        inbox=inbox,
        group_service=GroupService(
            groups,
            conversations,
            messages,
            db,
            markers_write_concern(settings),
            send_limiter,
            settings.limits.max_group_members,
            audit=audit,
            events=events,
        ),
        consultations=ConsultationService(db, messages, directory, send_limiter, audit=audit, events=events),
        presence=presence,
        send_limiter=send_limiter,
        directory=directory,
        started_at=time.monotonic(),
        tokens=TokenVerifier(settings.auth_secret, max_ttl_secs=settings.max_token_ttl_secs, accounts=accounts),
        accounts=accounts,
        account_admin=AccountAdmin(account_store, accounts, audit=audit, events=events),
        metrics=metrics,
        chat=ChatService(messages, inbox, hub, send_limiter, audit, receipts, events=events, changes=changes),
        audit=audit,
        receipts=receipts,
        backlog_slots=asyncio.Semaphore(CONCURRENT_BACKLOGS),
        backlog_planner=BacklogPlanner(inbox, fanout),
        heartbeat=Heartbeat(settings.ping_interval_secs, settings.ping_timeout_secs),
        holds=holds,
        retention=RetentionRunner(
            Purger(db, retention_policy(settings), holds, audit=audit),
            DatabaseLease(db, LEASE_NAME),
            settings.retention.interval_hours,
        ),
        exports=ExportService(db, inbox, conversations, groups, audit=audit),
        fanout=fanout,
        outbox=outbox,
        webhooks=dispatcher,
    )
