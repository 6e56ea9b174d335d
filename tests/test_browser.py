"""The JavaScript SDK and the demo pages in a real headless Chromium (SPEC §8).

The server runs as a real process (`python run.py`, test profile) so a test can SIGKILL and restart
it under a connected page. Playwright's sync API drives Debian's /usr/bin/chromium; it never
downloads a browser. On failure every open page leaves a screenshot in test-artifacts/.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xstatic.pkg.jquery
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from playwright.sync_api import expect as pw_expect

from server.auth import mint_token
from tests.processes import ROOT, MongoProcess, ServerProcess, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
UI_TIMEOUT_MS = 10_000
# The two screens the pages are made for (STYLE.md: test at a phone size as well as a desktop one).
PHONE: dict[str, Any] = {
    "viewport": {"width": 390, "height": 844},
    "is_mobile": True,
    "has_touch": True,
    "device_scale_factor": 3,
}
DESKTOP: dict[str, Any] = {"viewport": {"width": 1280, "height": 800}}
DEVICES = {"phone": PHONE, "desktop": DESKTOP}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

# ---- a real server process ------------------------------------------------------------------------


class BrowserServer(ServerProcess):
    """`python run.py` on a fixed port and database, with the REST helpers the browser tests use."""

    def __init__(self, mongo_uri: str, secret: str, log_dir: Path):
        super().__init__(
            free_port(), mongo_uri, f"b_{uuid.uuid4().hex[:12]}", log_dir / "server.log", IM_AUTH_SECRET=secret
        )
        self.origin = self.base_url
        self.secret = secret

    def token(self, sub: str, role: str) -> str:
        return mint_token(self.secret, sub, role, 3600)

    def call(self, method: str, path: str, body: Any = None, as_: tuple[str, str] | None = None) -> tuple[int, Any]:
        """A REST call as a user: (status, JSON body)."""
        headers = {"Content-Type": "application/json"}
        if as_ is not None:
            headers["Authorization"] = f"Bearer {self.token(*as_)}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.origin + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read() or b"null")

    def send_pm(self, sender: str, to: str, content: str, role: str = "doctor") -> dict[str, Any]:
        status, message = self.call(
            "POST",
            "/api/v1/chats/pm",
            {"from": sender, "to": to, "contentType": 1, "content": content},
            as_=(sender, role),
        )
        assert status == 201, (status, message)
        return message  # type: ignore[no-any-return]

    def history(self, user: str, peer: str, role: str = "patient") -> list[dict[str, Any]]:
        status, body = self.call("GET", f"/api/v1/chats/pm?user_id={user}&peer={peer}&limit=200", as_=(user, role))
        assert status == 200, body
        return body["messages"]  # type: ignore[no-any-return]

    def page_url(self, page: str, token: str, **fragment: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in fragment.items())
        return f"{self.origin}/sdk/pages/{page}#token={token}{extra}"


@pytest.fixture(scope="module")
def secret() -> str:
    return secrets.token_hex(24)


@pytest.fixture(scope="module")
def server(mongo: MongoProcess, secret: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserServer]:
    process = BrowserServer(mongo.uri, secret, tmp_path_factory.mktemp("server"))
    process.start()
    yield process
    process.stop()


@pytest.fixture
def own_server(mongo: MongoProcess, secret: str, tmp_path: Path) -> Iterator[BrowserServer]:
    """A server process of the test's own, for tests that kill or stop it."""
    process = BrowserServer(mongo.uri, secret, tmp_path)
    process.start()
    yield process
    process.stop()


# ---- the browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


class Pages:
    """Opens pages in fresh browser contexts; records page errors and dialogs (alert() = failed XSS)."""

    def __init__(self, browser: Browser):
        self.browser = browser
        self.contexts: list[BrowserContext] = []
        self.pages: list[tuple[str, Page]] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.websockets: list[str] = []
        self.console_errors: list[str] = []  # CSP violations are reported here

    def open(self, name: str, url: str, bypass_csp: bool = False, device: dict[str, Any] | None = None) -> Page:
        options = device or {"viewport": {"width": 1100, "height": 720}}
        context = self.browser.new_context(bypass_csp=bypass_csp, **options)
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.on("pageerror", lambda exc: self.errors.append(f"{name}: {exc}"))
        page.on("dialog", self._on_dialog)
        page.on("websocket", lambda ws: self.websockets.append(ws.url))
        page.on("console", lambda msg: self._on_console(name, msg))
        page.goto(url)
        self.pages.append((name, page))
        return page

    def _on_console(self, name: str, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(f"{name}: {message.text}")

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def sdk_page(self, server: BrowserServer) -> Page:
        """A same-origin page with only the SDK loaded, for SDK-level tests.

        Its CSP is bypassed because page.wait_for_function() evaluates strings; the demo pages keep
        theirs (their tests use locators only).
        """
        page = self.open("sdk", server.origin + "/sdk/pages/index.html", bypass_csp=True)
        page.add_script_tag(url="/sdk/im.client.js")
        return page

    def screenshot_all(self, test_name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
        for name, page in self.pages:
            try:
                page.screenshot(path=str(ARTIFACTS / f"{safe}-{name}.png"), full_page=True)
            except Exception as exc:  # a crashed page must not hide the test's own failure
                print(f"screenshot of {name} failed: {exc}")

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Pages]:
    opened = Pages(browser)
    failed_before = request.session.testsfailed
    yield opened
    # The call phase has been reported by now: a failure has raised testsfailed.
    if request.session.testsfailed > failed_before:
        opened.screenshot_all(request.node.name)
    opened.close()


def wait_online(page: Page) -> None:
    pw_expect(page.locator("#status")).to_have_attribute("data-state", "online")


def thread_texts(page: Page) -> list[str]:
    return page.locator("#thread .msg .text").all_text_contents()


def wait_for_text(page: Page, text: str) -> None:
    pw_expect(page.locator("#thread .msg .text", has_text=text).first).to_be_visible()


def send_from_page(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def run_js(page: Page, function: str, arg: Any = None, timeout_ms: int = UI_TIMEOUT_MS) -> Any:
    """page.evaluate() with a deadline: a Promise that never settles must fail the test, not hang it."""
    wrapped = f"""async (arg) => {{
        const fn = {function};
        let timer;
        const deadline = new Promise((_, reject) => {{
            timer = setTimeout(() => reject(new Error('no result within {timeout_ms} ms')), {timeout_ms});
        }});
        try {{ return await Promise.race([fn(arg), deadline]); }} finally {{ clearTimeout(timer); }}
    }}"""
    return page.evaluate(wrapped, arg)


# ---- SDK ------------------------------------------------------------------------------------------


def test_sdk_loads_as_global_and_as_es_module(server: BrowserServer, pages: Pages) -> None:
    page = pages.sdk_page(server)
    info = run_js(
        page,
        """async () => {
        const module = await import('/sdk/im.client.mjs');
        return {global: typeof window.IMClient, version: window.IMClient.VERSION,
                moduleDefault: typeof module.default, named: module.IMClient === module.default,
                jquery: typeof window.jQuery};
    }""",
    )
    assert info == {
        "global": "function",
        "version": info["version"],
        "moduleDefault": "function",
        "named": True,
        "jquery": "undefined",
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"])


def test_send_p2p_resolves_with_the_acknowledged_message(server: BrowserServer, pages: Pages) -> None:
    page = pages.sdk_page(server)
    result = run_js(
        page,
        """async ({url, token}) => {
        const client = new IMClient({url, token});
        await client.connect();
        const first = await client.sendP2P('SdkDoctor', 'hello 你好 🌹', {clientMsgId: 'sdk-1'});
        const again = await client.sendP2P('SdkDoctor', 'hello 你好 🌹', {clientMsgId: 'sdk-1'});
        const auto = await client.sendP2P('SdkDoctor', 'second');
        let rejected = null;
        try {
            await client.sendP2P('SdkDoctor', 'not a url', {contentType: 4});
        } catch (e) {
            rejected = {code: e.code, name: e.name, hasId: typeof e.clientMsgId === 'string'};
        }
        client.close();
        return {first, again, auto, rejected, userId: client.userId, state: client.state};
    }""",
        {"url": server.origin, "token": server.token("SdkPatient", "patient")},
    )
    first = result["first"]
    assert first["from"] == "SdkPatient" and first["to"] == "SdkDoctor" and first["channel"] == "pm"
    assert first["content"] == "hello 你好 🌹" and first["contentType"] == 1 and first["seq"] == 1
    assert first["clientMsgId"] == "sdk-1" and first["id"]
    assert result["again"]["id"] == first["id"]  # same clientMsgId: the original, nothing new stored
    assert result["auto"]["seq"] == 2 and len(result["auto"]["clientMsgId"]) >= 16
    assert result["rejected"] == {"code": "invalid_field", "name": "IMError", "hasId": True}
    assert result["userId"] == "SdkPatient" and result["state"] == "closed"
    stored = server.history("SdkPatient", "SdkDoctor")
    assert [m["content"] for m in stored] == ["hello 你好 🌹", "second"]


def test_sdk_works_beside_a_real_jquery(server: BrowserServer, pages: Pages) -> None:
    """The seed's SDK needed jQuery first; this one needs nothing and must not mind it either."""
    page = pages.open("jquery", server.origin + "/sdk/pages/index.html", bypass_csp=True)
    page.add_script_tag(path=str(Path(xstatic.pkg.jquery.BASE_DIR) / "jquery.min.js"))
    page.add_script_tag(url="/sdk/im.client.js")
    result = run_js(
        page,
        """async ({url, token}) => {
        const client = new IMClient({url, token});
        await client.connect();
        const sent = await client.sendP2P('JqDoctor', 'with jQuery');
        client.close();
        return {jquery: window.jQuery.fn.jquery, dollar: window.$ === window.jQuery, seq: sent.seq};
    }""",
        {"url": server.origin, "token": server.token("JqPatient", "patient")},
    )
    assert result == {"jquery": "3.7.1", "dollar": True, "seq": 1}


@pytest.mark.parametrize("kind", ["badly_signed", "expired", "garbage"])
def test_bad_token_gives_unauthenticated_and_no_reconnect_loop(server: BrowserServer, pages: Pages, kind: str) -> None:
    token = {
        "badly_signed": mint_token("another-secret-0123456789abcdef0123", "Mallory", "patient", 3600),
        "expired": mint_token(server.secret, "Mallory", "patient", -60),
        "garbage": "not-a-jwt",
    }[kind]
    page = pages.sdk_page(server)
    result = run_js(
        page,
        """async ({url, token}) => {
        const client = new IMClient({url, token, reconnectMinDelayMs: 50, reconnectMaxDelayMs: 200});
        const errors = [];
        let connected = 0;
        client.on('error', (e) => errors.push(e.code));
        client.on('connected', () => connected++);
        let rejected = null;
        try { await client.connect(); } catch (e) { rejected = e.code; }
        // With these short back-off delays a reconnect loop would make many attempts by now.
        await new Promise((r) => setTimeout(r, 1200));
        return {errors, connected, rejected, state: client.state};
    }""",
        {"url": server.origin, "token": token},
    )
    assert result == {"errors": ["unauthenticated"], "connected": 0, "rejected": "unauthenticated", "state": "closed"}
    assert len([u for u in pages.websockets if "/ws?" in u]) == 1


def test_duplicate_deliveries_are_dropped(server: BrowserServer, pages: Pages) -> None:
    """Without received markers the server re-sends on reconnect (at least once); the SDK emits once."""
    page = pages.sdk_page(server)
    run_js(
        page,
        """async ({url, token}) => {
        // Count raw frames to prove the server really sent the message twice.
        window.rawMessageFrames = [];
        class CountingSocket extends WebSocket {
            constructor(u) {
                super(u);
                this.addEventListener('message', (e) => {
                    const f = JSON.parse(e.data);
                    if (f.type === 'message') window.rawMessageFrames.push(f.message.id);
                });
            }
        }
        const client = new IMClient({url, token, WebSocket: CountingSocket, autoReceive: false});
        window.emitted = [];
        window.connects = 0;
        client.on('message', (m) => window.emitted.push(m.id));
        client.on('connected', () => window.connects++);
        window.client = client;
        await client.connect();
    }""",
        {"url": server.origin, "token": server.token("DupPatient", "patient")},
    )
    message = server.send_pm("DupDoctor", "DupPatient", "only once please")
    page.wait_for_function("window.emitted.length === 1")
    page.evaluate("() => { window.client.reconnect(); }")
    page.wait_for_function("window.connects === 2 && window.rawMessageFrames.length >= 2")
    second = server.send_pm("DupDoctor", "DupPatient", "and a new one")
    page.wait_for_function("window.emitted.length === 2")
    state = page.evaluate("({raw: window.rawMessageFrames, emitted: window.emitted})")
    assert state["raw"].count(message["id"]) == 2
    assert state["emitted"] == [message["id"], second["id"]]


def test_received_markers_follow_and_read_gives_a_receipt(server: BrowserServer, pages: Pages) -> None:
    page = pages.sdk_page(server)
    run_js(
        page,
        """async ({url, patientToken, doctorToken}) => {
        window.received = [];
        window.receipts = [];
        const patient = new IMClient({url, token: patientToken});
        const doctor = new IMClient({url, token: doctorToken});
        patient.on('message', (m) => window.received.push(m));
        doctor.on('receipt', (r) => window.receipts.push(r));
        await Promise.all([patient.connect(), doctor.connect()]);
        window.patient = patient;
        await doctor.sendP2P('MarkPatient', 'from the doctor');
    }""",
        {
            "url": server.origin,
            "patientToken": server.token("MarkPatient", "patient"),
            "doctorToken": server.token("MarkDoctor", "doctor"),
        },
    )
    page.wait_for_function("window.received.length === 1")
    # The patient's own send comes back as an ack: contiguous, so the marker moves past it too.
    page.evaluate("() => { window.patient.sendP2P('MarkDoctor', 'from the patient'); }")

    def conversation() -> dict[str, Any]:
        status, body = server.call("GET", "/api/v1/conversations?user_id=MarkPatient", as_=("MarkPatient", "patient"))
        assert status == 200, body
        return body["conversations"][0]  # type: ignore[no-any-return]

    deadline = time.monotonic() + 5
    while conversation()["receivedSeq"] != 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the REST API for the stored marker, bounded: nothing to await
    assert conversation()["receivedSeq"] == 2
    assert conversation()["unread"] == 1

    page.evaluate("window.patient.markRead({channel: 'pm', peer: 'MarkDoctor', seq: 2})")
    page.wait_for_function("window.receipts.length === 1")
    assert page.evaluate("window.receipts[0]") == {"type": "receipt", "channel": "pm", "user": "MarkPatient", "seq": 2}
    assert conversation()["unread"] == 0


def test_heartbeat_timeout_reconnects_when_the_server_hangs(own_server: BrowserServer, pages: Pages) -> None:
    page = pages.sdk_page(own_server)
    run_js(
        page,
        """async ({url, token}) => {
        window.events = [];
        const client = new IMClient({url, token, heartbeatIntervalMs: 300, pongTimeoutMs: 600,
                                     reconnectMinDelayMs: 100, reconnectMaxDelayMs: 400});
        client.on('connected', (i) => window.events.push('connected'));
        client.on('disconnected', (i) => window.events.push('disconnected'));
        client.on('error', (e) => window.events.push('error:' + e.code));
        // From the start: a listener added after the send could miss a fast delivery.
        client.on('message', (m) => window.events.push('message:' + m.id));
        window.client = client;
        await client.connect();
    }""",
        {"url": own_server.origin, "token": own_server.token("HbPatient", "patient")},
    )
    assert own_server.process is not None
    own_server.process.send_signal(signal.SIGSTOP)  # the TCP connection stays up; nothing answers
    try:
        page.wait_for_function("window.events.includes('disconnected')", timeout=5000)
    finally:
        own_server.process.send_signal(signal.SIGCONT)
    page.wait_for_function("window.events.filter((e) => e === 'connected').length === 2", timeout=15000)
    events = page.evaluate("window.events")
    assert events[:3] == ["connected", "error:heartbeat_timeout", "disconnected"]
    message = own_server.send_pm("HbDoctor", "HbPatient", "after the hang")
    page.wait_for_function(f"window.events.includes('message:{message['id']}')")


# ---- the demo pages -------------------------------------------------------------------------------


def test_patient_and_doctor_pages_exchange_messages(server: BrowserServer, pages: Pages) -> None:
    doctor = pages.open("doctor", server.page_url("doctor.html", server.token("Rose", "doctor")))
    patient = pages.open("patient", server.page_url("patient.html", server.token("Jack", "patient"), peer="Rose"))
    wait_online(doctor)
    wait_online(patient)

    send_from_page(patient, "Hello doctor, I have a fever 🤒")
    wait_for_text(patient, "Hello doctor")
    pw_expect(patient.locator("#thread .msg.mine .state").last).to_have_text("Sent")

    # Not open on the doctor's side yet: the conversation shows up with an unread count.
    item = doctor.locator('#conversations .conversation[data-peer="Jack"]')
    pw_expect(item.locator(".badge")).to_have_text("1")
    pw_expect(item.locator(".preview")).to_have_text("Hello doctor, I have a fever 🤒")
    item.click()
    wait_for_text(doctor, "Hello doctor, I have a fever 🤒")
    pw_expect(item.locator(".badge")).to_have_text("0")
    # Opening the thread marks it read; the patient's page shows the receipt.
    pw_expect(patient.locator("#thread .msg.mine .state").last).to_have_text("Read")

    send_from_page(doctor, "Please take your temperature\nevery 4 hours.")
    wait_for_text(patient, "Please take your temperature")
    assert thread_texts(patient) == ["Hello doctor, I have a fever 🤒", "Please take your temperature\nevery 4 hours."]
    assert thread_texts(doctor) == thread_texts(patient)

    # A reload of the patient page shows the same thread (REST history), each message once.
    patient.reload()
    wait_online(patient)
    pw_expect(patient.locator("#thread .msg")).to_have_count(2)

    # Consultations (SPEC §6) from the console, when this server has the endpoints.
    status, _ = server.call("GET", "/api/v1/consultations?user_id=Rose", as_=("Rose", "doctor"))
    if status == 404:
        assert doctor.locator("#start-consultation").is_disabled()
        pytest.skip("the consultation endpoints are not routed on this server yet")
    pw_expect(doctor.locator("#start-consultation")).to_be_enabled()
    doctor.locator("#start-consultation").click()
    wait_for_text(patient, "Consultation started")
    wait_for_text(doctor, "Consultation started")
    pw_expect(doctor.locator("#consultation-state")).to_have_text("consultation open")
    pw_expect(patient.locator("#consultation-state")).to_have_text("Consultation in progress")
    doctor.locator("#end-consultation").click()
    wait_for_text(patient, "Consultation ended")
    pw_expect(doctor.locator("#consultation-state")).to_have_text("no open consultation")
    pw_expect(doctor.locator("#start-consultation")).to_be_enabled()
    assert not pages.errors, pages.errors


def test_markup_in_messages_is_shown_as_text(server: BrowserServer, pages: Pages) -> None:
    hostile = [
        "<script>alert(1)</script>",
        '<img src=x onerror="window.__xss = 1; alert(2)">',
        "<b>bold?</b> & <a href=javascript:alert(3)>link</a>",
    ]
    server.send_pm("Eve", "Victim", hostile[0])  # history, loaded by REST
    patient = pages.open("patient", server.page_url("patient.html", server.token("Victim", "patient"), peer="Eve"))
    doctor = pages.open("doctor", server.page_url("doctor.html", server.token("Eve", "doctor"), peer="Victim"))
    wait_online(patient)
    wait_online(doctor)
    server.send_pm("Eve", "Victim", hostile[1])  # live, over the WebSocket
    send_from_page(patient, hostile[2])  # the patient's own send, through the SDK
    pw_expect(patient.locator("#thread .msg")).to_have_count(3)
    pw_expect(doctor.locator("#thread .msg")).to_have_count(3)

    for page in (patient, doctor):
        assert thread_texts(page) == hostile
        counts = page.evaluate("""() => ({
            scripts: document.querySelectorAll('#thread script').length,
            images: document.querySelectorAll('#thread img').length,
            links: document.querySelectorAll('#thread a').length,
            bold: document.querySelectorAll('#thread b, #conversations b').length,
            xss: window.__xss === undefined ? null : window.__xss,
        })""")
        assert counts == {"scripts": 0, "images": 0, "links": 0, "bold": 0, "xss": None}
    pw_expect(doctor.locator('#conversations .conversation[data-peer="Victim"] .preview')).to_have_text(hostile[2])
    patient.wait_for_timeout(200)  # give a (wrongly) injected handler the chance to run
    assert pages.dialogs == []
    assert not pages.errors, pages.errors


def test_page_reconnects_after_a_server_restart_and_shows_everything_once(
    own_server: BrowserServer, pages: Pages
) -> None:
    patient = pages.open("patient", own_server.page_url("patient.html", own_server.token("Ann", "patient"), peer="Bob"))
    wait_online(patient)
    own_server.send_pm("Bob", "Ann", "before the crash")
    wait_for_text(patient, "before the crash")
    patient.wait_for_timeout(150)  # let the SDK's received marker go out (coalesced over 50 ms)

    own_server.kill()
    pw_expect(patient.locator("#status")).not_to_have_attribute("data-state", "online")
    send_from_page(patient, "typed while the server was down")  # queued by the SDK, re-sent later
    pw_expect(patient.locator("#thread .msg.pending")).to_have_count(1)

    own_server.start()
    # The page may still be waiting out its back-off: these go to the backlog or arrive live.
    own_server.send_pm("Bob", "Ann", "sent while you were away 1")
    own_server.send_pm("Bob", "Ann", "sent while you were away 2")
    wait_online(patient)
    wait_for_text(patient, "sent while you were away 2")
    pw_expect(patient.locator("#thread .msg.pending")).to_have_count(0)
    own_server.send_pm("Bob", "Ann", "after the restart")
    wait_for_text(patient, "after the restart")

    expected = [
        "before the crash",
        "sent while you were away 1",
        "sent while you were away 2",
        "typed while the server was down",
        "after the restart",
    ]
    texts = thread_texts(patient)
    assert sorted(texts) == sorted(expected), texts
    stored = [m["content"] for m in own_server.history("Ann", "Bob")]
    assert sorted(stored) == sorted(expected), stored  # the offline send was stored exactly once
    # The page's order is the server's seq order.
    assert texts == stored
    assert not pages.errors, pages.errors


def test_pages_without_a_token_ask_for_one(server: BrowserServer, pages: Pages) -> None:
    page = pages.open("login", server.origin + "/sdk/pages/patient.html")
    pw_expect(page.locator("#login")).to_be_visible()
    page.locator("#login-token").fill(server.token("Kim", "patient"))
    page.locator("#login-peer").fill("Rose")
    page.locator("#login button[type=submit]").click()
    wait_online(page)
    pw_expect(page.locator("#me")).to_have_text("Kim")
    pw_expect(page.locator("#peer-name")).to_have_text("Rose")


# ---- the SDK's structure: one state, getToken, history ------------------------------------------


def test_one_state_with_statechange_and_get_token_before_every_attempt(server: BrowserServer, pages: Pages) -> None:
    """getToken gives an expired token first: refused, refreshed, connected; a reconnect asks again."""
    tokens = [
        mint_token(server.secret, "GtPatient", "patient", -60),
        server.token("GtPatient", "patient"),
        mint_token(server.secret, "GtPatient", "patient", 1800),
    ]
    page = pages.sdk_page(server)
    result = run_js(
        page,
        """async ({url, tokens, goodToken}) => {
        const sockets = [];
        class RecordingSocket extends WebSocket {
            constructor(u) { super(u); sockets.push(this); }
        }
        let calls = 0;
        const states = [];
        const errors = [];
        const client = new IMClient({url, WebSocket: RecordingSocket, reconnectMinDelayMs: 50,
                                     reconnectMaxDelayMs: 200, getToken: async () => tokens[calls++]});
        client.on('statechange', (s) => states.push(s.previous + '>' + s.state));
        client.on('error', (e) => errors.push(e.code));
        const initial = client.state;
        await client.connect();
        const firstUser = client.userId;
        const reconnectedInfo = new Promise((r) => client.on('connected', r));
        await client.reconnect();
        const info = await reconnectedInfo;
        const sent = await client.sendP2P('GtDoctor', 'after a token refresh');
        client.close();
        // No fields of ours on the WebSocket objects (onopen & co. are the prototype's setters).
        const ownKeys = sockets.map((ws) => Object.keys(ws));

        // A getToken that fails once (the back end is down) is retried with the back-off.
        let flaky = 0;
        const retried = new IMClient({url, reconnectMinDelayMs: 50, reconnectMaxDelayMs: 200,
            getToken: async () => { if (flaky++ === 0) throw new Error('back end down'); return goodToken; }});
        const retriedErrors = [];
        retried.on('error', (e) => retriedErrors.push(e.code));
        await retried.connect();
        retried.close();

        // A getToken that never answers is cut off by connectTimeoutMs, then asked again.
        let hangs = 0;
        const patient = new IMClient({url, connectTimeoutMs: 300, reconnectMinDelayMs: 50,
            getToken: () => (hangs++ === 0 ? new Promise(() => {}) : Promise.resolve(goodToken))});
        const patientErrors = [];
        patient.on('error', (e) => patientErrors.push(e.code));
        await patient.connect();
        patient.close();
        return {initial, states, errors, calls, firstUser, reconnected: info.reconnected, seq: sent.seq,
                ownKeys, sockets: sockets.length, flaky, retriedErrors, retriedState: retried.state,
                hangs, patientErrors};
    }""",
        {"url": server.origin, "tokens": tokens, "goodToken": server.token("GtOther", "patient")},
    )
    assert result["initial"] == "idle"
    assert result["states"] == [
        "idle>connecting",
        "connecting>open",
        "open>connecting",
        "connecting>open",
        "open>closed",
    ]
    assert result["errors"] == [] and result["calls"] == 3 and result["firstUser"] == "GtPatient"
    assert result["reconnected"] is True and result["seq"] == 1
    assert result["sockets"] == 3 and result["ownKeys"] == [[], [], []]
    ws_tokens = [u.split("token=", 1)[1] for u in pages.websockets if "/ws?" in u]
    assert ws_tokens[:3] == tokens  # each attempt used the token getToken had just given
    assert result["flaky"] == 2 and result["retriedErrors"] == ["token_unavailable"]
    assert result["retriedState"] == "closed"
    assert result["hangs"] == 2 and result["patientErrors"] == ["token_unavailable"]


def test_history_pages_pm_gm_and_sm_over_rest(server: BrowserServer, pages: Pages) -> None:
    for n in range(1, 8):
        server.send_pm("HiDoctor", "HiPatient", f"第{n}条消息")
    status, group = server.call(
        "POST",
        "/api/v1/groups",
        {"id": "hi-group", "name": "诊所通知", "groupType": 1, "members": ["HiDoctor", "HiPatient"]},
        as_=("HiDoctor", "doctor"),
    )
    assert status == 201, group
    status, gm = server.call(
        "POST",
        "/api/v1/chats/gm",
        {"from": "HiDoctor", "group": "hi-group", "contentType": 1, "content": "明天停诊"},
        as_=("HiDoctor", "doctor"),
    )
    assert status == 201, gm
    status, sm = server.call(
        "POST",
        "/api/v1/chats/sm",
        {"to": "HiPatient", "title": "t", "summary": "s", "contentType": 1, "content": "系统通知"},
        as_=("platform", "service"),
    )
    assert status == 201, sm
    page = pages.sdk_page(server)
    result = run_js(
        page,
        """async ({url, token}) => {
        const client = new IMClient({url, token});  // REST only: no connect() needed
        const seqs = (page) => page.messages.map((m) => m.seq);
        const pages = [];
        let page = await client.history({channel: 'pm', peer: 'HiDoctor', limit: 3});
        while (page) { pages.push({seqs: seqs(page), next: page.next}); page = await page.more(); }
        const between = await client.history({channel: 'pm', peer: 'HiDoctor', after: 2, before: 6});
        const forwards = await client.history({channel: 'pm', peer: 'HiDoctor', after: 3, limit: 2});
        const forwardsMore = await forwards.more();
        const below = await client.history({channel: 'pm', peer: 'HiDoctor', before: 3});
        const gm = await client.history({channel: 'gm', group: 'hi-group'});
        const sm = await client.history({channel: 'sm'});
        const failures = {};
        const attempts = {
            noPeer: {channel: 'pm'}, badChannel: {channel: 'xx'},
            bigLimit: {channel: 'pm', peer: 'HiDoctor', limit: 500},
            badBefore: {channel: 'pm', peer: 'HiDoctor', before: -1},
            badSince: {channel: 'pm', peer: 'HiDoctor', since: 'soon'},
            othersPm: {channel: 'pm', peer: 'HiDoctor', user: 'SomeoneElse'},
            notMember: {channel: 'gm', group: 'no-such-group'},
        };
        for (const [name, spec] of Object.entries(attempts)) {
            try { await client.history(spec); failures[name] = 'resolved'; }
            catch (e) { failures[name] = {name: e.name, code: e.code || null, status: e.status || null}; }
        }
        return {pages, between: seqs(between), forwards: seqs(forwards), forwardsMore: seqs(forwardsMore),
                below: seqs(below), gm: gm.messages.map((m) => m.content), sm: sm.messages.map((m) => m.content),
                first: (await client.history({channel: 'pm', peer: 'HiDoctor', limit: 1})).messages[0].content,
                failures};
    }""",
        {"url": server.origin, "token": server.token("HiPatient", "patient")},
    )
    assert [p["seqs"] for p in result["pages"]] == [[5, 6, 7], [2, 3, 4], [1]]
    assert result["pages"][0]["next"] and result["pages"][-1]["next"] is None
    assert result["between"] == [3, 4, 5] and result["below"] == [1, 2]
    assert result["forwards"] == [4, 5] and result["forwardsMore"] == [6, 7]
    assert result["first"] == "第7条消息"
    assert result["gm"][-1] == "明天停诊" and result["sm"] == ["系统通知"]
    failures = result["failures"]
    for name in ("noPeer", "badChannel", "bigLimit", "badBefore", "badSince"):
        assert failures[name] == {"name": "TypeError", "code": None, "status": None}, name
    assert failures["othersPm"] == {"name": "IMError", "code": "forbidden", "status": 403}
    assert failures["notMember"]["name"] == "IMError" and failures["notMember"]["status"] in (403, 404)


# ---- the pages on a phone and on a desktop --------------------------------------------------------


def assert_usable(page: Page, selector: str) -> None:
    """Visible, wholly inside the viewport, and not covered: a tap at its centre reaches it."""
    locator = page.locator(selector)
    pw_expect(locator).to_be_visible()
    box = locator.bounding_box()
    size = page.viewport_size
    assert box is not None and size is not None, selector
    assert box["x"] >= 0 and box["y"] >= 0, (selector, box)
    assert box["x"] + box["width"] <= size["width"] + 0.5, (selector, box, size)
    assert box["y"] + box["height"] <= size["height"] + 0.5, (selector, box, size)
    reached = locator.evaluate("""(el) => {
        const r = el.getBoundingClientRect();
        const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
        return hit === el || el.contains(hit);
    }""")
    assert reached, f"{selector} is covered by another element"


def assert_no_sideways_scroll(page: Page) -> None:
    widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths


def press(page: Page, selector: str, touch: bool) -> None:
    """A finger's tap on a phone, a click on a desktop."""
    if touch:
        page.locator(selector).tap()
    else:
        page.locator(selector).click()


def save_screenshot(page: Page, name: str) -> None:
    """Kept on success too: these are for people to look at (Chinese text, layout)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_patient_and_doctor_pages_work_on_a_phone_and_a_desktop(server: BrowserServer, pages: Pages, size: str) -> None:
    device = DEVICES[size]
    touch = size == "phone"
    patient_id, doctor_id = f"Mei-{size}", f"DrLi-{size}"
    server.send_pm(doctor_id, patient_id, "您好，我是李医生。今天感觉怎么样？")

    patient = pages.open(
        "patient", server.page_url("patient.html", server.token(patient_id, "patient"), peer=doctor_id), device=device
    )
    wait_online(patient)
    wait_for_text(patient, "今天感觉怎么样")
    for selector in ("#status", "#thread", "#input", "#send"):
        assert_usable(patient, selector)
    # On a touch screen Enter is a new line; the Send button sends.
    patient.locator("#input").fill("医生您好，我发烧了。")
    if touch:
        patient.locator("#input").press("Enter")
        patient.locator("#input").press_sequentially("体温38.5度，头疼。")
        pw_expect(patient.locator("#thread .msg")).to_have_count(1)  # nothing sent by Enter
    press(patient, "#send", touch)
    expected = "医生您好，我发烧了。\n体温38.5度，头疼。" if touch else "医生您好，我发烧了。"
    pw_expect(patient.locator("#thread .msg.mine .text")).to_have_text([expected])
    pw_expect(patient.locator("#thread .msg.mine .state")).to_have_text(["Sent"])

    # The console without a chat named: on a phone the patient list alone, then one thread.
    doctor = pages.open("doctor", server.page_url("doctor.html", server.token(doctor_id, "doctor")), device=device)
    wait_online(doctor)
    item = f'#conversations .conversation[data-peer="{patient_id}"]'
    assert_usable(doctor, item)
    pw_expect(doctor.locator(item + " .badge")).to_have_text("1")
    if touch:
        pw_expect(doctor.locator("#thread")).to_be_hidden()
    press(doctor, item, touch)
    wait_for_text(doctor, "体温" if touch else "我发烧了")
    selectors = ["#thread", "#input", "#send", "#start-consultation", "#end-consultation"]
    for selector in selectors + (["#back"] if touch else []):
        assert_usable(doctor, selector)
    if not touch:
        pw_expect(doctor.locator("#back")).to_be_hidden()
        assert_usable(doctor, item)  # list and thread side by side
    pw_expect(patient.locator("#thread .msg.mine .state")).to_have_text(["Read"])

    doctor.locator("#input").fill("多喝水，按时吃药。明天再量体温。")
    press(doctor, "#send", touch)
    wait_for_text(patient, "多喝水")
    wait_for_text(doctor, "多喝水")

    press(doctor, "#start-consultation", touch)
    wait_for_text(patient, "Consultation started")
    pw_expect(doctor.locator("#end-consultation")).to_be_enabled()
    assert_usable(doctor, "#end-consultation")
    for page, name in ((patient, "patient"), (doctor, "doctor")):
        assert_no_sideways_scroll(page)
        save_screenshot(page, f"layout-{size}-{name}")
    press(doctor, "#end-consultation", touch)
    wait_for_text(patient, "Consultation ended")
    pw_expect(doctor.locator("#consultation-state")).to_have_text("no open consultation")

    if touch:
        press(doctor, "#back", touch)  # back to the list, which shows the last message
        assert_usable(doctor, item)
        pw_expect(doctor.locator("#thread")).to_be_hidden()
        server.send_pm(patient_id, doctor_id, "谢谢医生", role="patient")
        pw_expect(doctor.locator(item + " .badge")).to_have_text("1")  # no thread open: unread
        save_screenshot(doctor, f"layout-{size}-doctor-list")
        press(doctor, item, touch)
        wait_for_text(doctor, "谢谢医生")
        assert_usable(doctor, "#input")
    assert not pages.errors, pages.errors


def test_read_state_survives_a_reload_on_both_pages(server: BrowserServer, pages: Pages) -> None:
    patient = pages.open("patient", server.page_url("patient.html", server.token("Lan", "patient"), peer="DrWu"))
    doctor = pages.open("doctor", server.page_url("doctor.html", server.token("DrWu", "doctor"), peer="Lan"))
    wait_online(patient)
    wait_online(doctor)
    send_from_page(doctor, "记得空腹抽血")
    wait_for_text(patient, "记得空腹抽血")  # the patient's page is open: read at once
    pw_expect(doctor.locator("#thread .msg.mine .state")).to_have_text(["Read"])
    send_from_page(patient, "好的，明早去")
    wait_for_text(doctor, "好的，明早去")
    pw_expect(patient.locator("#thread .msg.mine .state")).to_have_text(["Read"])

    for page in (doctor, patient):
        page.reload()
        wait_online(page)
        pw_expect(page.locator("#thread .msg")).to_have_count(2)
        pw_expect(page.locator("#thread .msg.mine .state")).to_have_text(["Read"])
    assert not pages.errors, pages.errors


def test_earlier_messages_load_a_page_at_a_time(server: BrowserServer, pages: Pages) -> None:
    for n in range(1, 61):
        server.send_pm("DrZhao", "Ping", f"message {n}")
    # Read (so received) elsewhere before: the connect backlog has nothing, history has it all.
    marker = {"user_id": "Ping", "channel": "pm", "peer": "DrZhao", "seq": 60}
    status, body = server.call("POST", "/api/v1/conversations/read", marker, as_=("Ping", "patient"))
    assert status == 200, body
    patient = pages.open("patient", server.page_url("patient.html", server.token("Ping", "patient"), peer="DrZhao"))
    wait_online(patient)
    pw_expect(patient.locator("#thread .msg")).to_have_count(50)  # the newest page
    assert thread_texts(patient)[0] == "message 11"
    pw_expect(patient.locator("#older")).to_be_visible()
    patient.locator("#older").click()
    pw_expect(patient.locator("#thread .msg")).to_have_count(60)
    assert thread_texts(patient) == [f"message {n}" for n in range(1, 61)]
    pw_expect(patient.locator("#older")).to_be_hidden()
    assert not pages.errors, pages.errors


def test_landing_page_leads_to_the_demos_on_a_phone(server: BrowserServer, pages: Pages) -> None:
    page = pages.open("index", server.origin + "/", device=PHONE)
    pw_expect(page.locator("h1")).to_have_text("Family-doctor IM server")
    for href in ("/sdk/pages/patient.html", "/sdk/pages/doctor.html", "/docs/sdk", "/api/v1/openapi.json"):
        assert_usable(page, f'a[href="{href}"]')
    assert_no_sideways_scroll(page)
    save_screenshot(page, "layout-phone-index")
    page.locator('a[href="/docs/sdk"]').tap()
    pw_expect(page.locator("body")).to_contain_text("client.history(")
    page.go_back()
    page.locator('a[href="/sdk/pages/patient.html"]').tap()
    pw_expect(page.locator("#login")).to_be_visible()
    assert not pages.console_errors, pages.console_errors  # a CSP violation would show here
    assert not pages.errors, pages.errors


@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_doctor_console_shows_when_the_patient_received_and_read(
    server: BrowserServer, pages: Pages, size: str
) -> None:
    touch = size == "phone"
    doctor_id, patient_id = f"DrZhao-{size}", f"Ling-{size}"
    doctor = pages.open(
        "doctor",
        server.page_url("doctor.html", server.token(doctor_id, "doctor"), peer=patient_id),
        device=DEVICES[size],
    )
    asked: list[str] = []
    doctor.on("request", lambda r: asked.append(r.url) if r.url.endswith("/receipts") else None)
    missing: list[str] = []
    doctor.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    wait_online(doctor)
    texts = ["第一条", "第二条", "第三条", "请明早空腹抽血"]
    for text in texts:
        doctor.locator("#input").fill(text)
        press(doctor, "#send", touch)
        wait_for_text(doctor, text)
    # The patient is not connected: sent, not received. Only the last three carry a line.
    lines = doctor.locator("#thread .msg.mine .receipt-times")
    pw_expect(lines).to_have_text(["Not received yet"] * 3)
    pw_expect(doctor.locator("#thread .msg.mine").first.locator(".receipt-times")).to_have_count(0)

    patient = pages.open(
        "patient",
        server.page_url("patient.html", server.token(patient_id, "patient"), peer=doctor_id),
        device=DEVICES[size],
    )
    wait_online(patient)
    wait_for_text(patient, "请明早空腹抽血")  # the thread is open: received, then read at once
    pw_expect(lines.last).to_have_text(re.compile(r"^Received .+ · Read .+$"))
    pw_expect(lines).to_have_text([re.compile(r"^Received .+ · Read .+$")] * 3)

    # The times are the recorded ones (GET .../receipts as the sender), as the page formats them.
    last_id = doctor.locator("#thread .msg.mine").last.get_attribute("data-id")
    status, body = server.call("GET", f"/api/v1/chats/pm/{last_id}/receipts", as_=(doctor_id, "doctor"))
    assert status == 200, body
    [receipt] = body["receipts"]
    assert receipt["user"] == patient_id and receipt["receivedAt"] <= receipt["readAt"]
    shown = doctor.evaluate(
        "(r) => 'Received ' + IMDemo.formatTime(r.receivedAt) + ' · Read ' + IMDemo.formatTime(r.readAt)", receipt
    )
    pw_expect(lines.last).to_have_text(shown)
    pw_expect(lines.last).to_have_class(re.compile(r"\bread\b"))
    # Cheap: a few messages per refresh, and complete receipts are not asked for again.
    count = len(asked)
    assert count <= 3 * (len(texts) + 3), asked
    server.send_pm(patient_id, doctor_id, "好的", role="patient")  # a refresh: nothing left to ask
    wait_for_text(doctor, "好的")
    doctor.wait_for_timeout(600)
    assert len(asked) == count, asked[count:]
    assert_no_sideways_scroll(doctor)
    save_screenshot(doctor, f"receipts-{size}-doctor")
    assert not pages.errors, pages.errors
    assert not missing, missing  # no receipts request went astray
    # No CSP violation (the page's own loading 404s something before `missing` listens: not ours).
    assert not [e for e in pages.console_errors if "Failed to load resource" not in e], pages.console_errors


def test_sdk_receipts_of_a_message(server: BrowserServer, pages: Pages) -> None:
    page = pages.sdk_page(server)
    result = run_js(
        page,
        """async ({url, doctorToken, patientToken}) => {
        const doctor = new IMClient({url, token: doctorToken});
        const other = new IMClient({url, token: patientToken});
        await doctor.connect();
        const sent = await doctor.sendP2P('RcptPatient', 'bring the report');
        const before = await doctor.receipts(sent);
        const refused = await other.receipts('pm', sent.id).then(() => null, (e) => [e.code, e.status]);
        const bad = await doctor.receipts({channel: 'xx', id: 'a'}).then(() => null, (e) => e.name);
        doctor.close();
        return {id: sent.id, before, refused, bad};
    }""",
        {
            "url": server.origin,
            "doctorToken": server.token("RcptDoctor", "doctor"),
            "patientToken": server.token("RcptOther", "patient"),
        },
    )
    assert result["before"] == {
        "message": result["id"],
        "receipts": [{"user": "RcptPatient", "receivedAt": None, "readAt": None}],
    }
    assert result["refused"] == ["forbidden", 403]
    assert result["bad"] == "TypeError"


# ---- recall and edit (SPEC §14) -------------------------------------------------------------------


def test_sdk_recall_and_edit_resolve_with_the_changed_message_and_emit_events(
    server: BrowserServer, pages: Pages
) -> None:
    page = pages.sdk_page(server)
    result = run_js(
        page,
        """async ({url, doctorToken, patientToken}) => {
        const doctor = new IMClient({url, token: doctorToken});
        const patient = new IMClient({url, token: patientToken});
        const seen = {doctor: [], patient: []};
        for (const [name, client] of [['doctor', doctor], ['patient', patient]]) {
            client.on('recalled', (m) => seen[name].push(['recalled', m.id, m.content, m.recalled, m.recalledBy]));
            client.on('edited', (m) => seen[name].push(['edited', m.id, m.content, m.editCount, m.editedBy]));
        }
        const arrived = new Promise((resolve) => patient.on('message', (m) => { if (!m.event) resolve(m); }));
        await Promise.all([doctor.connect(), patient.connect()]);
        const sent = await doctor.sendP2P('RcPatient', 'take 500 mg');
        await arrived;
        const edited = await doctor.edit(sent, 'take 50 mg');
        const refused = await patient.recall(sent).then(() => null, (e) => [e.code, e.name]);
        const recalled = await doctor.recall('pm', sent.id);
        const again = await doctor.recall(sent);
        const afterRecall = await doctor.edit(sent, 'x').then(() => null, (e) => e.code);
        const empty = await doctor.edit(sent, '  ').then(() => null, (e) => e.code);
        const badRef = await doctor.recall({channel: 'pm'}).then(() => null, (e) => e.name);
        const until = Date.now() + 5000;
        while ((seen.patient.length < 2 || seen.doctor.length < 2) && Date.now() < until) {
            await new Promise((r) => setTimeout(r, 20));
        }
        doctor.close();
        patient.close();
        return {sent, edited, refused, recalled, again, afterRecall, empty, badRef, seen};
    }""",
        {
            "url": server.origin,
            "doctorToken": server.token("RcDoctor", "doctor"),
            "patientToken": server.token("RcPatient", "patient"),
        },
    )
    sent_id = result["sent"]["id"]
    assert result["edited"]["id"] == sent_id and result["edited"]["content"] == "take 50 mg"
    assert result["edited"]["editCount"] == 1
    assert result["refused"] == ["forbidden", "IMError"]
    recalled = result["recalled"]
    assert recalled["recalled"] is True and recalled["content"] == "" and recalled["recalledBy"] == "RcDoctor"
    assert result["again"] == recalled
    refusals = (result["afterRecall"], result["empty"], result["badRef"])
    assert refusals == ("message_recalled", "invalid_field", "TypeError")
    expected = [
        ["edited", sent_id, "take 50 mg", 1, "RcDoctor"],
        ["recalled", sent_id, "", True, "RcDoctor"],
    ]
    assert result["seen"] == {"doctor": expected, "patient": expected}
    stored = server.history("RcPatient", "RcDoctor")
    assert stored[0]["recalled"] is True
    assert [m.get("event") for m in stored[1:]] == ["message.edited", "message.recalled"]


@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_pages_let_the_sender_edit_and_recall_and_both_sides_see_it(
    server: BrowserServer, pages: Pages, size: str
) -> None:
    touch = size == "phone"
    doctor_id, patient_id = f"DrQian-{size}", f"Yun-{size}"
    doctor = pages.open(
        "doctor",
        server.page_url("doctor.html", server.token(doctor_id, "doctor"), peer=patient_id),
        device=DEVICES[size],
    )
    patient = pages.open(
        "patient",
        server.page_url("patient.html", server.token(patient_id, "patient"), peer=doctor_id),
        device=DEVICES[size],
    )
    wait_online(doctor)
    wait_online(patient)
    doctor.locator("#input").fill("每天两次，每次500毫克")
    press(doctor, "#send", touch)
    wait_for_text(patient, "每次500毫克")
    patient.locator("#input").fill("我把照片发错了")
    press(patient, "#send", touch)
    wait_for_text(doctor, "我把照片发错了")

    # The doctor corrects the dose: Edit puts the text in the composer, Send saves the edit.
    doctor_message = doctor.locator("#thread .msg.mine").last
    assert_usable(doctor, "#thread .msg.mine .msg-actions .edit")
    press(doctor, "#thread .msg.mine .msg-actions .edit", touch)
    pw_expect(doctor.locator(".editing-bar")).to_be_visible()
    pw_expect(doctor.locator("#input")).to_have_value("每天两次，每次500毫克")
    doctor.locator("#input").fill("每天两次，每次50毫克")
    assert_usable(doctor, ".editing-bar .cancel")
    save_screenshot(doctor, f"edit-{size}-doctor")
    press(doctor, "#send", touch)
    pw_expect(doctor.locator(".editing-bar")).to_be_hidden()
    pw_expect(doctor_message.locator(".text")).to_have_text("每天两次，每次50毫克")
    pw_expect(doctor_message.locator(".edited")).to_have_text("Edited")
    patient_copy = patient.locator("#thread .msg:not(.mine)").last
    pw_expect(patient_copy.locator(".text")).to_have_text("每天两次，每次50毫克")
    pw_expect(patient_copy.locator(".edited")).to_have_text("Edited")

    # The patient recalls its message: both sides show a quiet line in its place.
    assert_usable(patient, "#thread .msg.mine .msg-actions .recall")
    press(patient, "#thread .msg.mine .msg-actions .recall", touch)
    pw_expect(patient.locator("#thread .msg.mine.recalled .text")).to_have_text("You recalled a message")
    pw_expect(doctor.locator("#thread .msg.recalled .text")).to_have_text(f"{patient_id} recalled a message")
    pw_expect(patient.locator("#thread .msg.mine.recalled .msg-actions")).to_have_count(0)
    # The notices are not bubbles of their own: two messages on each side.
    for page in (doctor, patient):
        pw_expect(page.locator("#thread .msg")).to_have_count(2)
        assert "我把照片发错了" not in " ".join(thread_texts(page))
        assert_no_sideways_scroll(page)
    preview = doctor.locator(f'#conversations .conversation[data-peer="{patient_id}"] .preview')
    pw_expect(preview).to_have_text(f"{patient_id} recalled a message")
    # The console's received / read line under its own (edited) message is kept.
    pw_expect(doctor_message.locator(".receipt-times")).to_have_text(re.compile(r"^Received .+ · Read .+$"))
    save_screenshot(doctor, f"recall-{size}-doctor")
    save_screenshot(patient, f"recall-{size}-patient")

    # A reload shows the same (REST history has the changed messages and the notices).
    for page in (doctor, patient):
        page.reload()
        wait_online(page)
        pw_expect(page.locator("#thread .msg")).to_have_count(2)
        pw_expect(page.locator("#thread .msg.recalled")).to_have_count(1)
        pw_expect(page.locator("#thread .msg .edited")).to_have_count(1)
    assert not pages.errors, pages.errors
    assert not pages.dialogs, pages.dialogs
