"""Reviewing in a real headless Chromium against a real daphne server (and, distributed, a real
Celery worker): a refund that needs two approvals shows "1 of 2" once the first reviewer
approves from the queue, confirmed in the row even with the websocket down; a refused decision
says why in its row; an edit shows what it changed, in its preview and on the request page.
Screenshots go to artifacts/screenshots/<mode>/."""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import Browser, expect

from tests.test_browser import (  # noqa: F401  (fixtures)
    REFUND,
    Watched,
    _start_from_dashboard,
    browser,
    server,
    worker,
)


def _csp_refusals(watched: Watched) -> list[str]:
    refused: list[str] = []
    watched.page.on("console", lambda m: refused.append(f"{watched.page.url}: {m.text}")
                    if "Content Security Policy" in m.text else None)
    return refused


def test_it_shows_one_of_two_approvals_and_an_edits_diff(
        request: pytest.FixtureRequest, server: str, browser: Browser) -> None:  # noqa: F811
    request.getfixturevalue("worker")
    op = Watched(browser.new_context(), server, "operator")
    _start_from_dashboard(op, "refund-exception", dict(REFUND, amount=5000))
    expect(op.page.locator("#run-status")).to_have_text("waiting")

    # The first reviewer's websocket never opens: the htmx answer itself must confirm.
    context = browser.new_context()
    context.route_web_socket("**/ws/**", lambda ws: ws.close())
    first = Watched(context, server, "reviewer")
    refused = _csp_refusals(first)
    first.page.goto(f"{server}/review/")
    row = first.page.locator("#review-queue tbody tr", has_text="issue_refund")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("0 of 2 approvals")
    expect(row).to_contain_text("refund-over-1000 v1")
    expect(row).to_contain_text("amount > 1000 (the call has 5000)")
    expect(row).to_contain_text("Run input:")
    first.shot("review-queue-two-approvers")
    row.locator("button[value=approve]").click()
    confirmed = first.page.locator("#review-queue")
    expect(confirmed).to_contain_text("1 of 2 approvals recorded; waiting for one more")
    expect(confirmed).to_contain_text("for run ")
    first.shot("review-queue-first-of-two")
    assert first.page.evaluate("document.documentElement.getAttribute('data-live')") != "open"

    second = Watched(browser.new_context(), server, "reviewer2")
    refused += _csp_refusals(second)
    second.page.add_init_script("""document.addEventListener("htmx:wsAfterMessage",
        () => { window.__pushes = (window.__pushes || 0) + 1; });""")
    second.page.goto(f"{server}/review/")
    # The queue as pushed on connect: no later push replaces the row the refusal is shown in.
    second.page.wait_for_function("() => window.__pushes > 0")
    row = second.page.locator("#review-queue tbody tr", has_text="issue_refund")
    expect(row).to_contain_text("1 of 2 approvals")
    expect(row).to_contain_text("reviewer,")
    # A refusal is shown in its row: here, arguments that changed since the page was loaded.
    row.evaluate("""tr => {
        tr.querySelector("input[name=arguments_digest]").value = "0".repeat(64);
        tr.querySelector("button[value=approve]").click();
    }""")
    expect(row.locator("[role=alert]")).to_contain_text("digest mismatch")
    second.shot("review-queue-refused-in-row")
    row.locator("a", has_text="Edit, see details").click()
    second.page.wait_for_url(f"{server}/review/*/")
    detail = second.page.url
    expect(second.page.locator("#approval-progress")).to_contain_text("1 of 2 approvals")
    expect(second.page.locator("#approval-progress")).to_contain_text("reviewer: Approve at")
    expect(second.page.locator("#policy-match")).to_contain_text(
        "refund-over-1000 v1: tool is issue_refund; amount > 1000 (the call has 5000)")
    expect(second.page.locator("#run-input")).to_contain_text("kim@example.com")
    second.shot("approval-detail-one-of-two")

    second.page.fill("textarea[name=arguments]",
                     json.dumps({"order_id": "ORD-1042", "amount": 4000}))
    second.page.click("#preview-edit")
    preview = second.page.locator("#preview-changes")
    expect(preview).to_contain_text("amount")
    expect(preview).to_contain_text("5000")
    expect(preview).to_contain_text("4000")
    assert second.page.url == detail  # previewed in place
    second.shot("approval-edit-preview")
    second.page.click("button[value=edit]")
    second.page.wait_for_url(f"{server}/review/")
    expect(second.page.locator(".messages")).to_contain_text("Approved with edits issue_refund")

    second.page.goto(detail)
    changes = second.page.locator("#changes tbody tr")
    expect(changes).to_have_count(1)
    expect(changes).to_contain_text("amount")
    expect(changes.locator("td").nth(2)).to_have_text("5000")
    expect(changes.locator("td").nth(3)).to_have_text("4000")
    # The first approval was of the arguments before the edit: it no longer counts.
    expect(second.page.locator("#approval-progress")).to_contain_text("1 of 2 approvals")
    expect(second.page.locator("#approval-progress")).to_contain_text("not counted")
    second.shot("approval-detail-edited")
    assert refused == []


@pytest.fixture
def identical_lookups(server: str, people: dict) -> list[str]:  # noqa: F811
    """Two paused lookups of the same order (a read tool) under a policy that asks a reviewer:
    set up before the browser starts, since the ORM cannot run beside Playwright's loop."""
    from django.contrib.auth.models import Group

    from approvals import services as approvals
    from approvals.models import Policy
    from tests.test_review_context import lookup_request

    policy = Policy.objects.create(slug="lookups", name="Order lookups")
    approvals.policy_publish(policy=policy, tool="lookup_order", risk_class="",
                             conditions=[{"arg": "order_id", "op": "==", "value": "ORD-BULK"}],
                             decider_group=Group.objects.get(name="reviewer"))
    return [str(lookup_request(people["operator"], order="ORD-BULK").run_id)[:8]
            for _ in range(2)]


def test_it_approves_identical_low_risk_requests_after_confirming(
        server: str, identical_lookups: list[str], browser: Browser) -> None:  # noqa: F811
    reviewer = Watched(browser.new_context(), server, "reviewer")
    refused = _csp_refusals(reviewer)
    reviewer.page.goto(f"{server}/review/")
    group = reviewer.page.locator("#bulk-groups li", has_text="lookup_order")
    expect(group).to_contain_text("2 ×")
    group.locator("button", has_text="Review and approve these 2").click()
    panel = reviewer.page.locator("#bulk-panel")
    expect(panel).to_contain_text("Approve these 2 identical requests?")
    expect(panel.locator("input[name=requests]:checked")).to_have_count(2)
    assert reviewer.page.url == f"{server}/review/"  # the confirmation step is swapped in
    reviewer.shot("review-bulk-confirm")
    panel.locator("button", has_text="Approve the selected requests").click()
    results = panel.locator("#bulk-results li.success")
    expect(results).to_have_count(2)
    for run in identical_lookups:
        expect(panel).to_contain_text(f"for run {run}: the run goes on")
    expect(reviewer.page.locator("#bulk-groups")).to_have_count(0)
    reviewer.shot("review-bulk-done")
    assert refused == []
