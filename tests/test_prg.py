"""Post/Redirect/Get: every console form that succeeds answers with a redirect to a page read by
GET, so reloading what the browser shows never sends the form again."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from orchestration import services
from orchestration.models import Agent, Process, ReplayCheck, Run
from tests.test_approvals import _open_request


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def run(operator: User, vendor_input: dict[str, str]) -> Run:
    """A pending run (never dispatched: the test never commits)."""
    return services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                               input=vendor_input, user=operator)


def followed(client: Client, response: Any) -> str:
    """The page a redirect leads to, read by GET."""
    assert response.status_code in (302, 303), response.status_code
    page = client.get(response["Location"])
    assert page.status_code == 200
    return page.content.decode()


def test_a_replay_request_redirects_to_its_result_and_a_reload_asks_nothing(
        operator: User, run: Run) -> None:
    client = signed_in(operator)
    posted = client.post(f"/runs/{run.pk}/replay")
    check = ReplayCheck.objects.get(run=run)
    assert posted.status_code == 303
    assert posted["Location"] == f"/runs/{run.pk}/#replay-check-{check.pk}"
    for _ in range(3):  # the page the browser shows, reloaded
        page = followed(client, posted)
        assert f'id="replay-check-{check.pk}"' in page
    assert ReplayCheck.objects.filter(run=run).count() == 1
    # The form's own address, opened by GET (history, a bookmark), queues nothing either.
    visit = client.get(f"/runs/{run.pk}/replay")
    assert visit.status_code == 303 and visit["Location"] == f"/runs/{run.pk}/#replay"
    assert ReplayCheck.objects.filter(run=run).count() == 1


def test_the_replay_message_shows_once_after_the_redirect(operator: User, run: Run) -> None:
    client = signed_in(operator)
    posted = client.post(f"/runs/{run.pk}/replay")
    assert "Replay check queued." in followed(client, posted)
    assert "Replay check queued." not in followed(client, posted)


def test_starting_a_run_redirects_to_it(operator: User, vendor_input: dict[str, str]) -> None:
    client = signed_in(operator)
    posted = client.post("/runs/start", {"process": "vendor-onboarding",
                                          "input": json.dumps(vendor_input)})
    run = Run.objects.get()
    assert posted["Location"] == f"/runs/{run.pk}/"
    assert 'id="run-status"' in followed(client, posted)


def test_cancel_fork_and_retry_redirect(operator: User, run: Run) -> None:
    client = signed_in(operator)
    cancelled = client.post(f"/runs/{run.pk}/cancel")
    assert cancelled["Location"] == f"/runs/{run.pk}/"
    assert "Run cancelled." in followed(client, cancelled)

    forked = client.post(f"/runs/{run.pk}/fork", {"step": "1"})
    fork = Run.objects.exclude(pk=run.pk).get()
    assert forked["Location"] == f"/runs/{fork.pk}/"
    assert "Forked from step 1" in followed(client, forked)

    retried = client.post(f"/runs/{run.pk}/retry")
    retry = Run.objects.exclude(pk__in=[run.pk, fork.pk]).get()
    assert retried["Location"] == f"/runs/{retry.pk}/"
    assert "Retrying from task 1" in followed(client, retried)


def test_retiring_an_agent_redirects_to_it(people: dict[str, User]) -> None:
    client = signed_in(people["admin"])
    retired = client.post("/agents/frontdesk/retire")
    assert retired["Location"] == "/agents/frontdesk/"
    assert "frontdesk is retired" in followed(client, retired)
    assert Agent.objects.get(slug="frontdesk").status == "retired"


def test_a_decision_redirects_to_the_queue(people: dict[str, User]) -> None:
    request = _open_request(people["operator"])
    client = signed_in(people["reviewer"])
    decided = client.post(f"/review/{request.pk}/decide", {
        "decision": "reject", "note": "no", "arguments_digest": request.arguments_digest})
    assert decided["Location"] == "/review/"
    # The queue says what the decision did (console/review_context.py's confirmation).
    assert "Rejected issue_refund" in followed(client, decided)


def test_saving_a_time_zone_redirects_to_the_settings_page(operator: User) -> None:
    client = signed_in(operator)
    saved = client.post("/settings/time-zone/", {"time_zone": "Europe/Paris"})
    assert saved["Location"] == "/settings/time-zone/"
    assert "Times are now shown in Europe/Paris." in followed(client, saved)
