"""Every console screen on a 375 px wide phone, in a real Chromium against a real daphne (and in
the distributed pass a real Celery worker): nothing makes the page scroll sideways (wide tables
scroll inside their card), and each screen is saved as artifacts/screenshots/<mode>/375-*.png.
A 1366 px laptop sees every column of the agents table."""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser, expect

from tests.test_browser import (  # noqa: F401 (fixtures)
    REFUND,
    Watched,
    _start_from_dashboard,
    browser,
    server,
    worker,
)

PHONE = {"width": 375, "height": 812}
LAPTOP = {"width": 1366, "height": 768}


def _no_sideways_scroll(who: Watched, path: str, heading: str, name: str) -> None:
    who.page.goto(f"{who.base}{path}")
    expect(who.page.locator("main")).to_contain_text(heading)
    width = who.page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"{path} is {width} px wide at {PHONE['width']} px"
    who.shot(f"375-{name}")


def test_every_screen_fits_a_375_px_screen(
        request: pytest.FixtureRequest, server: str, browser: Browser) -> None:  # noqa: F811
    request.getfixturevalue("worker")
    op = Watched(browser.new_context(viewport=PHONE), server, "operator")
    run_url = _start_from_dashboard(op, "refund-exception", REFUND)
    expect(op.page.locator("#run-status")).to_have_text("waiting")
    run_path = run_url.removeprefix(server)
    approval_path = op.page.locator("#waiting-on a").first.get_attribute("href")
    assert approval_path and approval_path.startswith("/review/")

    for path, heading, name in [
            ("/", "Start a run", "dashboard"),
            ("/runs/", "Runs", "runs"),
            (run_path, "Trace", "run-detail"),
            (f"{run_path}trace/", "Waterfall", "run-trace"),
            ("/review/", "Review", "review-queue-operator"),
            ("/settings/time-zone/", "Time zone", "time-zone"),
            ("/settings/notifications", "Notifications", "notifications")]:
        _no_sideways_scroll(op, path, heading, name)

    reviewer = Watched(browser.new_context(viewport=PHONE), server, "reviewer")
    for path, heading, name in [
            ("/review/", "issue_refund", "review-queue"),
            (approval_path, "issue_refund", "approval-detail")]:
        _no_sideways_scroll(reviewer, path, heading, name)

    admin = Watched(browser.new_context(viewport=PHONE), server, "admin")
    for path, heading, name in [
            ("/agents/", "Agents", "agents"),
            ("/agents/refund-executor/", "refund-executor", "agent-detail"),
            ("/tools/", "Tools", "tools"),
            ("/analytics/", "Analytics", "analytics"),
            ("/ledger/", "Ledger", "ledger")]:
        _no_sideways_scroll(admin, path, heading, name)

    # The top bar wraps: every link stays on screen.
    for link in admin.page.locator("header.topbar a").all():
        box = link.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], \
            link.inner_text()
    # A wide table scrolls inside its card instead.
    scroller = admin.page.locator("main .table-scroll").first
    assert scroller.evaluate("e => e.scrollWidth > e.clientWidth"), \
        "the ledger's table is expected to be wider than a phone and to scroll in its card"

    signed_out = browser.new_context(viewport=PHONE).new_page()
    signed_out.goto(f"{server}/login/")
    assert signed_out.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


@pytest.fixture
def busy_agents(server: str) -> None:  # noqa: F811
    """Agents as a working console has them: real model names, several tools each, and a
    last use (before the browser starts: the ORM then runs outside its event loop)."""
    from django.utils import timezone
    from guardian.shortcuts import assign_perm

    from orchestration.models import Agent, Process, Run, Task, Tool

    tools = list(Tool.objects.order_by("slug")[:4])
    run = Run.objects.create(process_version=Process.objects.get(
        slug="vendor-onboarding").current_version, status="succeeded")
    for agent in Agent.objects.all():
        agent.provider, agent.model_name = "openai", "gpt-4o-mini-2024-07-18"
        agent.save(update_fields=["provider", "model_name"])
        for tool in tools:
            assign_perm("orchestration.invoke_tool", agent.user, tool)
        Task.objects.create(run=run, key=f"t-{agent.slug}", executor_type="agent",
                            executor_ref=agent.slug, status="succeeded",
                            started_at=timezone.now(), finished_at=timezone.now())


def test_a_laptop_sees_every_column_of_the_agents_table(
        server: str, busy_agents: None, browser: Browser) -> None:  # noqa: F811
    admin = Watched(browser.new_context(viewport=LAPTOP), server, "admin")
    admin.page.goto(f"{server}/agents/")
    table = admin.page.locator("table.agents")
    expect(table).to_be_visible()
    assert table.evaluate("t => t.scrollWidth <= t.parentElement.clientWidth"), \
        "the agents table is cut at 1366 px"
    assert admin.page.evaluate("document.documentElement.scrollWidth") <= LAPTOP["width"]
    admin.shot("1366-agents")
