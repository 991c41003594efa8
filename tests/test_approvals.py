"""Governance: approval rules, escalations, budgets, quotas, expiry, resume after a decision."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.db import connection
from django.utils import timezone
from guardian.shortcuts import assign_perm

from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit.models import Event
from console.models import ApiToken
from orchestration import services
from orchestration.budgets import reserve
from orchestration.engine.governance import Usage
from orchestration.models import Agent, Outbox, Process, Run, Tool
from tests.conftest import wait_for, wait_for_run
from tests.test_precheck import idle_run

REFUND = {"order_id": "ORD-1042", "reason": "damaged", "customer_email": "kim@example.com"}


class Client:
    def __init__(self, client: Any, user: User) -> None:
        self.client = client
        self.auth = f"Bearer {ApiToken.issue(user)[1]}"

    def get(self, path: str) -> Any:
        return self.client.get(path, HTTP_AUTHORIZATION=self.auth)

    def post(self, path: str, data: Any) -> Any:
        import json

        return self.client.post(path, data=json.dumps(data), content_type="application/json",
                                HTTP_AUTHORIZATION=self.auth)


@pytest.fixture
def as_(client: Any, people: dict[str, User]) -> Any:
    return lambda name: Client(client, people[name])


def refund_run(as_: Any, amount: float, who: str = "operator") -> Run:
    created = as_(who).post("/api/v1/runs", {"process": "refund-exception",
                                             "input": {**REFUND, "amount": amount}})
    assert created.status_code == 201, created.content
    return wait_for_run(created.json()["id"])


def pending(run: Run) -> ApprovalRequest:
    return ApprovalRequest.objects.get(run_id=run.pk, status="pending")


def decide(as_: Any, who: str, request: ApprovalRequest, **body: Any) -> Any:
    return as_(who).post(f"/api/v1/approvals/{request.pk}/decision",
                         {"decision": "approve", **body})


@pytest.mark.django_db(transaction=True)
def test_it_pauses_a_large_refund_until_a_reviewer_approves(runner: None, as_: Any) -> None:
    run = refund_run(as_, 500)
    assert run.status == "waiting"
    body = as_("operator").get(f"/api/v1/runs/{run.pk}").json()
    request = pending(run)
    assert body["waiting_on"] == [{"kind": "approval", "task": "refund",
                                   "reason": "sensitive_action", "id": str(request.pk)}]

    queue = as_("reviewer").get("/api/v1/approvals?status=pending").json()
    assert [q["id"] for q in queue] == [str(request.pk)]
    item = queue[0]
    assert item["tool"] == "issue_refund"
    assert item["arguments"] == {"order_id": "ORD-1042", "amount": 500}
    assert item["arguments_digest"] == approvals.digest({"order_id": "ORD-1042", "amount": 500})
    assert item["policy"] == "refund-over-100 v1"
    assert item["required_approvals"] == 1 and item["approvals"] == 0
    assert set(item) >= {"id", "run", "tool", "arguments", "arguments_digest", "reason",
                         "policy", "deadline", "required_approvals", "approvals"}

    assert decide(as_, "reviewer", request).status_code == 200
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                   what="the run to finish after approval")
    assert run.result["refund_id"].startswith("RF-") and run.result["amount"] == 500
    called = Event.objects.get(chain=run.pk, kind="tool.called", data__tool="issue_refund")
    assert approvals.digest(called.data["arguments"]) == request.arguments_digest
    decision = Event.objects.get(chain=run.pk, kind="approval.decision")
    assert decision.actor == "user:reviewer"


@pytest.mark.django_db(transaction=True)
def test_it_needs_two_distinct_reviewers_for_a_refund_of_5000(runner: None, as_: Any) -> None:
    run = refund_run(as_, 5000)
    request = pending(run)
    assert request.required_approvals == 2
    assert decide(as_, "reviewer", request).json()["status"] == "pending"
    again = decide(as_, "reviewer", request)
    assert again.status_code == 409 and "already decided" in again.json()["error"]
    assert decide(as_, "reviewer2", request).json()["status"] == "approved"
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                   what="the run to finish")
    assert run.result["amount"] == 5000


@pytest.mark.django_db(transaction=True)
def test_it_sends_a_rejection_note_back_to_the_agent(runner: None, as_: Any) -> None:
    run = refund_run(as_, 500)
    request = pending(run)
    response = decide(as_, "reviewer", request, decision="reject",
                      note="Refund exceeds the goodwill limit for this customer")
    assert response.json()["status"] == "rejected"
    # The agent is told and answers; the refund's checks then fail on what the reviewer
    # refused, so the run fails and the customer is never told a refund is on its way.
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="failed").first(),
                   what="the run to fail")
    denied = Event.objects.get(chain=run.pk, kind="tool.denied")
    assert denied.data["error"] == "Refund exceeds the goodwill limit for this customer"
    assert not Event.objects.filter(chain=run.pk, kind="tool.called",
                                    data__tool="issue_refund").exists()
    turn = Event.objects.filter(chain=run.pk, kind="model.called", data__task="refund").last()
    assert turn is not None and turn.data["step"] == 2
    assert "no refund was issued" in run.error and "goodwill limit" in run.error
    assert not Event.objects.filter(chain=run.pk, kind="tool.called",
                                    data__tool="send_customer_email").exists()
    assert Event.objects.filter(chain=run.pk, kind="sentinel.failed").count() == 1
    assert not Event.objects.filter(chain=run.pk, kind="task.rework").exists()


@pytest.mark.django_db(transaction=True)
def test_it_runs_the_edited_arguments_after_revalidating_them(runner: None, as_: Any) -> None:
    run = refund_run(as_, 500)
    request = pending(run)
    bad = decide(as_, "reviewer", request, decision="edit",
                 arguments={"order_id": "ORD-1042", "amount": -5})
    assert bad.status_code == 400 and "amount" in bad.json()["error"]
    assert pending(run).status == "pending"
    edited = {"order_id": "ORD-1042", "amount": 250}
    ok = decide(as_, "reviewer", request, decision="edit", arguments=edited)
    assert ok.status_code == 200
    assert ok.json()["arguments_digest"] == approvals.digest(edited)
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                   what="the run to finish")
    called = Event.objects.get(chain=run.pk, kind="tool.called", data__tool="issue_refund")
    assert called.data["arguments"] == edited
    # The customer hears of the refund that was made, not the one first asked for.
    email = Event.objects.get(chain=run.pk, kind="tool.called", data__tool="send_customer_email")
    assert "refunded 250 " in email.data["arguments"]["body"]
    assert "500" not in email.data["arguments"]["body"]
    assert run.result["amount"] == 250


@pytest.mark.django_db
def test_it_refuses_deciders_outside_the_group_and_the_run_starter(as_: Any, people: dict
                                                                   ) -> None:
    request = _open_request(people["reviewer"])
    outsider = decide(as_, "operator", request)
    assert outsider.status_code == 403 and "reviewer" in outsider.json()["error"]
    own = decide(as_, "reviewer", request)
    assert own.status_code == 403 and "you started this run" in own.json()["error"]
    assert decide(as_, "reviewer2", request).status_code == 200


@pytest.mark.django_db
def test_it_never_lets_an_agent_identity_decide(people: dict) -> None:
    request = _open_request(people["operator"])
    agent_user = Agent.objects.get(slug="refund-executor").user
    agent_user.groups.add(Group.objects.get(name="reviewer"))
    with pytest.raises(approvals.NotAllowed, match="agent identity"):
        approvals.request_decide(request_id=request.pk, user=agent_user, decision="approve")


@pytest.mark.django_db
def test_it_binds_a_decision_to_the_digest_the_reviewer_saw(as_: Any, people: dict) -> None:
    request = _open_request(people["operator"])
    stale = decide(as_, "reviewer", request, arguments_digest="0" * 64)
    assert stale.status_code == 409 and "digest" in stale.json()["error"]
    ok = decide(as_, "reviewer", request, arguments_digest=request.arguments_digest)
    assert ok.status_code == 200 and ok.json()["status"] == "approved"
    used = decide(as_, "reviewer2", request)
    assert used.status_code == 409 and "already" in used.json()["error"]


@pytest.mark.django_db
def test_it_refuses_a_decision_after_the_deadline(as_: Any, people: dict) -> None:
    request = _open_request(people["operator"])
    ApprovalRequest.objects.filter(pk=request.pk).update(
        deadline=timezone.now() - timedelta(seconds=1))
    late = decide(as_, "reviewer", request)
    assert late.status_code == 409 and "expired" in late.json()["error"]


@pytest.mark.django_db
def test_it_refuses_a_decision_on_a_stopped_run(as_: Any, people: dict) -> None:
    request = _open_request(people["operator"])
    run = Run.objects.get(pk=request.run_id)
    services.run_cancel(run=run, user=people["operator"])
    stopped = decide(as_, "reviewer", request)
    assert stopped.status_code == 409 and "stopped" in stopped.json()["error"]


@pytest.mark.django_db(transaction=True)
def test_it_yields_one_outcome_when_two_reviewers_decide_at_once(people: dict) -> None:
    request = _open_request(people["operator"])
    barrier = threading.Barrier(2)
    results: dict[str, str] = {}

    def act(name: str, decision: str) -> None:
        try:
            barrier.wait()
            approvals.request_decide(request_id=request.pk, user=people[name],
                                     decision=decision, note="race")
            results[name] = "ok"
        except approvals.ApprovalError as exc:
            results[name] = f"{exc.status}"
        finally:
            connection.close()

    threads = [threading.Thread(target=act, args=("reviewer", "approve")),
               threading.Thread(target=act, args=("reviewer2", "reject"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["409", "ok"]
    request.refresh_from_db()
    assert request.status in ("approved", "rejected")
    assert Event.objects.filter(chain=request.run_id, kind="approval.resolved").count() == 1


@pytest.mark.django_db
def test_the_sweep_rejects_an_expired_request_and_resumes_the_task(people: dict,
                                                                   monkeypatch: Any) -> None:
    resumed: list[Any] = []
    from orchestration import dispatch

    monkeypatch.setattr(dispatch, "send", lambda topic, **kw: resumed.append(
        (topic, kw["request_id"])))
    request = _open_request(people["operator"])
    ApprovalRequest.objects.filter(pk=request.pk).update(
        deadline=timezone.now() - timedelta(seconds=1))
    from django.test.utils import CaptureQueriesContext  # noqa: F401

    from orchestration.tasks import sweep

    with _on_commit_runs():
        sweep.run()
    request.refresh_from_db()
    assert request.status == "expired"
    assert request.resolution == {"action": "reject", "note": "no decision before the deadline"}
    assert resumed == [("resume", str(request.pk))]
    assert Outbox.objects.filter(topic="resume", request_id=request.pk).count() == 1
    assert Event.objects.get(chain=request.run_id, kind="approval.resolved").actor == "system"


@pytest.mark.django_db
def test_the_sweep_hands_an_overdue_large_refund_to_the_second_tier(people: dict) -> None:
    request = _open_request(people["operator"], amount=5000)
    ApprovalRequest.objects.filter(pk=request.pk).update(
        deadline=timezone.now() - timedelta(seconds=1))
    assert approvals.requests_expire() == 1
    request.refresh_from_db()
    assert request.status == "pending" and request.tier == 2
    assert request.decider_group.name == "admin" and request.deadline > timezone.now()
    assert Event.objects.filter(chain=request.run_id, kind="approval.escalated").exists()


@pytest.mark.django_db(transaction=True)
def test_it_escalates_a_spent_budget_and_resumes_when_a_reviewer_raises_it(
    runner: None, as_: Any, people: dict
) -> None:
    process = Process.objects.get(slug="customer-inquiry")
    version = process.current_version
    services.process_publish(process=process, plan=version.plan,
                             input_schema=version.input_schema, budgets={"tokens": 1500})
    created = as_("operator").post("/api/v1/runs", {"process": "customer-inquiry", "input": {
        "customer_email": "kim@example.com", "order_id": "ORD-1042", "message": "Where?"}})
    run = wait_for_run(created.json()["id"])
    assert run.status == "waiting"
    request = pending(run)
    assert request.reason == "budget_exhausted"
    assert "cap 1500" in request.detail
    assert run.tokens_in + run.tokens_out <= 1500

    bad = decide(as_, "reviewer", request, decision="raise_budget", budget={"tokens": -1})
    assert bad.status_code == 400
    ok = decide(as_, "reviewer", request, decision="raise_budget", budget={"tokens": 10000})
    assert ok.json()["status"] == "budget_raised"
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                   what="the run to finish after the raise")
    assert run.budget_tokens == 11500
    raised = Event.objects.get(chain=run.pk, kind="budget.raised")
    assert raised.actor == "user:reviewer" and raised.data["old"]["tokens"] == 1500


@pytest.mark.django_db(transaction=True)
def test_it_escalates_an_exhausted_per_run_quota(runner: None, as_: Any) -> None:
    Tool.objects.filter(slug="lookup_order").update(quota_per_run=0)
    created = as_("operator").post("/api/v1/runs", {"process": "customer-inquiry", "input": {
        "customer_email": "kim@example.com", "order_id": "ORD-1042", "message": "Where?"}})
    run = wait_for_run(created.json()["id"])
    assert run.status == "waiting"
    request = pending(run)
    assert request.reason == "quota_exhausted" and request.tool == "lookup_order"
    assert decide(as_, "reviewer", request).status_code == 200
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                   what="the run to finish after the override")
    assert Event.objects.filter(chain=run.pk, kind="tool.called",
                                data__tool="lookup_order").count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_reservations_never_overspend_a_budget(people: dict) -> None:
    run = idle_run().pk  # no worker reserves against it meanwhile
    Run.objects.filter(pk=run).update(budget_tokens=1000, budget_cost=Decimal("5"),
                                      budget_steps=None)
    granted: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                if reserve(str(run), "refund", Usage(steps=1, tokens_in=70, tokens_out=30,
                                                     cost=Decimal("0.1"))) == "":
                    with lock:
                        granted.append(1)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = Run.objects.get(pk=run)
    assert len(granted) == 10  # 16 x 5 tried; exactly what fits 1000 tokens got through
    assert row.reserved_tokens == 1000 <= row.budget_tokens
    assert row.reserved_cost == Decimal("1.0")


# ---- helpers ------------------------------------------------------------------------------

class _on_commit_runs:
    """Run on_commit callbacks of a non-transactional test as they would run in production."""

    def __enter__(self) -> None:
        from django.db import transaction

        self._orig = transaction.on_commit
        transaction.on_commit = lambda fn, *a, **k: fn()  # type: ignore[assignment]

    def __exit__(self, *exc: Any) -> None:
        from django.db import transaction

        transaction.on_commit = self._orig  # type: ignore[assignment]


def _open_request(starter: User, amount: float = 500,
                  reason: str = "sensitive_action") -> ApprovalRequest:
    """A refund run parked on its approval (or, with ``reason``, on another escalation of the
    same call), without a worker (non-transactional tests)."""
    assign_perm("orchestration.start_run", starter, Process.objects.get(slug="refund-exception"))
    run = services.run_create(process=Process.objects.get(slug="refund-exception"),
                              input={**REFUND, "amount": amount}, user=starter)
    from approvals.services import policy_match
    from audit import ledger  # noqa: F401

    version = policy_match(tool="issue_refund", risk_class="financial",
                           arguments={"order_id": "ORD-1042", "amount": amount})
    return approvals.request_open(
        run_id=run.pk, task_key="refund", call_key=f"{run.pk}:refund:1:0", tool="issue_refund",
        arguments={"order_id": "ORD-1042", "amount": amount}, reason=reason,
        policy_version=version, requested_by="agent:refund-executor", run_started_by=starter,
        context={"input_schema": Tool.objects.get(slug="issue_refund").input_schema})
