"""The ledger viewer's pages: 50 events a page, newest first, older and newer links that keep
the filters, and the same few bounded queries however deep the page."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qs

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.test import Client

from audit import ledger
from audit.models import Event
from console.ledger_views import PAGE_SIZE
from orchestration import services
from orchestration.models import Process

STEPS = 130  # two full pages and a part



@pytest.fixture
def chains(operator: User, vendor_input: dict[str, str]) -> tuple[uuid.UUID, uuid.UUID]:
    """Two runs with interleaved ``test.step`` events (and their own run events)."""
    process = Process.objects.get(slug="vendor-onboarding")
    first = services.run_create(process=process, input=vendor_input, user=operator).pk
    second = services.run_create(process=process, input=vendor_input, user=operator).pk
    with transaction.atomic():
        for step in range(STEPS):
            for chain in (first, second):
                ledger.append(chain, "test.step", {"n": step}, actor="user:tester")
    return first, second


@pytest.fixture
def admin(demo: None) -> Client:
    client = Client()
    client.force_login(User.objects.get(username="admin"))
    return client


def ids(page: Any) -> list[int]:
    return [e.pk for e in page.context["events"]]


def query(link: str) -> dict[str, list[str]]:
    return parse_qs(link)


def test_it_shows_fifty_events_a_page_newest_first(
        admin: Client, chains: tuple[uuid.UUID, uuid.UUID]) -> None:
    assert PAGE_SIZE == 50
    everything = list(Event.objects.order_by("-id").values_list("id", flat=True))
    first = admin.get("/ledger/")
    assert first.status_code == 200
    assert ids(first) == everything[:50]
    assert first.context["newer"] is None and first.context["newest"] is None
    assert query(first.context["older"]) == {"before": [str(everything[49])]}
    text = first.content.decode()
    assert 'rel="next"' in text and 'rel="prev"' not in text
    assert text.count('<tr id="event-') == 50


def test_it_pages_older_and_newer_keeping_the_filters(
        admin: Client, chains: tuple[uuid.UUID, uuid.UUID]) -> None:
    run = chains[1]
    filters = {"run": str(run), "kind": "test.", "actor": "user:tester"}
    expected = list(Event.objects.filter(chain=run, kind="test.step").order_by("-id")
                    .values_list("id", flat=True))
    assert len(expected) == STEPS

    pages = [admin.get("/ledger/", filters)]
    while pages[-1].context["older"]:
        link = pages[-1].context["older"]
        for key, value in filters.items():
            assert query(link)[key] == [value], "a page link lost a filter"
        pages.append(admin.get(f"/ledger/?{link}"))
    assert [len(ids(p)) for p in pages] == [50, 50, 30]
    assert sum((ids(p) for p in pages), []) == expected  # no gap, no repeat

    # And back: each "newer" link gives the page before it, exactly.
    for newer_page, page in zip(pages, pages[1:], strict=False):
        link = page.context["newer"]
        assert link and query(link)["run"] == [str(run)] and query(link)["kind"] == ["test."]
        assert ids(admin.get(f"/ledger/?{link}")) == ids(newer_page)
        assert query(page.context["newest"]) == {k: [v] for k, v in filters.items()}
    assert pages[0].context["newer"] is None
    assert pages[-1].context["older"] is None


def test_a_newer_page_at_the_top_has_no_newer_link(
        admin: Client, chains: tuple[uuid.UUID, uuid.UUID]) -> None:
    everything = list(Event.objects.order_by("-id").values_list("id", flat=True))
    middle = admin.get("/ledger/", {"after": str(everything[60])})
    assert ids(middle) == everything[10:60]  # the fifty just newer than that event
    assert query(middle.context["newer"]) == {"after": [str(everything[10])]}
    top = admin.get("/ledger/", {"after": str(everything[50])})
    assert ids(top) == everything[:50]
    assert top.context["newer"] is None
    assert query(top.context["older"]) == {"before": [str(everything[49])]}
    past = admin.get("/ledger/", {"after": str(everything[0])})
    assert ids(past) == [] and query(past.context["older"]) == {
        "before": [str(everything[0] + 1)]}


def test_it_refuses_a_page_both_before_and_after(admin: Client) -> None:
    refused = admin.get("/ledger/", {"before": "10", "after": "5"})
    assert refused.status_code == 400
    assert "either before or after" in refused.content.decode()


def test_a_page_costs_the_same_bounded_queries_however_deep(
        admin: Client, chains: tuple[uuid.UUID, uuid.UUID],
        django_assert_max_num_queries: Any) -> None:
    admin.get("/ledger/")  # session warm
    with django_assert_max_num_queries(8) as top:
        first = admin.get("/ledger/")
    deep_link = first.context["older"]
    for _ in range(3):
        with django_assert_max_num_queries(len(top.captured_queries) + 1):
            page = admin.get(f"/ledger/?{deep_link}")
        deep_link = page.context["older"] or deep_link
    event_queries = [q["sql"] for q in top.captured_queries if "audit_event" in q["sql"]]
    assert all("LIMIT" in sql for sql in event_queries), event_queries
