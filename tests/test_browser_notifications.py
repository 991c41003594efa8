"""The Notifications settings page in a real browser against a real server (the fixtures of
tests/test_browser.py): reached from the top bar, toggled, saved, with no CSP refusal."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

from django.contrib.auth.models import User

from console.models import NotificationPreference
from tests.test_browser import Browser, Watched, browser, expect, server  # noqa: F401


def _in_thread(query: Callable[[], Any]) -> Any:
    """The ORM refuses to run on Playwright's event loop: ask from a thread of its own."""
    from django.db import connection

    def run() -> Any:
        try:
            return query()
        finally:
            connection.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def test_a_reviewer_turns_their_emails_off_from_the_top_bar(server: str,  # noqa: F811
                                                            browser: Browser) -> None:  # noqa: F811
    reviewer = Watched(browser.new_context(), server, "reviewer")
    refused: list[str] = []
    reviewer.page.on("console", lambda m: refused.append(m.text)
                     if "Content Security Policy" in m.text else None)

    reviewer.page.click("header.topbar a:has-text('Notifications')")
    reviewer.page.wait_for_url(f"{server}/settings/notifications")
    box = reviewer.page.locator("#notify-email")
    expect(box).to_be_checked()
    expect(reviewer.page.locator("main")).to_contain_text("reviewer@switchboard.example")
    reviewer.shot("notifications")

    box.uncheck()
    reviewer.page.click("#notification-settings button[type=submit]")
    expect(reviewer.page.locator(".messages")).to_contain_text(
        "Emails about approval requests are off.")
    expect(reviewer.page.locator("#notify-email")).not_to_be_checked()
    assert _in_thread(lambda: NotificationPreference.objects.get(
        user=User.objects.get(username="reviewer")).email) is False
    assert refused == []
