"""What a run waits on: the one rule (orchestration.engine.waiting), and the API, the run page
and the dashboard showing the same waits for the same run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client
from django.utils import timezone

from approvals.models import ApprovalRequest
from console.selectors import dashboard_figures, run_out, run_page
from orchestration.engine.waiting import (
    APPROVAL,
    BUDGET,
    KILL_SWITCH,
    TASK,
    WaitingItem,
    requests_of,
    waiting_on,
)
from orchestration.models import Process, Run, Task


@dataclass
class T:
    key: str
    status: str
    error: str = ""


@dataclass
class R:
    pk: str
    task_key: str
    reason: str
    required_approvals: int = 1


PAUSE = "paused: kill switch on tool send_email: incident 42"


def test_a_pending_request_is_a_wait_on_people_with_the_approvals_it_needs() -> None:
    request = R("r1", "refund", "sensitive_action", required_approvals=2)
    [item] = waiting_on("waiting", [T("lookup", "succeeded"),
                                    T("refund", "waiting", "awaiting_approval: refund")],
                        [request])
    assert item == WaitingItem(kind=APPROVAL, task="refund", reason="sensitive_action",
                               cause=APPROVAL, id="r1", required_approvals=2, request=request)
    assert requests_of([item]) == [request]


def test_a_task_held_by_a_kill_switch_waits_on_the_switch() -> None:
    [item] = waiting_on("waiting", [T("send", "waiting", PAUSE)], [])
    assert (item.kind, item.task, item.reason, item.cause, item.id) == (
        TASK, "send", PAUSE, KILL_SWITCH, None)
    assert item.request is None and requests_of([item]) == []


def test_an_exhausted_budget_waits_on_people_to_raise_it() -> None:
    request = R("r2", "reply", "budget_exhausted")
    [item] = waiting_on("waiting", [T("reply", "waiting", "budget_exhausted: cost 0.50")],
                        [request])
    assert (item.kind, item.cause, item.reason, item.id) == (
        APPROVAL, BUDGET, "budget_exhausted", "r2")
    # A task parked on a budget with no request (yet) is a budget wait of its own.
    [own] = waiting_on("running", [T("reply", "waiting", "step_budget_exhausted: 10 steps")], [])
    assert (own.kind, own.cause) == (TASK, BUDGET)


def test_a_waiting_task_without_an_error_just_waits() -> None:
    [item] = waiting_on("waiting", [T("x", "waiting")], [])
    assert (item.kind, item.reason, item.cause) == (TASK, "waiting", "task")


@pytest.mark.parametrize("status", ["pending", "queued", "running", "succeeded", "failed",
                                    "cancelled"])
def test_queued_running_and_finished_tasks_wait_on_nothing(status: str) -> None:
    assert waiting_on("running", [T("a", status), T("b", status, "boom")], []) == []


@pytest.mark.parametrize("run_status", ["succeeded", "failed", "cancelled"])
def test_a_finished_run_waits_on_nothing(run_status: str) -> None:
    assert waiting_on(run_status, [T("a", "waiting", PAUSE)],
                      [R("r", "a", "sensitive_action")]) == []


def test_waits_come_in_plan_order_and_stray_requests_last() -> None:
    stray = R("r9", "gone", "low_confidence")
    items = waiting_on("waiting", [T("a", "waiting", PAUSE), T("b", "running"),
                                   T("c", "waiting", "unknown_outcome: ...")],
                       [stray, R("r3", "c", "unknown_outcome")])
    assert [(i.task, i.kind, i.id) for i in items] == [
        ("a", TASK, None), ("c", APPROVAL, "r3"), ("gone", APPROVAL, "r9")]


# --- one rule, every consumer -------------------------------------------------------------


def _request(run: Run, task: str, reason: str, *, hours: int, required: int = 1
             ) -> ApprovalRequest:
    return ApprovalRequest.objects.create(
        run_id=run.pk, task_key=task, reason=reason, tool="send_customer_email",
        requested_by="agent:customer-comms", decider_group=Group.objects.get(name="reviewer"),
        required_approvals=required, deadline=timezone.now() + timedelta(hours=hours))


@pytest.fixture
def waiting_run(people: dict[str, User]) -> Run:
    """A run with three tasks in parallel: one held by a kill switch, two waiting on people
    (the later task's request due first)."""
    run = Run.objects.create(
        process_version=Process.objects.get(slug="customer-inquiry").current_version,
        status="waiting", cost=Decimal("0.05"), created_by=people["operator"])
    for position, (key, error) in enumerate([("draft", PAUSE),
                                             ("reply", "awaiting_approval: send"),
                                             ("notify", "budget_exhausted: cost")]):
        Task.objects.create(run=run, key=key, position=position, executor_type="agent",
                            executor_ref="customer-comms", status="waiting", error=error)
    _request(run, "reply", "sensitive_action", hours=2, required=2)
    _request(run, "notify", "budget_exhausted", hours=1)
    return run


def test_the_api_the_run_page_and_the_dashboard_show_the_same_waits(
        waiting_run: Run, people: dict[str, User], api: Any) -> None:
    operator = people["operator"]
    body = api.get(f"/api/v1/runs/{waiting_run.pk}").json()
    page = run_page(operator, waiting_run.pk)
    expected = [{"kind": w.kind, "task": w.task, "reason": w.reason, "id": w.id}
                for w in page["waits"]]
    assert body["waiting_on"] == expected == run_out(waiting_run)["waiting_on"]
    assert [(w["task"], w["kind"]) for w in expected] == [
        ("draft", "task"), ("reply", "approval"), ("notify", "approval")]
    people_ids = {w["id"] for w in expected if w["kind"] == "approval"}

    # The page's banner: the same requests, soonest deadline first.
    assert [str(r.pk) for r in page["waiting_on"]] == [
        expected[2]["id"], expected[1]["id"]]
    html = Client()
    html.force_login(operator)
    content = html.get(f"/runs/{waiting_run.pk}/").content.decode()
    banner = content[content.index('id="waiting-on"'):]
    banner = banner[:banner.index("</div>")]
    assert all(f"/review/{pk}/" in banner for pk in people_ids)
    assert "2 from reviewer" in banner

    [(run, requests)] = [(r, q) for r, q in dashboard_figures(operator).waiting_on
                         if r.pk == waiting_run.pk]
    assert [r.pk for r in requests] == [r.pk for r in page["waiting_on"]]


def test_a_finished_run_shows_no_wait_anywhere(waiting_run: Run, people: dict[str, User],
                                               api: Any) -> None:
    Run.objects.filter(pk=waiting_run.pk).update(status="failed", finished_at=timezone.now())
    assert api.get(f"/api/v1/runs/{waiting_run.pk}").json()["waiting_on"] == []
    page = run_page(people["operator"], waiting_run.pk)
    assert page["waits"] == [] and page["waiting_on"] == []
