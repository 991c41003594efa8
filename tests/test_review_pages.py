"""The review queue and approval pages: deciding by plain requests, CSRF, nothing lost."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client

from approvals.models import ApprovalRequest
from orchestration import services
from orchestration.models import Process, Run
from tests.conftest import wait_for, wait_for_run
from tests.test_approvals import REFUND, _open_request


def browser(user: User) -> Client:
    """A signed-in client that enforces CSRF the way a browser session meets it."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf_token(client: Client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert match, "the page carries no CSRF token"
    return match.group(1)


@pytest.mark.django_db(transaction=True)
def test_it_approves_a_refund_from_the_queue_and_the_run_finishes(runner: None,
                                                                    people: dict) -> None:
    run = services.run_create(process=Process.objects.get(slug="refund-exception"),
                              input={**REFUND, "amount": 500}, user=people["operator"])
    run = wait_for_run(run.pk)
    assert run.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=run.pk, status="pending")

    watcher = browser(people["operator"])
    page = watcher.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="waiting-on"' in page and str(request.pk) in page

    reviewer = browser(people["reviewer"])
    queue = reviewer.get("/review/").content.decode()
    assert f'id="approval-{request.pk}"' in queue and "issue_refund" in queue
    decided = reviewer.post(f"/review/{request.pk}/decide", {
        "csrfmiddlewaretoken": csrf_token(reviewer, "/review/"), "decision": "approve",
        "arguments_digest": request.arguments_digest})
    assert decided.status_code == 302 and decided["Location"] == "/review/"

    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                   what="the refund run to finish after the approval")
    page = watcher.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="waiting-on"' not in page
    assert f'id="approval-{request.pk}"' not in reviewer.get("/review/").content.decode()


@pytest.mark.django_db
def test_it_refuses_a_decision_without_a_csrf_token(people: dict) -> None:
    request = _open_request(people["operator"])
    answer = browser(people["reviewer"]).post(f"/review/{request.pk}/decide",
                                              {"decision": "approve"})
    assert answer.status_code == 403
    request.refresh_from_db()
    assert request.status == "pending"


@pytest.mark.django_db
def test_it_keeps_an_edit_that_fails_the_tools_schema(people: dict) -> None:
    request = _open_request(people["operator"])
    reviewer = browser(people["reviewer"])
    typed = '{"order_id": "ORD-1042", "amount": "<b>lots</b>"}'
    answer = reviewer.post(f"/review/{request.pk}/decide", {
        "csrfmiddlewaretoken": csrf_token(reviewer, f"/review/{request.pk}/"),
        "decision": "edit", "arguments": typed, "note": "halve it",
        "arguments_digest": request.arguments_digest})
    assert answer.status_code == 400
    page = answer.content.decode()
    assert html.escape(typed, quote=True) in page and "<b>lots</b>" not in page
    assert "halve it" in page and 'role="alert"' in page
    request.refresh_from_db()
    assert request.status == "pending" and not request.decisions.exists()


@pytest.mark.django_db
def test_it_keeps_edited_json_that_does_not_parse(people: dict) -> None:
    request = _open_request(people["operator"])
    reviewer = browser(people["reviewer"])
    answer = reviewer.post(f"/review/{request.pk}/decide", {
        "csrfmiddlewaretoken": csrf_token(reviewer, f"/review/{request.pk}/"),
        "decision": "edit", "arguments": '{"amount": 80', "arguments_digest":
        request.arguments_digest})
    assert answer.status_code == 400
    assert "not valid JSON" in answer.content.decode()
    assert "{&quot;amount&quot;: 80</textarea>" in answer.content.decode()


@pytest.mark.django_db
def test_it_records_an_edit_bound_to_the_new_digest(people: dict) -> None:
    request = _open_request(people["operator"])
    reviewer = browser(people["reviewer"])
    answer = reviewer.post(f"/review/{request.pk}/decide", {
        "csrfmiddlewaretoken": csrf_token(reviewer, f"/review/{request.pk}/"),
        "decision": "edit", "arguments": '{"order_id": "ORD-1042", "amount": 80}',
        "arguments_digest": request.arguments_digest})
    assert answer.status_code == 302
    request.refresh_from_db()
    assert request.status == "edited" and request.arguments["amount"] == 80
    assert request.decisions.get().arguments_digest == request.arguments_digest


@pytest.mark.django_db
def test_it_refuses_the_run_starter_on_the_page(people: dict) -> None:
    request = _open_request(people["reviewer"])  # a reviewer who started the run
    reviewer = browser(people["reviewer"])
    detail = reviewer.get(f"/review/{request.pk}/").content.decode()
    assert 'name="decision"' not in detail
    answer = reviewer.post(f"/review/{request.pk}/decide", {
        "csrfmiddlewaretoken": csrf_token(reviewer, "/review/"), "decision": "approve"})
    assert answer.status_code == 403
    request.refresh_from_db()
    assert request.status == "pending"


@pytest.mark.django_db
def test_it_hides_requests_from_people_who_may_neither_decide_nor_see_the_run(
        people: dict) -> None:
    request = _open_request(people["operator"])
    outsider = browser(User.objects.create_user("outsider", password="x"))
    assert str(request.pk) not in outsider.get("/review/").content.decode()
    assert outsider.get(f"/review/{request.pk}/").status_code == 404
    answer = outsider.post(f"/review/{request.pk}/decide", {
        "csrfmiddlewaretoken": csrf_token(outsider, "/review/"), "decision": "approve"})
    assert answer.status_code == 404
    request.refresh_from_db()
    assert request.status == "pending"


def test_the_queue_shows_the_soonest_deadlines_a_page_at_a_time(people: dict) -> None:
    """A backlog does not make the queue one endless page: the 50 soonest deadlines, and how
    many wait in all."""
    from console.review import QUEUE_ROWS

    requests = [_open_request(people["operator"], amount=200 + i)
                for i in range(QUEUE_ROWS + 3)]
    ApprovalRequest.objects.filter(pk=requests[-1].pk).update(
        deadline=requests[0].deadline - timedelta(hours=1))
    page = browser(people["reviewer"]).get("/review/").content.decode()
    rows = re.findall(r"<tr id=\"approval-([0-9a-f-]+)\">", page)
    assert len(rows) == QUEUE_ROWS
    assert rows[0] == str(requests[-1].pk)  # the soonest deadline comes first
    assert f"of {QUEUE_ROWS + 3} waiting for you" in page
