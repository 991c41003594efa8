"""The dashboard's generated start form in a real headless Chromium against a real daphne
server (see tests/test_browser.py): each demo process's form is filled in and starts a run;
the browser refuses what the schema's HTML attributes refuse; a value only the server refuses
comes back beside its field, on the dashboard. Screenshots go to artifacts/screenshots/<mode>/."""

from __future__ import annotations

import re
from typing import Any

from orchestration import demo as demo_data

# The server and browser fixtures and the signed-in page helper of the other browser tests;
# importing them also skips this module wherever those are skipped (no Chromium, no Playwright).
from tests.test_browser import Browser, Watched, browser, expect, server  # noqa: F401

EXAMPLES = {spec["slug"]: spec["example"] for spec in demo_data.PROCESSES}
# What is typed into each process's form; customer-inquiry and contract-review use the form's
# "Fill example" instead (contract-review then ticks its box as well).
TYPED: dict[str, dict[str, str]] = {
    "vendor-onboarding": {"name": "Typed Traders GmbH", "country": "DE",
                          "iban": "DE89370400440532013000", "email": "ap@typed.example"},
    "refund-exception": {"order_id": "ORD-7781", "amount": "12.5", "reason": "Typed reason",
                         "customer_email": "kim@example.com"},
}


def _problems(op: Watched) -> list[str]:
    """Console messages about a refused pattern attribute or a refused inline script/style."""
    found: list[str] = []

    def seen(message: Any) -> None:
        if "pattern" in message.text.lower() or "Content Security Policy" in message.text:
            found.append(message.text)

    op.page.on("console", seen)
    return found


def _choose(op: Watched, slug: str) -> None:
    """Pick the process in the select (htmx swaps its form in) and wait for its form."""
    if op.page.input_value("#start-process") != slug:
        op.page.select_option("#start-process", slug)
    expect(op.page.locator("#start-form")).to_have_attribute("data-process", slug)


def test_it_starts_each_demo_process_from_its_generated_form(server: str,  # noqa: F811
                                                             browser: Browser) -> None:  # noqa: F811
    op = Watched(browser.new_context(), server, "operator")
    problems = _problems(op)
    for slug in ("vendor-onboarding", "refund-exception", "customer-inquiry", "contract-review"):
        op.page.goto(f"{server}/")
        _choose(op, slug)
        form = op.page.locator("#start-form form.start")
        for key in EXAMPLES[slug]:  # every example field has its own control
            expect(form.locator(f'[name="in/{key}"]')).to_be_visible()
        typed = TYPED.get(slug)
        if typed is not None:
            for key, value in typed.items():
                form.locator(f'[name="in/{key}"]').fill(value)
            shown = typed[next(iter(typed))]
        else:
            op.page.click("#start-fill-example")
            first, value = next(iter(EXAMPLES[slug].items()))
            expect(op.page.locator(f'[name="in/{first}"]')).to_have_value(str(value))
            shown = str(value)
        if slug == "contract-review":
            op.page.check("#start-force_low_confidence")
        op.shot(f"start-form-{slug}")
        op.page.locator("#start-form form.start button[type=submit]").click()
        op.page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}/$"))
        expect(op.page.locator("#run-status")).to_be_visible()
        expect(op.page.locator("#run-live")).to_contain_text(shown)
        if slug == "contract-review":
            expect(op.page.locator("#run-live")).to_contain_text('"force_low_confidence": true')
        op.shot(f"run-from-form-{slug}")
    assert problems == []


def test_it_shows_a_bad_value_next_to_its_field(server: str,  # noqa: F811
                                               browser: Browser) -> None:  # noqa: F811
    op = Watched(browser.new_context(), server, "operator")
    problems = _problems(op)
    _choose(op, "refund-exception")
    form = op.page.locator("#start-form form.start")
    submit = form.locator("button[type=submit]")
    # The browser refuses what the schema's attributes say: a missing required field, a value
    # outside the pattern, a number above the maximum. Nothing is posted.
    submit.click()
    assert op.page.locator("#start-order_id").evaluate("e => e.validity.valueMissing")
    op.page.fill("#start-order_id", "ord 1")
    op.page.fill("#start-amount", "100001")
    op.page.fill("#start-reason", "damaged")
    op.page.fill("#start-customer_email", "kim@example.com")
    submit.click()
    assert op.page.locator("#start-order_id").evaluate("e => e.validity.patternMismatch")
    assert op.page.locator("#start-amount").evaluate("e => e.validity.rangeOverflow")
    assert op.page.url == f"{server}/"
    # 0 passes the browser (min is the inclusive bound) but not the schema (exclusiveMinimum):
    # the server says so beside the field, on the dashboard, with what was typed kept.
    op.page.fill("#start-order_id", "ORD-1042")
    op.page.fill("#start-amount", "0")
    submit.click()
    op.page.wait_for_url(f"{server}/runs/start")
    expect(op.page.locator("#start-amount-error")).to_have_text("amount must be more than 0")
    expect(op.page.locator("#start-amount")).to_have_attribute("aria-invalid", "true")
    expect(op.page.locator("#start-order_id")).to_have_value("ORD-1042")
    expect(op.page.locator("#start-reason")).to_have_value("damaged")
    expect(op.page.locator("#dashboard-figures")).to_be_visible()
    expect(op.page.locator("#runs-list")).to_be_visible()
    op.shot("start-form-error")
    # Corrected, it starts the run.
    op.page.fill("#start-amount", "40")
    op.page.locator("#start-form form.start button[type=submit]").click()
    op.page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}/$"))
    expect(op.page.locator("#run-status")).to_be_visible()
    # The JSON editor behind "Advanced": closed until asked for; its error shown in it.
    op.page.goto(f"{server}/?process=refund-exception")
    expect(op.page.locator("#start-input")).to_be_hidden()
    op.page.click("#start-json summary")
    op.page.fill("#start-input", '{"order_id": "ORD-1042"}')
    op.page.click("#start-json button[type=submit]")
    op.page.wait_for_url(f"{server}/runs/start")
    expect(op.page.locator("#start-json-error")).to_contain_text("amount")
    expect(op.page.locator("#start-input")).to_be_visible()
    op.shot("start-form-json-error")
    assert problems == []
