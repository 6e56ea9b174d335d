"""GET /sdk/<file>: the JavaScript SDK and the demo pages, as StaticFileHandler serves them, but with
the REST error envelope and path-only logging."""

from __future__ import annotations

import json
import re
from typing import Any

import tornado.web

from handlers.base import code_for_status, log_handler_exception, reason_phrase
from models.errors import error_envelope

# NUL and other control characters never name a file here; os.stat would raise on NUL (a 500).
UNSERVABLE_PATH = re.compile(r"[\x00-\x1f\x7f]")


class SdkFileHandler(tornado.web.StaticFileHandler):
    """Static files whose failures are 404/405 envelopes and whose logs never hold a query string
    (a page URL may carry ?token=...; StaticFileHandler's own log line prints the whole URI)."""

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        if UNSERVABLE_PATH.search(absolute_path):
            raise tornado.web.HTTPError(404)
        return super().validate_absolute_path(root, absolute_path)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The envelope of every other answer, never Tornado's HTML page."""
        if status_code == 403:  # outside sdk/ (../) or a directory: as absent as a missing file
            status_code = 404
            self.set_status(404)
        message = f"no such file: {self.request.path}" if status_code == 404 else reason_phrase(status_code)
        self.clear_header("Content-Disposition")
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(error_envelope(code_for_status(status_code), message)))

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        log_handler_exception(self.request, typ, value, tb)
