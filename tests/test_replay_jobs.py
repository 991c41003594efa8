"""Replay checks: a replay from the ledger is queued by the page or the API and done by a
worker (a thread in standalone, a Celery worker process in the distributed pass)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.utils import timezone

from audit.models import Event
from console.models import ApiToken
from orchestration import replay_jobs, services, sweep
from orchestration.models import Outbox, Process, ReplayCheck, Run
from tests.conftest import VENDOR_INPUT, wait_for
from tests.test_audit_trust import tamperable
from tests.test_replay import start


@pytest.fixture
def runner(runner: None, demo: None) -> None:
    """The worker, with the demo data seeded."""


def api(client: Client, username: str, method: str, path: str) -> Any:
    auth = f"Bearer {ApiToken.issue(User.objects.get(username=username))[1]}"
    if method == "POST":
        return client.post(path, data="{}", content_type="application/json",
                           HTTP_AUTHORIZATION=auth)
    return client.get(path, HTTP_AUTHORIZATION=auth)


def finished(check_id: Any) -> ReplayCheck:
    return wait_for(lambda: ReplayCheck.objects.exclude(
        status__in=replay_jobs.PENDING).filter(pk=check_id).first(),
        what=f"replay check {check_id} to finish")


@pytest.mark.django_db(transaction=True)
def test_it_replays_in_a_worker_and_shows_the_verdict_on_the_run_page(
        runner: None, client: Client) -> None:
    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    assert run.status == "succeeded"
    client.force_login(User.objects.get(username="operator"))
    page = client.get(f"/runs/{run.pk}/")
    assert b"Replay from the ledger" in page.content and b"No replay checks yet" in page.content
    visit = client.get(f"/runs/{run.pk}/replay")  # a GET (a URL from history) queues nothing
    assert visit.status_code == 303 and visit["Location"] == f"/runs/{run.pk}/#replay"
    assert not ReplayCheck.objects.filter(run=run).exists()

    response = client.post(f"/runs/{run.pk}/replay")
    assert response.status_code == 303
    check = ReplayCheck.objects.get(run=run)
    assert response["Location"] == f"/runs/{run.pk}/#replay-check-{check.pk}"
    assert check.requested_by.username == "operator"
    check = finished(check.pk)
    assert check.status == "matched", check.summary
    assert check.compared > 10 and "matches" in check.summary and check.divergence == ""
    assert check.attempts == 1 and check.started_at and check.finished_at
    assert not Outbox.objects.filter(topic="replay").exists()

    # Following the redirect, and reloading, only reads.
    for _ in range(2):
        page = client.get(response["Location"])
        assert page.status_code == 200
    assert ReplayCheck.objects.filter(run=run).count() == 1
    content = page.content.decode()
    assert f'id="replay-check-{check.pk}"' in content and "status-matched" in content
    assert "matches" in content and "operator" in content
    assert "hx-trigger" not in content.split('id="replay-checks"')[1].split(">")[0]

    # A second request is a new check: the history is kept.
    again = api(client, "operator", "POST", f"/api/v1/runs/{run.pk}/replay")
    assert again.status_code == 202, again.content
    assert again.json()["id"] != str(check.pk) and again.json()["status"] == "queued"
    finished(again.json()["id"])
    body = api(client, "operator", "GET",
               f"/api/v1/runs/{run.pk}/replay/{again.json()['id']}").json()
    assert body["status"] == "matched" and body["requested_by"] == "operator"
    assert body["compared"] == check.compared and body["finished_at"]
    assert ReplayCheck.objects.filter(run=run).count() == 2


@pytest.mark.django_db(transaction=True)
def test_it_reports_a_divergence_of_an_altered_ledger_and_escapes_it(
        runner: None, client: Client) -> None:
    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    event = Event.objects.get(chain=run.pk, kind="tool.called", data__task="sanctions")
    altered = {**event.data, "result": {"clear": False, "list": "<script>alert(1)</script>"}}
    with tamperable(), connection.cursor() as cursor:
        cursor.execute("UPDATE audit_event SET data = %s WHERE id = %s",
                       [Event._meta.get_field("data").get_db_prep_value(altered, connection),
                        event.pk])

    created = api(client, "operator", "POST", f"/api/v1/runs/{run.pk}/replay")
    assert created.status_code == 202, created.content
    check = finished(created.json()["id"])
    assert check.status == "diverged"
    assert "task sanctions" in check.divergence and check.divergence in check.summary
    assert "<script>alert(1)</script>" in check.summary
    body = api(client, "operator", "GET", f"/api/v1/runs/{run.pk}/replay/{check.pk}").json()
    assert body["status"] == "diverged" and body["divergence"] == check.divergence

    client.force_login(User.objects.get(username="operator"))
    content = client.get(f"/runs/{run.pk}/").content.decode()
    assert "status-diverged" in content
    assert "<script>alert(1)</script>" not in content
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in content


@pytest.mark.django_db(transaction=True)
def test_only_who_may_act_on_the_run_starts_a_check_and_viewers_see_the_verdicts(
        runner: None, client: Client) -> None:
    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    reviewer = Client()
    reviewer.force_login(User.objects.get(username="reviewer"))
    page = reviewer.get(f"/runs/{run.pk}/")
    assert page.status_code == 200 and b"Replay checks" in page.content
    assert b"Replay from the ledger" not in page.content  # reviewers may see, not act
    assert reviewer.post(f"/runs/{run.pk}/replay").status_code == 403
    assert api(client, "reviewer", "POST", f"/api/v1/runs/{run.pk}/replay").status_code == 403
    outsider = User.objects.create_user("outsider")
    stranger = Client()
    stranger.force_login(outsider)
    assert stranger.post(f"/runs/{run.pk}/replay").status_code == 404
    assert api(client, "outsider", "POST", f"/api/v1/runs/{run.pk}/replay").status_code == 404
    assert not ReplayCheck.objects.exists()

    check_id = api(client, "operator", "POST", f"/api/v1/runs/{run.pk}/replay").json()["id"]
    finished(check_id)
    seen = api(client, "reviewer", "GET", f"/api/v1/runs/{run.pk}/replay/{check_id}")
    assert seen.status_code == 200 and seen.json()["status"] == "matched"
    assert f'id="replay-check-{check_id}"' in reviewer.get(f"/runs/{run.pk}/").content.decode()
    assert api(client, "outsider", "GET",
               f"/api/v1/runs/{run.pk}/replay/{check_id}").status_code == 404
    assert stranger.get(f"/runs/{run.pk}/replay/checks").status_code == 404
    assert api(client, "reviewer", "GET",
               f"/api/v1/runs/{run.pk}/replay/not-a-check").status_code == 404


@pytest.mark.django_db
def test_a_request_while_a_check_is_under_way_returns_that_check(demo: None,
                                                                  client: Client) -> None:
    """No worker here (nothing commits): the first check stays queued."""
    operator = User.objects.get(username="operator")
    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=dict(VENDOR_INPUT), user=operator)
    first = api(client, "operator", "POST", f"/api/v1/runs/{run.pk}/replay")
    second = api(client, "operator", "POST", f"/api/v1/runs/{run.pk}/replay")
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"] and second.json()["status"] == "queued"
    client.force_login(operator)
    response = client.post(f"/runs/{run.pk}/replay")
    assert response.status_code == 303
    assert ReplayCheck.objects.filter(run=run).count() == 1
    assert Outbox.objects.filter(topic="replay", request_id=first.json()["id"]).count() == 1
    page = client.get(response["Location"]).content.decode()
    assert "already under way" in page and "waiting for a worker" in page
    # While it is under way, its part of the page polls for the verdict.
    assert f'hx-get="/runs/{run.pk}/replay/checks"' in page
    partial = client.get(f"/runs/{run.pk}/replay/checks", HTTP_HX_REQUEST="true")
    assert partial.status_code == 200 and b'id="replay-checks"' in partial.content
    assert b"<html" not in partial.content


@pytest.mark.django_db(transaction=True)
def test_a_check_whose_worker_was_lost_is_queued_again(runner: None, client: Client,
                                                        settings: Any) -> None:
    if settings.SWITCHBOARD_MODE != "standalone":
        pytest.skip("recovery is driven from this process here; the standalone pass runs it")
    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    long_ago = timezone.now() - timedelta(seconds=settings.SWITCHBOARD_LEASE_SECONDS + 5)
    lost = ReplayCheck.objects.create(run=run, status="running", started_at=long_ago,
                                      attempts=1)
    # A duplicate delivery (its message already handled) does nothing.
    replay_jobs.perform(str(lost.pk), message_id=10**9)
    assert ReplayCheck.objects.get(pk=lost.pk).status == "running"

    assert sweep.sweep_once()["replays"] == 1
    check = finished(lost.pk)
    assert check.status == "matched" and check.attempts == 2
    assert sweep.sweep_once()["replays"] == 0
    replay_jobs.perform(str(lost.pk))  # a finished check is not done again
    assert ReplayCheck.objects.get(pk=lost.pk).attempts == 2

    # A fresh running check is left to its worker; a process starting takes it for lost.
    fresh = ReplayCheck.objects.create(run=run, status="running", started_at=timezone.now())
    assert replay_jobs.recover() == 0
    assert replay_jobs.recover(lost=True) == 1
    assert finished(fresh.pk).status == "matched"

    # The next request for the run picks up a stale one rather than waiting on it.
    stale = ReplayCheck.objects.create(run=run, status="running", started_at=long_ago)
    again = api(client, "operator", "POST", f"/api/v1/runs/{run.pk}/replay")
    assert again.status_code == 202 and again.json()["id"] == str(stale.pk)
    assert finished(stale.pk).status == "matched"


@pytest.mark.distributed
@pytest.mark.django_db(transaction=True)
def test_the_workers_sweep_takes_over_a_lost_check(runner: None, client: Client) -> None:
    """Nothing in this process: a worker's own sweep finds the checks nobody is doing."""
    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    long_ago = timezone.now() - timedelta(hours=1)  # beyond the worker's stale limit
    lost = ReplayCheck.objects.create(run=run, status="running", started_at=long_ago,
                                      attempts=1)
    assert finished(lost.pk).status == "matched"
    unsent = ReplayCheck.objects.create(run=run)  # queued, and its message never written
    ReplayCheck.objects.filter(pk=unsent.pk).update(created_at=long_ago)
    check = finished(unsent.pk)
    assert check.status == "matched" and check.attempts == 1


@pytest.mark.django_db(transaction=True)
def test_a_replay_that_breaks_is_reported_failed(runner: None, client: Client, settings: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if settings.SWITCHBOARD_MODE != "standalone":
        pytest.skip("the replay is broken in this process; the standalone pass runs it")
    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    from orchestration import replay as replay_module

    def broken(run: Run) -> Any:
        raise RuntimeError("no plan")

    monkeypatch.setattr(replay_module, "replay", broken)
    check, created = replay_jobs.request_check(run)
    assert created and check.requested_by is None
    check = finished(check.pk)
    assert check.status == "failed" and "RuntimeError: no plan" in check.summary


@pytest.mark.django_db(transaction=True)
def test_a_long_replay_keeps_its_check_alive_and_a_lost_one_is_taken_over_within_a_lease(
        runner: None, client: Client, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if settings.SWITCHBOARD_MODE != "standalone":
        pytest.skip("the replay is held in this process; the standalone pass runs it")
    import threading
    import time

    from orchestration import replay as replay_module

    settings.SWITCHBOARD_LEASE_SECONDS = 1
    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    real, release = replay_module.replay, threading.Event()

    def slow(run: Run) -> Any:
        release.wait(30)
        return real(run)

    monkeypatch.setattr(replay_module, "replay", slow)
    check, _ = replay_jobs.request_check(run)
    wait_for(lambda: ReplayCheck.objects.filter(pk=check.pk, status="running").first(),
             what="the check to start")
    time.sleep(3)  # three leases: only the heartbeat keeps it from being taken for lost
    held = ReplayCheck.objects.get(pk=check.pk)
    assert held.heartbeat_at > held.started_at
    assert timezone.now() - held.heartbeat_at < timedelta(seconds=1)
    assert replay_jobs.recover() == 0
    release.set()
    assert finished(check.pk).status == "matched"

    # A check whose worker died has a heartbeat that stopped: taken over after one lease.
    silent = timezone.now() - timedelta(seconds=2)
    lost = ReplayCheck.objects.create(run=run, status="running", started_at=silent,
                                      heartbeat_at=silent, attempts=1)
    assert replay_jobs.recover() == 1
    assert finished(lost.pk).status == "matched"
