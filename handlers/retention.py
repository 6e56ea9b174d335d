"""Retention, legal holds and the record export (SPEC §15, §16)."""

from __future__ import annotations

import json
import logging

from pymongo.errors import PyMongoError
from tornado.iostream import StreamClosedError

from handlers.base import BaseHandler
from handlers.errors import to_im_error
from models.errors import error_body
from models.validation import check_id

log = logging.getLogger(__name__)

# Lines written per chunk of an export: each chunk is flushed to the socket before the next is read.
EXPORT_CHUNK_LINES = 200
NDJSON = "application/x-ndjson; charset=UTF-8"


def ndjson_line(line: object) -> str:
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"


class RetentionRunHandler(BaseHandler):
    async def post(self) -> None:
        """Purge now (admin): {"purged": {"sm", "pm", "gm", "audit", "webhook", "files"}}; 409 if one is running."""
        principal = self.authenticate()
        self.json_body(optional=True)  # none expected; a malformed one is still a 400
        self.write_json({"purged": await self.services.retention.run_now(principal)})


class HoldsHandler(BaseHandler):
    async def post(self) -> None:
        """Place a legal hold (admin): {"user"} | {"user", "peer"} | {"group"}, plus "reason"."""
        principal = self.authenticate()
        self.write_json(await self.services.holds.create(principal, self.json_body()), 201)

    async def get(self) -> None:
        """The active holds (admin)."""
        self.write_json({"holds": await self.services.holds.list_active(self.authenticate())})


class HoldHandler(BaseHandler):
    async def delete(self, hold_id: str) -> None:
        """Release a hold (admin): the next purge may take what is past its limit."""
        self.write_json(await self.services.holds.release(self.authenticate(), hold_id))


class ExportHandler(BaseHandler):
    async def get(self, user_id: str) -> None:
        """The user's record as NDJSON (the user itself, service, admin), streamed chunk by chunk."""
        principal = self.authenticate()
        lines = await self.services.exports.open(principal, check_id(user_id, "id"))
        self.set_header("Content-Type", NDJSON)
        self.set_header("Content-Disposition", 'attachment; filename="export.ndjson"')
        chunk: list[str] = []
        started = False
        try:
            async for line in lines:
                chunk.append(ndjson_line(line))
                if len(chunk) >= EXPORT_CHUNK_LINES:
                    self.write("".join(chunk))
                    chunk = []
                    started = True
                    await self.flush()  # backpressure: the next page is read once this one is sent
        except StreamClosedError:
            return  # the client went away
        except Exception as exc:
            if not started:
                raise  # nothing sent yet: the ordinary envelope (503 for the database, ...)
            # The status is sent: the envelope can no longer be the answer, so it is the last
            # line (an export without its "end" line is incomplete either way).
            error = to_im_error(exc)
            if error.status >= 500 and not isinstance(exc, PyMongoError):
                log.exception("export of %s failed", user_id)
            else:
                log.warning("export of %s stopped: %s", user_id, error.code)
            chunk.append(ndjson_line({"type": "error", **error_body(error)["error"]}))
        self.finish("".join(chunk))
