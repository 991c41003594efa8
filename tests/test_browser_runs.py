"""The runs list in a real Chromium: filtering by process and by a value in the input, the
filters kept in the URL (a filtered view can be shared and reloaded)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.test_browser import (  # noqa: F401 - the browser tests' fixtures
    Watched,
    browser,
    expect,
    server,
)
from tests.test_run_list import make_runs


@pytest.fixture
def seeded(server: str, people: dict) -> None:  # noqa: F811
    """The runs, written before the browser starts (its event loop then owns this thread)."""
    make_runs(people)


def test_an_operator_filters_the_runs_list_and_shares_the_view(
        seeded: None, server: str, browser: Any) -> None:  # noqa: F811
    op = Watched(browser.new_context(), server, "operator")
    op.page.goto(f"{server}/runs/")
    rows = op.page.locator("#run-table tbody tr")
    expect(rows).to_have_count(7)

    op.page.select_option("#run-filters select[name=process]", "refund-exception")
    op.page.fill("#run-filters input[name=q]", "ORD-103")
    op.page.click("#run-filters button[type=submit]")
    op.page.wait_for_url(re.compile(r".*process=refund-exception.*"))
    assert "q=ORD-103" in op.page.url
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("ORD-103")
    expect(op.page.locator("#run-count")).to_contain_text("1 run matches")
    op.shot("runs-filtered")

    # The same URL in another browser shows the same view, its filters filled in.
    shared = Watched(browser.new_context(), server, "operator")
    shared.page.goto(op.page.url)
    expect(shared.page.locator("#run-table tbody tr")).to_have_count(1)
    expect(shared.page.locator("#run-filters input[name=q]")).to_have_value("ORD-103")
    expect(shared.page.locator("#run-filters select[name=process]")).to_have_value(
        "refund-exception")

    op.page.select_option("#run-filters select[name=process]", "vendor-onboarding")
    op.page.fill("#run-filters input[name=q]", "")
    op.page.click("#run-filters button[type=submit]")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Northwind")
    op.page.click("#run-filters a:has-text('Clear')")
    expect(rows).to_have_count(7)
