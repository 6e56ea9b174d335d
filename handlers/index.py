"""GET /: where a newcomer lands (SPEC §17) — the demo pages, the SDK documentation, the API description.

A browser (`Accept: text/html`) gets a small static page; any other client gets the same links as
JSON. `GET /docs/sdk` serves sdk/README.md as plain text, which every browser shows as it is.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from handlers.base import BaseHandler
from server import __version__

SDK_README = Path(__file__).resolve().parent.parent / "sdk" / "README.md"

# path, title, what it is: the one list both the page and the JSON are made from.
LINKS: tuple[tuple[str, str, str, str], ...] = (
    ("patientDemo", "/sdk/pages/patient.html", "Patient chat", "a patient's chat with the family doctor"),
    ("doctorDemo", "/sdk/pages/doctor.html", "Doctor console", "patients with unread counts, replies, consultations"),
    ("demoPages", "/sdk/pages/index.html", "About the demo pages", "how to mint tokens and open both pages"),
    ("sdkDocs", "/docs/sdk", "SDK documentation", "the JavaScript client's API (sdk/README.md)"),
    ("sdk", "/sdk/im.client.js", "The SDK", "one plain JavaScript file, also an ES module (im.client.mjs)"),
    ("openapi", "/api/v1/openapi.json", "REST API", "the OpenAPI 3 description of every call"),
    ("status", "/api/v1/status", "Status", "version, profile, uptime, database health"),
)

# No script at all and only our own stylesheet: nothing on this page needs more.
INDEX_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PLAIN_TEXT_CSP = "default-src 'none'; frame-ancestors 'none'"

# Media types that ask for the page; anything else (*/*, application/json, none) gets JSON.
HTML_TYPES = ("text/html", "application/xhtml+xml")


def render_index_page() -> bytes:
    """The landing page: static text and our own links only (nothing from the request)."""
    items = "\n".join(
        f'      <li><a href="{html.escape(path)}">{html.escape(title)}</a>: {html.escape(what)}</li>'
        for _, path, title, what in LINKS
    )
    page = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <meta name="referrer" content="no-referrer">
  <title>Family-doctor IM server</title>
  <link rel="stylesheet" href="/sdk/pages/demo.css">
</head>
<body>
  <section class="card">
    <h1>Family-doctor IM server</h1>
    <p>Version {html.escape(__version__)}. Doctors use the REST API, patients a WebSocket; the JavaScript
      SDK wraps the WebSocket.</p>
    <ul>
{items}
    </ul>
    <p>Mint a token for a try-out (dev profile):<br>
      <code>python -m server.tokens --sub Rose --role doctor</code></p>
  </section>
</body>
</html>
"""
    return page.encode()


def prefers_html(accept: str) -> bool:
    """Whether an Accept header names an HTML type at least as highly as JSON (q > 0)."""
    best_html = 0.0
    best_json = 0.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.strip().lower()
        if media in HTML_TYPES:
            best_html = max(best_html, quality)
        elif media == "application/json":
            best_json = max(best_json, quality)
    return best_html > 0 and best_html >= best_json


def index_links() -> dict[str, Any]:
    """The JSON answer: the same links as the page."""
    return {
        "name": "family-doctor IM server",
        "version": __version__,
        "links": {key: {"href": path, "title": title} for key, path, title, _ in LINKS},
    }


class IndexHandler(BaseHandler):
    """GET /: a page for browsers, the same links as JSON for everyone else."""

    async def get(self) -> None:
        """Answer by the Accept header (Vary says so to caches)."""
        self.set_header("Vary", "Accept")
        if not prefers_html(self.request.headers.get("Accept", "")):
            self.write_json(index_links())
            return
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Content-Security-Policy", INDEX_CSP)
        self.finish(render_index_page())


class SdkReadmeHandler(BaseHandler):
    """GET /docs/sdk: sdk/README.md as plain UTF-8 text (text/markdown would be downloaded)."""

    async def get(self) -> None:
        """Read per request: the file is small, and an edited README shows without a restart."""
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.set_header("Content-Security-Policy", PLAIN_TEXT_CSP)
        self.finish(SDK_README.read_bytes())
