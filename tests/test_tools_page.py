"""The tools page: one table, a row per tool with its limits and who holds it, details on
demand."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from guardian.shortcuts import assign_perm, get_users_with_perms

from orchestration.models import Agent, Tool


@pytest.fixture
def page(people: dict[str, User]) -> str:
    client = Client()
    client.force_login(people["operator"])
    response = client.get("/tools/")
    assert response.status_code == 200
    return response.content.decode()


def row(page: str, slug: str) -> str:
    start = page.index(f'<tr id="tool-{slug}" class="tool">')
    return page[start:page.index("</tr>", start)]


def test_it_lists_the_tools_as_rows_of_one_table(page: str) -> None:
    assert page.count('<table class="tools" id="tools">') == 1
    assert '<div class="table-scroll">\n  <table class="tools"' in page
    head = page[page.index("<thead>"):page.index("</thead>")]
    for column in ("Tool", "Risk", "Quota per run", "Quota per window", "Timeout",
                   "Cost per call", "Calls today / total", "Granted to"):
        assert f"<th>{column}</th>" in head
    slugs = re.findall(r'<tr id="tool-([\w-]+)" class="tool">', page)
    assert slugs == list(Tool.objects.order_by("slug").values_list("slug", flat=True))
    assert len(slugs) > 10
    assert '<section class="card" id="tool-' not in page  # no card per tool


def test_each_row_says_its_limits_and_who_is_granted_it(page: str) -> None:
    refund = Tool.objects.get(slug="issue_refund")
    cells = row(page, "issue_refund")
    assert refund.get_risk_class_display() in cells
    assert f"<td>{refund.timeout_s} s</td>" in cells
    holders = {u.username for u in get_users_with_perms(
        refund, only_with_perms_in=["invoke_tool"], with_superusers=False,
        with_group_users=False)}
    agents = set(Agent.objects.filter(user__username__in=holders)
                 .values_list("slug", flat=True))
    assert agents, "the demo grants issue_refund to an agent"
    shown = set(re.findall(r'<a href="/agents/([\w-]+)/">', cells))
    assert shown == agents


def test_details_open_on_demand_below_each_row(page: str) -> None:
    refund = Tool.objects.get(slug="issue_refund")
    start = page.index('<tr class="tool-more" id="tool-issue_refund-details">')
    details = page[start:page.index("</tr>", start)]
    assert "<details>" in details and "<summary>Details of issue_refund</summary>" in details
    assert "Input schema" in details and "Output schema" in details
    assert str(refund.get_kind_display()) in details


def test_a_new_grant_shows_without_more_queries(
        people: dict[str, User], django_assert_max_num_queries: Any) -> None:
    client = Client()
    client.force_login(people["operator"])
    client.get("/tools/")
    with django_assert_max_num_queries(12) as before:
        client.get("/tools/")
    tool = Tool.objects.get(slug="lookup_order")
    for agent in Agent.objects.all():
        assign_perm("orchestration.invoke_tool", agent.user, tool)
    with django_assert_max_num_queries(len(before.captured_queries)):
        page = client.get("/tools/").content.decode()
    shown = set(re.findall(r'<a href="/agents/([\w-]+)/">', row(page, "lookup_order")))
    assert shown == set(Agent.objects.values_list("slug", flat=True))
