"""The one URL table (SPEC §5 paths are pinned)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tornado.web

from handlers.chats import ChatsHandler
from handlers.conversations import ConversationsHandler, ReadMarkerHandler
from handlers.status import StatusHandler
from handlers.ws import ChatSocketHandler


def default_handlers(sdk_dir: Path) -> list[Any]:
    return [
        (r"/api/v1/chats/(sm|pm|gm)", ChatsHandler),
        (r"/api/v1/conversations", ConversationsHandler),
        (r"/api/v1/conversations/read", ReadMarkerHandler),
        (r"/api/v1/status", StatusHandler),
        (r"/ws", ChatSocketHandler),
        (r"/sdk/(.*)", tornado.web.StaticFileHandler, {"path": str(sdk_dir)}),
    ]
