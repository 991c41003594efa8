"""The console pages: sign-in, the dashboard, starting a run, a run's page, escaping."""

from __future__ import annotations

import html
import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils.text import slugify

from audit.models import Event
from orchestration import services
from orchestration.models import Process, Run, Task

PAYLOAD = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"



@pytest.fixture
def signed_in(client: Client, operator: User) -> Client:
    client.force_login(operator)
    return client


def _counts() -> tuple[int, int, int]:
    return Run.objects.count(), Task.objects.count(), Event.objects.count()


def _pending_run(user: Any, slug: str, data: dict[str, Any]) -> Run:
    # Non-transactional tests never commit, so on_commit never enqueues the run: it stays pending.
    return services.run_create(process=Process.objects.get(slug=slug), input=data, user=user)


def test_it_sends_anonymous_visitors_to_sign_in(client: Client, operator: User,
                                                 vendor_input: dict[str, str]) -> None:
    run = _pending_run(operator, "vendor-onboarding", vendor_input)
    for path in ("/", f"/runs/{run.pk}/"):
        response = client.get(path)
        assert response.status_code == 302, path
        assert response["Location"] == f"/login/?next={path}"


def test_it_refuses_starting_a_run_anonymously(client: Client, demo: None,
                                               vendor_input: dict[str, str]) -> None:
    before = _counts()
    response = client.post("/runs/start", {"process": "vendor-onboarding", "input": "{}"})
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
    assert _counts() == before


def test_it_signs_in_the_demo_operator(client: Client, demo: None) -> None:
    page = client.get("/login/")
    assert page.status_code == 200
    assert 'name="password"' in page.content.decode()

    response = client.post("/login/", {"username": "operator", "password": "switchboard"})
    assert response.status_code == 302
    assert response["Location"] == "/"
    dashboard = client.get("/")
    assert dashboard.status_code == 200
    text = dashboard.content.decode()
    assert "Start a run" in text
    for slug in ("vendor-onboarding", "refund-exception", "customer-inquiry"):
        assert slug in text


def test_it_rejects_a_wrong_password(client: Client, demo: None) -> None:
    response = client.post("/login/", {"username": "operator", "password": "wrong"})
    assert response.status_code == 200
    assert "didn't match" in response.content.decode()
    assert client.get("/").status_code == 302


def test_it_shows_a_runs_tasks_and_ledger(signed_in: Client, operator: User,
                                          vendor_input: dict[str, str]) -> None:
    run = _pending_run(operator, "vendor-onboarding", vendor_input)
    services.run_cancel(run=run, user=operator)  # more ledger events and task states to show
    response = signed_in.get(f"/runs/{run.pk}/")
    assert response.status_code == 200
    text = response.content.decode()
    assert str(run.pk) in text
    keys = list(run.tasks.values_list("key", flat=True))
    assert len(keys) >= 2
    for key in keys:
        assert f'id="task-{key}"' in text
    kinds = set(Event.objects.filter(chain=run.pk).values_list("kind", flat=True))
    assert {"run.created", "run.cancel_requested"} <= kinds
    for kind in kinds:
        assert f'<span class="trace-kind kind-{slugify(kind)}">{kind}</span>' in text


def test_it_lists_the_run_on_the_dashboard(signed_in: Client, operator: User,
                                           vendor_input: dict[str, str]) -> None:
    run = _pending_run(operator, "vendor-onboarding", vendor_input)
    text = signed_in.get("/").content.decode()
    assert f'href="/runs/{run.pk}/"' in text


def test_it_hides_a_run_from_another_user(client: Client, operator: User,
                                          vendor_input: dict[str, str]) -> None:
    run = _pending_run(operator, "vendor-onboarding", vendor_input)
    outsider = User.objects.create_user("outsider", password="outsider-password")
    client.force_login(outsider)
    assert client.get(f"/runs/{run.pk}/").status_code == 404
    assert f'href="/runs/{run.pk}/"' not in client.get("/").content.decode()
    assert client.post(f"/runs/{run.pk}/cancel").status_code == 404
    run.refresh_from_db()
    assert run.status == "pending"
    assert not run.cancel_requested


def test_it_answers_404_for_an_unknown_run(signed_in: Client) -> None:
    assert signed_in.get("/runs/00000000-0000-0000-0000-000000000000/").status_code == 404


def test_it_rerenders_the_form_for_invalid_json(signed_in: Client) -> None:
    before = _counts()
    response = signed_in.post("/runs/start", {"process": "vendor-onboarding",
                                              "input": '{"name": "Northwind",'})
    assert response.status_code == 400
    text = response.content.decode()
    assert 'role="alert"' in text
    assert "Input is not valid JSON" in text
    assert html.escape('{"name": "Northwind",') in text  # what was typed is kept
    assert _counts() == before


def test_it_rerenders_the_form_for_input_failing_the_schema(signed_in: Client,
                                                            vendor_input: dict[str, str]) -> None:
    del vendor_input["email"]
    before = _counts()
    response = signed_in.post("/runs/start", {"process": "vendor-onboarding",
                                              "input": json.dumps(vendor_input)})
    assert response.status_code == 400
    text = response.content.decode()
    assert "input does not match" in text
    assert "email" in text
    assert _counts() == before


def test_it_starts_a_run_from_the_form(signed_in: Client, operator: User,
                                       vendor_input: dict[str, str]) -> None:
    before = _counts()
    response = signed_in.post("/runs/start", {"process": "vendor-onboarding",
                                              "input": json.dumps(vendor_input)})
    assert response.status_code == 302
    run = Run.objects.get()
    assert response["Location"] == f"/runs/{run.pk}/"
    assert run.created_by == operator
    assert run.input == vendor_input
    assert Run.objects.count() == before[0] + 1
    assert signed_in.get(response["Location"]).status_code == 200


def test_it_forbids_starting_a_run_without_permission(client: Client, demo: None,
                                                      vendor_input: dict[str, str]) -> None:
    client.force_login(User.objects.create_user("outsider", password="outsider-password"))
    before = _counts()
    response = client.post("/runs/start", {"process": "vendor-onboarding",
                                           "input": json.dumps(vendor_input)})
    assert response.status_code == 403
    assert _counts() == before


def test_it_escapes_untrusted_input_on_the_run_page(signed_in: Client, operator: User) -> None:
    run = _pending_run(operator, "customer-inquiry", {
        "customer_email": "kim@example.com", "order_id": "ORD-1042",
        "message": f"Where is my order? {PAYLOAD}"})
    for headers in ({}, {"HTTP_HX_REQUEST": "true"}):  # the full page and the live partial
        response = signed_in.get(f"/runs/{run.pk}/", **headers)
        assert response.status_code == 200
        text = response.content.decode()
        assert ESCAPED in text
        assert PAYLOAD not in text


def test_it_escapes_untrusted_input_in_the_rerendered_form(signed_in: Client) -> None:
    typed = f'{{"message": "</textarea>{PAYLOAD}"'
    response = signed_in.post("/runs/start", {"process": "customer-inquiry", "input": typed})
    assert response.status_code == 400
    text = response.content.decode()
    assert ESCAPED in text
    assert PAYLOAD not in text
    assert "</textarea><script>" not in text


@pytest.mark.django_db
def test_it_sends_a_content_security_policy_without_inline_scripts(signed_in: Client) -> None:
    policy = signed_in.get("/")["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["script-src"] == "'self'"
    assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


@pytest.mark.django_db
def test_it_carries_no_inline_script_or_handler_on_any_screen(signed_in: Client,
                                                              operator: User) -> None:
    import re

    run = _pending_run(operator, "vendor-onboarding", {
        "name": "Northwind", "country": "DE", "iban": "DE89370400440532013000",
        "email": "ap@northwind.example"})
    signed_in.force_login(User.objects.get(username="admin"))
    for path in ("/", f"/runs/{run.pk}/", "/review/", "/agents/", "/agents/frontdesk/",
                 "/tools/", "/analytics/", "/ledger/"):
        page = signed_in.get(path).content.decode()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), path
        assert not re.search(r"\son[a-z]+\s*=", page), path
        assert not re.search(r"<style|\sstyle\s*=", page), path


def _queries(client: Client, path: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        assert client.get(path).status_code == 200
    return len(captured.captured_queries)


@pytest.mark.django_db
def test_it_renders_the_dashboard_in_queries_that_do_not_grow_with_the_runs(
        signed_in: Client, operator: User) -> None:
    data = {"name": "Northwind", "country": "DE", "iban": "DE89370400440532013000",
            "email": "ap@northwind.example"}
    for _ in range(2):
        _pending_run(operator, "vendor-onboarding", data)
    few = _queries(signed_in, "/")
    for _ in range(20):
        _pending_run(operator, "vendor-onboarding", data)
    assert _queries(signed_in, "/") == few


@pytest.mark.django_db
def test_it_renders_a_run_in_queries_that_do_not_grow_with_its_events(
        signed_in: Client, operator: User) -> None:
    from django.db import transaction

    from audit import ledger

    run = _pending_run(operator, "vendor-onboarding", {
        "name": "Northwind", "country": "DE", "iban": "DE89370400440532013000",
        "email": "ap@northwind.example"})
    few = _queries(signed_in, f"/runs/{run.pk}/")
    with transaction.atomic():
        for i in range(40):
            ledger.append(run.pk, "tool.called", {"task": "check_sanctions", "n": i},
                          actor="system")
    assert _queries(signed_in, f"/runs/{run.pk}/") == few


@pytest.mark.django_db
def test_it_shows_progress_budget_gauges_and_the_trace_tree(signed_in: Client,
                                                            operator: User) -> None:
    from django.db import transaction

    from audit import ledger

    run = _pending_run(operator, "vendor-onboarding", {
        "name": "Northwind", "country": "DE", "iban": "DE89370400440532013000",
        "email": "ap@northwind.example"})
    Run.objects.filter(pk=run.pk).update(budget_tokens=1000, tokens_in=600, tokens_out=300)
    Task.objects.filter(run=run, key="validate").update(status="succeeded")
    with transaction.atomic():
        ledger.append(run.pk, "tool.called", {"task": "validate", "tool": "validate_vendor",
                                              "latency_ms": 4.5, "result": {"ok": PAYLOAD}},
                      actor="system")
    page = signed_in.get(f"/runs/{run.pk}/").content.decode()
    total = Task.objects.filter(run=run).count()
    assert f"1 of {total} tasks finished" in page
    assert 'id="gauge-tokens"' in page and "900 of 1000 (90.0%)" in page
    assert "gauge-high" in page and "(no cap)" in page
    branch = page.split('id="trace-validate"')[1].split("</details>")[0]
    assert "tool.called" in branch and "4.5 ms" in branch
    assert ESCAPED in page and PAYLOAD not in page


@pytest.mark.django_db(transaction=True)
def test_it_retries_a_failed_run_from_its_first_unfinished_task(runner: None, client: Client,
                                                                operator: User) -> None:
    from tests.conftest import wait_for_run

    run = _pending_run(operator, "vendor-onboarding", {
        "name": "Northwind", "country": "DE", "iban": "DE89370400440532013000",
        "email": "ap@northwind.example"})
    assert wait_for_run(run.pk).status == "succeeded"
    tasks = list(Task.objects.filter(run=run).order_by("position"))
    Run.objects.filter(pk=run.pk).update(status="failed")  # as if task 2 had failed
    Task.objects.filter(pk=tasks[1].pk).update(status="failed")
    Task.objects.filter(pk__in=[t.pk for t in tasks[2:]]).update(status="cancelled")
    client.force_login(operator)
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Retry from task 2" in page
    answer = client.post(f"/runs/{run.pk}/retry")
    assert answer.status_code == 302
    retry = Run.objects.exclude(pk=run.pk).get()
    assert answer["Location"] == f"/runs/{retry.pk}/"
    assert retry.forked_from_id == run.pk and retry.fork_point == 2
    assert wait_for_run(retry.pk).status == "succeeded"
    reused = Event.objects.get(chain=retry.pk, kind="task.succeeded", data__task=tasks[0].key)
    assert reused.data.get("reused_from") == str(run.pk)
    assert client.post(f"/runs/{retry.pk}/retry").status_code == 302  # succeeded: refused
    assert Run.objects.count() == 2
