"""GET /sdk/<file>: the JavaScript SDK and the demo pages, as StaticFileHandler serves them, but with
the REST error envelope and path-only logging."""

from __future__ import annotations

import re
from typing import Any

import tornado.web

from handlers.base import log_handler_exception
from handlers.errors import error_for_status, finish_with_error, to_im_error
from models.errors import IMError, NotFound

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
        """The envelope of every other answer (handlers/errors.py), never Tornado's HTML page."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error: IMError
        if status_code in (403, 404):  # 403: outside sdk/ (../) or a directory: as absent as a missing file
            error = NotFound(f"no such file: {self.request.path}")
        elif exc is None or isinstance(exc, tornado.web.HTTPError):
            error = error_for_status(status_code)  # the reason only: Tornado's log_message names paths
        else:
            error = to_im_error(exc)
        self.clear_header("Content-Disposition")
        self.set_header("Cache-Control", "no-store")
        finish_with_error(self, error)

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        log_handler_exception(self.request, typ, value, tb)
