"""The runs list, in the console (/runs/) and the API (GET /api/v1/runs): filters, counts,
cursor pages, bad filter values, and who sees what."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from guardian.shortcuts import assign_perm

from console.models import ApiToken
from orchestration import services
from orchestration.models import Process, Run

REFUND = {"reason": "damaged", "customer_email": "kim@example.com"}


def make_runs(people: dict[str, User]) -> list[Run]:
    """Six refund runs (ORD-100 ... ORD-105) started by the operator, one vendor run by the
    admin; statuses and start days set directly (nothing runs: no worker in these tests)."""
    refund = Process.objects.get(slug="refund-exception")
    vendor = Process.objects.get(slug="vendor-onboarding")
    runs = [services.run_create(process=refund, user=people["operator"],
                                input={**REFUND, "order_id": f"ORD-10{i}", "amount": 10 + i})
            for i in range(6)]
    runs.append(services.run_create(process=vendor, user=people["admin"], input={
        "name": "Northwind", "country": "DE", "iban": "DE89370400440532013000",
        "email": "ap@northwind.example"}))
    now = timezone.now()
    for i, (run, status) in enumerate(zip(runs, ["succeeded", "succeeded", "failed", "waiting",
                                                 "running", "succeeded", "succeeded"],
                                          strict=True)):
        Run.objects.filter(pk=run.pk).update(status=status,
                                             created_at=now - timedelta(days=10 - i))
    return runs


def api(client: Any, user: User) -> Any:
    auth = f"Bearer {ApiToken.issue(user)[1]}"
    return lambda query="": client.get(f"/api/v1/runs{query}", HTTP_AUTHORIZATION=auth)


@pytest.mark.django_db
def test_the_api_filters_by_status_process_starter_input_and_date(client: Any,
                                                                   people: dict) -> None:
    runs = make_runs(people)
    get = api(client, people["reviewer"])  # reviewers may see every run
    body = get().json()
    assert body["count"] == 7 and body["next"] is None
    assert [r["id"] for r in body["runs"]] == [str(r.pk) for r in reversed(runs)]
    assert body["counts"] == {"succeeded": 4, "failed": 1, "waiting": 1, "running": 1}

    body = get("?status=succeeded&status=failed&process=refund-exception").json()
    assert body["count"] == 4 and {r["status"] for r in body["runs"]} == {"succeeded", "failed"}
    assert body["counts"]["waiting"] == 1  # counts ignore the status filter, for the chips
    assert get("?starter=admin").json()["runs"][0]["process"] == "vendor-onboarding"
    found = get("?q=ORD-103").json()
    assert [r["input"]["order_id"] for r in found["runs"]] == ["ORD-103"]
    assert found["runs"][0]["started_by"] == "operator"
    day = (timezone.now() - timedelta(days=8)).date().isoformat()
    assert [r["input"].get("order_id") for r in get(f"?since={day}&until={day}").json()[
        "runs"]] == ["ORD-102"]
    oldest = get("?order=oldest&limit=1").json()
    assert oldest["runs"][0]["id"] == str(runs[0].pk) and oldest["next"]


@pytest.mark.django_db
def test_the_api_pages_with_a_cursor_without_gaps_or_repeats(client: Any, people: dict) -> None:
    runs = make_runs(people)
    Run.objects.filter(pk__in=[r.pk for r in runs[:3]]).update(created_at=timezone.now())
    get = api(client, people["admin"])
    seen: list[str] = []
    query = "?limit=2"
    while True:
        body = get(query).json()
        assert body["count"] == 7
        seen += [r["id"] for r in body["runs"]]
        if body["next"] is None:
            break
        query = f"?limit=2&cursor={body['next']}"
    assert sorted(seen) == sorted(str(r.pk) for r in runs) and len(seen) == 7


@pytest.mark.django_db
@pytest.mark.parametrize("query, field", [
    ("?status=finished", "status"), ("?cursor=not-a-cursor", "cursor"),
    ("?order=sideways", "order"), ("?since=2026-02-01&until=2026-01-01", "since"),
    ("?q=ORD%00", "q"), ("?starter=op%00", "starter")])
def test_a_bad_filter_gets_a_clear_error(client: Any, people: dict, query: str,
                                         field: str) -> None:
    response = api(client, people["reviewer"])(query)
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{field}:")


@pytest.mark.django_db
def test_people_see_only_the_runs_they_may_see(client: Any, people: dict) -> None:
    make_runs(people)
    outsider = User.objects.create_user("outsider", password="x")
    assert api(client, outsider)().json()["count"] == 0
    refunds_only = User.objects.create_user("refunds-only", password="x")
    assign_perm("orchestration.start_run", refunds_only,
                Process.objects.get(slug="refund-exception"))
    seen = api(client, refunds_only)().json()
    assert seen["count"] == 6  # the refund runs of their team, not the admin's vendor run
    assert {r["process"] for r in seen["runs"]} == {"refund-exception"}


@pytest.mark.django_db
def test_the_runs_page_keeps_its_filters_in_the_url(client: Any, people: dict) -> None:
    runs = make_runs(people)
    client.force_login(people["reviewer"])
    page = client.get("/runs/?q=ORD-104&status=running").content.decode()
    assert f'id="run-{runs[4].pk}"' in page and f'id="run-{runs[3].pk}"' not in page
    assert 'value="ORD-104"' in page and 'value="running" checked' in page
    assert "1 run matches" in page
    paged = client.get("/runs/?limit=3&process=refund-exception").content.decode()
    assert paged.count('<tr id="run-') == 3
    assert 'id="next-page"' in paged and "process=refund-exception" in paged.split(
        'id="next-page"')[0].rsplit("href=", 1)[1]
    bad = client.get("/runs/?since=yesterday")
    assert bad.status_code == 400
    assert "since: not a date" in bad.content.decode()


@pytest.mark.django_db
def test_the_list_is_in_the_openapi_schema_with_its_filters(client: Any) -> None:
    schema = client.get("/api/v1/openapi.json").json()
    get = schema["paths"]["/api/v1/runs"]["get"]
    assert get["operationId"] == "console_api_list_runs"
    names = {p["name"] for p in get["parameters"]}
    assert {"status", "process", "starter", "since", "until", "q", "order", "cursor",
            "limit"} <= names


@pytest.mark.django_db
def test_the_runs_page_escapes_run_input(client: Any, people: dict) -> None:
    services.run_create(process=Process.objects.get(slug="refund-exception"),
                        user=people["operator"], input={
                            **REFUND, "order_id": "ORD-9", "amount": 5,
                            "reason": "<script>alert(1)</script>"})
    client.force_login(people["operator"])
    page = client.get("/runs/?q=alert").content.decode()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
