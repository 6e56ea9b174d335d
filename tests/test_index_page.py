"""GET /: a newcomer's landing page (SPEC §17) for browsers, the same links as JSON for the rest."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from server import __version__
from tests.helpers import Api

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
EXPECTED_HREFS = {
    "/sdk/pages/patient.html",
    "/sdk/pages/doctor.html",
    "/sdk/pages/index.html",
    "/docs/sdk",
    "/sdk/im.client.js",
    "/api/v1/openapi.json",
    "/api/v1/status",
}


class PageParts(HTMLParser):
    """Collects what a CSP cares about: scripts, inline styles and handlers, and the links."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.stylesheets: list[str] = []
        self.scripts = 0
        self.style_elements = 0
        self.inline_attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "style":
            self.style_elements += 1
        if tag == "a" and named.get("href"):
            self.hrefs.append(str(named["href"]))
        if tag == "link" and named.get("rel") == "stylesheet":
            self.stylesheets.append(str(named["href"]))
        self.inline_attributes += [name for name, _ in attrs if name == "style" or name.startswith("on")]


def parse_page(body: bytes) -> PageParts:
    parts = PageParts()
    parts.feed(body.decode("utf-8"))
    return parts


@pytest.mark.gen_test
async def test_browser_gets_a_page_linking_the_demos_sdk_docs_and_openapi(api: Api) -> None:
    response = await api.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/html; charset=UTF-8"
    assert "Accept" in response.headers["Vary"]
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "'unsafe-inline'" not in csp
    parts = parse_page(response.body)
    assert set(parts.hrefs) == EXPECTED_HREFS
    assert (parts.scripts, parts.style_elements, parts.inline_attributes) == (0, 0, [])
    assert parts.stylesheets == ["/sdk/pages/demo.css"]
    assert __version__ in response.body.decode()

    # Every link leads somewhere real, with the type its reader needs.
    for href in sorted(EXPECTED_HREFS | set(parts.stylesheets)):
        target = await api.get(href)
        assert target.code == 200, href
    docs = await api.get("/docs/sdk")
    assert docs.headers["Content-Type"] == "text/plain; charset=UTF-8"
    assert docs.body.decode("utf-8").startswith("# IM JavaScript SDK")
    assert "history(" in docs.body.decode("utf-8")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "accept",
    [None, "*/*", "application/json", "application/json, text/html;q=0.5", "text/html;q=0", "text/plain", "x" * 300],
)
async def test_other_clients_get_the_same_links_as_json(api: Api, accept: str | None) -> None:
    headers = {} if accept is None else {"Accept": accept}
    response = await api.get("/", headers=headers)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json
    assert body["version"] == __version__
    assert {link["href"] for link in body["links"].values()} == EXPECTED_HREFS
    assert all(re.fullmatch(r"[a-z][A-Za-z]+", key) for key in body["links"])


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "accept", ["text/html", "application/xhtml+xml", "TEXT/HTML; q=0.7, */*;q=0.1", "application/json;q=0.5, text/html"]
)
async def test_html_is_chosen_when_it_ranks_first(api: Api, accept: str) -> None:
    response = await api.get("/", headers={"Accept": accept})
    assert response.headers["Content-Type"] == "text/html; charset=UTF-8"


@pytest.mark.gen_test
async def test_index_refuses_other_methods_with_the_envelope(api: Api) -> None:
    response = await api.post("/", {"x": 1}, as_=("Rose", "doctor"), headers={"Accept": BROWSER_ACCEPT})
    assert response.code == 405
    assert response.json["error"]["code"] == "method_not_allowed"
    unknown = await api.get("/index.html", headers={"Accept": BROWSER_ACCEPT})
    assert unknown.code == 404 and unknown.json["error"]["code"] == "not_found"
