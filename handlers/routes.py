"""The one URL table (SPEC §5 paths are pinned)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handlers.accounts import ReactivateHandler, RevokeTokensHandler, SuspendHandler
from handlers.audit import AuditHandler, ReceiptsHandler
from handlers.chats import ChatsHandler, MessageHandler, MessageHistoryHandler, RecallHandler
from handlers.consultations import ConsultationEndHandler, ConsultationsHandler
from handlers.conversations import ConversationsHandler, ReadMarkerHandler
from handlers.files import FileDownloadHandler, FileUploadHandler
from handlers.groups import GroupHandler, GroupMemberHandler, GroupMembersHandler, GroupsHandler
from handlers.index import IndexHandler, SdkReadmeHandler
from handlers.metrics import MetricsHandler
from handlers.openapi import OpenApiHandler
from handlers.retention import ExportHandler, HoldHandler, HoldsHandler, RetentionRunHandler
from handlers.sdk_files import SdkFileHandler
from handlers.status import StatusHandler
from handlers.users import PresenceHandler, UserGroupsHandler, UserRoleHandler
from handlers.webhooks import WebhookEventRetryHandler, WebhookEventsHandler
from handlers.ws import ChatSocketHandler

# SPEC §14: the routes of one message, after /api/v1/chats/{channel}/{id}.
MESSAGE_ROUTES = (("", MessageHandler), ("/recall", RecallHandler), ("/history", MessageHistoryHandler))


def default_handlers(sdk_dir: Path) -> list[Any]:
    return [
        (r"/api/v1/chats/(sm|pm|gm)", ChatsHandler),
        *((rf"/api/v1/chats/{ch}/([^/]+)/receipts", ReceiptsHandler, {"channel": ch}) for ch in ("sm", "pm", "gm")),
        # SPEC §14: edit (PATCH), recall, and every version of one message (admin).
        *(
            (rf"/api/v1/chats/{ch}/([^/]+){suffix}", handler, {"channel": ch})
            for suffix, handler in MESSAGE_ROUTES
            for ch in ("sm", "pm", "gm")
        ),
        (r"/api/v1/audit", AuditHandler),
        (r"/api/v1/conversations", ConversationsHandler),
        (r"/api/v1/conversations/read", ReadMarkerHandler),
        (r"/api/v1/groups", GroupsHandler),
        (r"/api/v1/groups/([^/]+)", GroupHandler),
        (r"/api/v1/groups/([^/]+)/members", GroupMembersHandler),
        (r"/api/v1/groups/([^/]+)/members/([^/]+)", GroupMemberHandler),
        (r"/api/v1/users/([^/]+)/groups", UserGroupsHandler),
        (r"/api/v1/users/([^/]+)/presence", PresenceHandler),
        (r"/api/v1/users/([^/]+)/role", UserRoleHandler),
        (r"/api/v1/users/([^/]+)/suspend", SuspendHandler),
        (r"/api/v1/users/([^/]+)/reactivate", ReactivateHandler),
        (r"/api/v1/users/([^/]+)/revoke-tokens", RevokeTokensHandler),
        (r"/api/v1/users/([^/]+)/export", ExportHandler),
        (r"/api/v1/retention/run", RetentionRunHandler),
        (r"/api/v1/holds", HoldsHandler),
        (r"/api/v1/holds/([^/]+)", HoldHandler),
        (r"/api/v1/consultations", ConsultationsHandler),
        (r"/api/v1/consultations/([^/]+)/end", ConsultationEndHandler),
        (r"/api/v1/files", FileUploadHandler),
        (r"/api/v1/files/([^/]+)", FileDownloadHandler),
        (r"/api/v1/status", StatusHandler),
        (r"/api/v1/webhooks/events", WebhookEventsHandler),
        (r"/api/v1/webhooks/events/([^/]+)/retry", WebhookEventRetryHandler),
        (r"/api/v1/openapi.json", OpenApiHandler),
        (r"/ws", ChatSocketHandler),
        (r"/metrics", MetricsHandler),
        (r"/", IndexHandler),
        (r"/docs/sdk", SdkReadmeHandler),
        (r"/sdk/(.*)", SdkFileHandler, {"path": str(sdk_dir)}),
    ]
