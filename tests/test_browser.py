"""The console in a real headless Chromium (Debian's `chromium`, driven by Playwright) against a
real daphne server, and in the distributed pass a real Celery worker: pages update live over
websockets with no reload, and untrusted text stays text. Screenshots of each screen go to
artifacts/screenshots/<mode>/."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests.conftest import (
    CHROMIUM,
    CHROMIUM_SESSION,
    DISTRIBUTED,
    REQUIRE_SERVICES,
    ROOT,
    VENDOR_INPUT,
    daphne_process,
    wait_for,
)

MODE = "distributed" if DISTRIBUTED else "standalone"
SHOTS = ROOT / "artifacts" / "screenshots" / MODE
XSS_IMG = '<img src=x onerror="window.__xss=1">'
XSS_SCRIPT = "<script>window.__xss=1</script>"
REFUND = {"order_id": "ORD-1042", "reason": "damaged", "customer_email": "kim@example.com",
          "amount": 500}


def _missing() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return ""


if _missing():
    if REQUIRE_SERVICES:
        raise RuntimeError(f"SWITCHBOARD_REQUIRE_SERVICES is set but {_missing()}")
    pytest.skip(f"browser tests skipped: {_missing()}", allow_module_level=True)

from playwright.sync_api import Browser, BrowserContext, Page, expect  # noqa: E402

expect.set_options(timeout=60_000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (Linux's /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    fds = Path(f"/proc/{pid}/fd")
    try:
        held = {os.readlink(fd) for fd in fds.iterdir()}
    except FileNotFoundError:  # exited: the caller's poll says so
        return False
    return bool(inodes & held)


@pytest.fixture
def server(request: pytest.FixtureRequest, transactional_db: Any, demo: None) -> Iterator[str]:
    """`daphne console.asgi:application` on a free port, against the test database: forked from
    the test process's server zygote (tests/zygote.py), or started afresh when the test changed
    the environment the zygote was given."""
    port = _free_port()
    with daphne_process(request, ["-b", "127.0.0.1", "-p", str(port),
                                  "console.asgi:application"],
                        log_name=f"daphne-{MODE}.log") as (proc, log_path):

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daphne exited early; see {log_path}")
            # Its own socket: the port was free when chosen, and another test process (the
            # other pass's browser tests run at the same time) may have taken it since.
            return _listens(proc.pid, port)

        wait_for(up, timeout=30, what="daphne to listen")
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def worker(request: pytest.FixtureRequest, server: str) -> None:
    if DISTRIBUTED:
        request.getfixturevalue("celery_worker")


@pytest.fixture
def browser() -> Iterator[Browser]:
    """The test process's Chromium (tests/conftest.py's CHROMIUM_SESSION). The contexts a test
    opened are closed after it, so none of its pages polls or reconnects to a server that is
    gone."""
    chromium = CHROMIUM_SESSION.get()
    yield chromium
    if chromium.is_connected():
        for context in chromium.contexts:
            context.close()


class Watched:
    """A signed-in page that records websocket frames and its polling requests."""

    def __init__(self, context: BrowserContext, base: str, username: str) -> None:
        self.base = base
        self.page: Page = context.new_page()
        self.frames: list[str] = []
        self.polls: list[str] = []
        self.page.on("websocket", lambda ws: ws.on(
            "framereceived", lambda payload: self.frames.append(str(payload))))
        self.page.on("request", lambda r: self.polls.append(r.url)
                     if r.headers.get("hx-request") else None)
        self.page.goto(f"{base}/login/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", settings.SWITCHBOARD_DEMO_PASSWORD)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(f"{base}/")

    def mark(self) -> None:
        """Set a marker that only survives as long as the page is never reloaded."""
        self.page.wait_for_selector("html[data-live=open]", state="attached", timeout=15_000)
        self.page.evaluate("window.__noReload = true")
        self.polls.clear()
        self.frames.clear()

    def assert_live(self, needle: str) -> None:
        assert self.page.evaluate("window.__noReload") is True, "the page was reloaded"
        assert any(needle in f for f in self.frames), \
            f"no websocket fragment contained {needle!r} ({len(self.frames)} frames)"
        assert self.polls == [], (
            f"the polling fallback fired while the socket was open: {self.polls}")

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _start_from_dashboard(op: Watched, process: str, data: dict[str, Any]) -> str:
    """Start a run from the dashboard's JSON editor (behind "Advanced: edit as JSON")."""
    op.page.goto(f"{op.base}/?process={process}")
    op.page.click("#start-json summary")
    op.page.fill("#start-json textarea[name=input]", json.dumps(data))
    op.page.click("#start-json button[type=submit]")
    op.page.wait_for_url(f"{op.base}/runs/**")
    return op.page.url


def _hold_worker(request: pytest.FixtureRequest) -> Any:
    """Distributed: a worker that takes no work until the returned function is called, so a run
    page surely loads before its run moves. Standalone work runs inside daphne at once."""
    if not DISTRIBUTED:
        return lambda: None
    from console.celery import app

    request.getfixturevalue("celery_worker")
    # limit=1: the one worker's answer ends the wait (without it a broadcast waits out timeout)
    answer = app.control.cancel_consumer("celery", reply=True, timeout=10, limit=1)
    assert answer, "worker did not answer"
    return lambda: app.control.add_consumer("celery", reply=True, timeout=10, limit=1)


def test_it_shows_a_run_reaching_succeeded_without_a_reload(
        request: pytest.FixtureRequest, server: str, browser: Browser) -> None:
    start_worker = _hold_worker(request)
    op = Watched(browser.new_context(), server, "operator")
    op.shot("dashboard")
    url = _start_from_dashboard(op, "vendor-onboarding", VENDOR_INPUT)
    op.mark()
    initially = op.page.inner_text("#run-status")
    start_worker()
    expect(op.page.locator("#run-status")).to_have_text("succeeded")
    if DISTRIBUTED:
        assert initially == "pending"
    if initially != "succeeded":
        op.assert_live('id="run-status">succeeded<')
    assert op.page.url == url
    op.shot("run-detail")


def test_it_updates_the_operators_page_when_a_reviewer_approves(
        request: pytest.FixtureRequest, server: str, browser: Browser) -> None:
    request.getfixturevalue("worker")
    op = Watched(browser.new_context(), server, "operator")
    _start_from_dashboard(op, "refund-exception", REFUND)
    expect(op.page.locator("#run-status")).to_have_text("waiting")
    expect(op.page.locator("#waiting-on")).to_be_visible()
    op.mark()

    reviewer = Watched(browser.new_context(), server, "reviewer")
    reviewer.page.goto(f"{server}/review/")
    row = reviewer.page.locator("#review-queue tbody tr", has_text="issue_refund")
    expect(row).to_have_count(1)
    reviewer.shot("review-queue")
    reviewer.page.click("#review-queue a:has-text('Edit, see details')")
    reviewer.page.wait_for_url(f"{server}/review/*/")
    reviewer.shot("approval-detail")
    reviewer.page.go_back()
    reviewer.page.locator("#review-queue button[value=approve]").click()
    expect(reviewer.page.locator("#review-queue")).to_contain_text("Nothing is waiting for you.")

    expect(op.page.locator("#run-status")).to_have_text("succeeded")
    expect(op.page.locator("#waiting-on")).to_have_count(0)
    op.assert_live('id="run-status">succeeded<')
    op.shot("run-detail-approved")


def test_it_renders_script_in_run_input_and_model_output_as_text(
        request: pytest.FixtureRequest, server: str, browser: Browser) -> None:
    start_worker = _hold_worker(request)
    op = Watched(browser.new_context(), server, "operator")
    # The reason is run input, and the scripted model repeats it in its answer.
    hostile = dict(REFUND, amount=40, reason=f"damaged {XSS_IMG} {XSS_SCRIPT}")
    url = _start_from_dashboard(op, "refund-exception", hostile)
    op.mark()
    initially = op.page.inner_text("#run-status")
    start_worker()
    # The model writes the reason into its TOML handoff too: escaped there, so the run succeeds.
    expect(op.page.locator("#run-status")).to_have_text("succeeded")
    shown = [json.dumps(XSS_IMG)[1:-1], XSS_SCRIPT]  # as the ledger's JSON shows them
    live = op.page.locator("#run-live")
    for text in shown:
        expect(live).to_contain_text(text)
    assert op.page.evaluate("typeof window.__xss") == "undefined"
    assert op.page.locator("#run-live img, #run-live script").count() == 0
    if initially != "succeeded":
        op.assert_live("&lt;script&gt;window.__xss=1&lt;/script&gt;")

    op.page.goto(url)  # the same run, rendered afresh
    for text in shown:
        expect(op.page.locator("#run-live")).to_contain_text(text)
    assert op.page.evaluate("typeof window.__xss") == "undefined"
    assert op.page.locator("#run-live img, #run-live script").count() == 0
    op.page.locator("#run-live details").evaluate_all("all => all.forEach(d => d.open = true)")
    model_said = op.page.locator("#run-live li.trace-event", has_text="model.called")
    expect(model_said.filter(has_text=XSS_SCRIPT).first).to_be_visible()
    op.shot("run-detail-untrusted-text")


def test_it_shows_every_other_screen_to_an_admin(server: str, browser: Browser) -> None:
    """The runs list, agents, an agent, tools, analytics and the ledger: each renders with its
    own static files only (the Content-Security-Policy reports nothing) and is saved as a
    screenshot."""
    admin = Watched(browser.new_context(), server, "admin")
    refused: list[str] = []
    admin.page.on("console", lambda m: refused.append(f"{admin.page.url}: {m.text}")
                  if "Content Security Policy" in m.text else None)
    for path, name, heading in [("/runs/", "runs", "Runs"),
                                ("/agents/", "agents", "Agents"),
                                ("/agents/refund-executor/", "agent-detail", "refund-executor"),
                                ("/tools/", "tools", "Tools"),
                                ("/analytics/", "analytics", "Analytics"),
                                ("/ledger/", "ledger", "Ledger")]:
        admin.page.goto(f"{server}{path}")
        expect(admin.page.locator("main")).to_contain_text(heading)
        admin.shot(name)
    assert refused == []
