"""The trace page in a real Chromium against a real daphne server (and in the distributed pass a
real Celery worker): a refund over 100 waits for a reviewer's approval and finishes; its trace
shows every model call, tool call, the decision and the wait, and a model call opens in place
with the conversation the model was sent. Screenshots go to artifacts/screenshots/<mode>/."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

# Through tests.test_browser, which skips the module when Playwright or Chromium is missing.
from tests.test_browser import (  # noqa: F401 - fixtures
    REFUND,
    Browser,
    Watched,
    _start_from_dashboard,
    browser,
    expect,
    server,
    worker,
)


def _off_loop[T](fn: Callable[[], T]) -> T:
    """Run an ORM read on a thread of its own: Playwright's loop runs on this one."""
    from django.db import connection

    def read() -> T:
        try:
            return fn()
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(read).result()


def _ledger(run_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    from audit.models import Event

    return _off_loop(lambda: list(Event.objects.filter(chain=run_id).order_by("seq")
                                  .values_list("seq", "kind", "data")))


def test_it_shows_every_span_of_an_approved_refund_and_opens_a_model_call(
        request: pytest.FixtureRequest, server: str, browser: Browser) -> None:  # noqa: F811
    request.getfixturevalue("worker")
    op = Watched(browser.new_context(), server, "operator")
    refused: list[str] = []
    op.page.on("console", lambda m: refused.append(m.text)
               if "Content Security Policy" in m.text else None)
    url = _start_from_dashboard(op, "refund-exception", REFUND)
    run_id = url.rstrip("/").rsplit("/", 1)[1]
    expect(op.page.locator("#run-status")).to_have_text("waiting")

    reviewer = Watched(browser.new_context(), server, "reviewer")
    reviewer.page.goto(f"{server}/review/")
    queued = reviewer.page.locator("#review-queue tbody tr", has_text="issue_refund")
    expect(queued).to_have_count(1)
    reviewer.page.locator("#review-queue button[value=approve]").click()
    expect(reviewer.page.locator("#review-queue")).to_contain_text("Nothing is waiting for you.")
    expect(op.page.locator("#run-status")).to_have_text("succeeded")

    op.page.click("#trace-waterfall-link")
    op.page.wait_for_url(f"{server}/runs/{run_id}/trace/")
    waterfall = op.page.locator("#waterfall")
    expect(waterfall).to_be_visible()

    events = _ledger(run_id)
    expected = ([f"model-{seq}" for seq, kind, _ in events
                 if kind in ("model.called", "qc.checked")]
                + [f"tool-{seq}" for seq, kind, _ in events if kind == "tool.called"]
                + [f"decision-{seq}" for seq, kind, _ in events if kind == "approval.requested"]
                + [f"wait-{seq}" for seq, kind, _ in events if kind == "task.waiting"])
    assert sum(1 for s in expected if s.startswith("model-")) >= 6
    assert sum(1 for s in expected if s.startswith("tool-")) == 4
    assert sum(1 for s in expected if s.startswith("decision-")) == 1
    assert sum(1 for s in expected if s.startswith("wait-")) == 1
    for span in expected:
        row = op.page.locator(f"#span-{span}")
        expect(row).to_be_visible()
        expect(row.locator("svg.wf-bar rect")).to_have_count(1)
    assert op.page.locator("#waterfall tr.span").count() == (
        len(expected) + 1 + 1 + 4)  # with the run, its phase and the four task attempts
    decision = next(s for s in expected if s.startswith("decision-"))
    expect(op.page.locator(f"#span-{decision}")).to_contain_text("reviewer")
    expect(op.page.locator(f"#span-{decision}")).to_contain_text("approved")
    op.shot("trace-waterfall")

    # The refund agent's first call: the model was asked to refund and called issue_refund.
    first_refund_call = next(seq for seq, kind, data in events
                             if kind == "model.called" and data.get("task") == "refund")
    op.page.evaluate("window.__noReload = true")
    op.page.click(f"#span-model-{first_refund_call} a")
    detail = op.page.locator(f"#span-detail[data-span=model-{first_refund_call}]")
    expect(detail).to_be_visible()
    expect(op.page.locator(f"#span-model-{first_refund_call}")).to_have_class(
        re.compile(r"\bselected\b"))
    prompt = detail.locator("#span-prompt")
    expect(prompt.locator("li.message")).to_have_count(2)
    expect(prompt.locator("li.role-user")).to_contain_text("Run input (JSON)")
    expect(prompt.locator("li.role-user")).to_contain_text("ORD-1042")
    expect(prompt.locator("li.role-system")).to_be_visible()
    expect(detail.locator("#span-answer")).to_contain_text("issue_refund")
    assert op.page.evaluate("window.__noReload") is True, "the span did not open in place"
    assert op.page.url == f"{server}/runs/{run_id}/trace/model-{first_refund_call}"
    op.shot("trace-model-call")

    op.page.click(f"#span-{decision} a")
    decided = op.page.locator(f"#span-detail[data-span={decision}]")
    expect(decided.locator("#span-decisions")).to_contain_text("reviewer decided approve")

    wait = next(s for s in expected if s.startswith("wait-"))
    op.page.goto(f"{server}/runs/{run_id}/trace/{wait}")  # a span is a page of its own too
    expect(op.page.locator(f"#span-detail[data-span={wait}]")).to_contain_text(
        "waited on people")
    assert refused == []
