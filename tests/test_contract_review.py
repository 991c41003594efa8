"""The contract-review demo end to end: the planner's first plan refused by validation, the
design gate on a large contract, a clause check reworked after QC, a low-confidence audit, the
legal sign-off done by a person, and replay of the whole run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User

from approvals.models import ApprovalRequest
from audit.models import Event
from console.models import ApiToken
from orchestration.models import Process, Run
from orchestration.replay import replay
from tests.conftest import wait_for

CONTRACT = {"contract_text": "9.1 Liability is limited to the fees paid in the 12 months "
                             "before the claim. 14.2 Either party may end this agreement with "
                             "90 days' written notice.", "counterparty": "Northwind Traders"}


class Api:
    def __init__(self, client: Any, username: str) -> None:
        self.client = client
        self.auth = f"Bearer {ApiToken.issue(User.objects.get(username=username))[1]}"

    def post(self, path: str, body: Any) -> Any:
        return self.client.post(path, json.dumps(body), content_type="application/json",
                                HTTP_AUTHORIZATION=self.auth)


def request_for(run_id: Any, reason: str) -> ApprovalRequest:
    return wait_for(lambda: ApprovalRequest.objects.filter(run_id=run_id, reason=reason,
                                                           status="pending").first(),
                    timeout=60, what=f"a {reason} request")


def kinds(run_id: Any, *wanted: str) -> list[str]:
    return list(Event.objects.filter(chain=run_id, kind__in=wanted).order_by("seq")
                .values_list("kind", flat=True))


def per_task(run_id: Any, *wanted: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for kind, data in (Event.objects.filter(chain=run_id, kind__in=wanted).order_by("seq")
                       .values_list("kind", "data")):
        found.setdefault(data["task"], []).append(kind)
    return found


@pytest.mark.django_db(transaction=True)
def test_a_large_contract_is_planned_gated_checked_and_signed_off(runner: None, demo: None,
                                                                   client: Any) -> None:
    assert Process.objects.get(slug="contract-review").current_version is not None
    operator, reviewer = Api(client, "operator"), Api(client, "reviewer")
    created = operator.post("/api/v1/runs", {"process": "contract-review",
                                             "input": {**CONTRACT, "value": 25000}})
    assert created.status_code == 201, created.content
    run_id = created.json()["id"]

    plan_review = request_for(run_id, "plan_review")
    assert "the run's value 25000 is over 10000" in plan_review.detail
    assert kinds(run_id, "plan.proposed", "plan.rejected", "plan.validated") == [
        "plan.proposed", "plan.rejected", "plan.proposed", "plan.validated"]
    rejected = Event.objects.get(chain=run_id, kind="plan.rejected").data
    assert any("not granted the tool 'lookup_order'" in e for e in rejected["errors"])
    body = client.get(f"/api/v1/runs/{run_id}", HTTP_AUTHORIZATION=operator.auth).json()
    assert body["phase"] == "plan_review" and body["plan"]["version"] == 2
    assert reviewer.post(f"/api/v1/approvals/{plan_review.pk}/decision",
                         {"decision": "approve"}).status_code == 200

    signoff = request_for(run_id, "human_task")
    assert signoff.task_key == "legal_signoff"
    # The liability check's first answer failed QC and was reworked; termination passed. The
    # two tasks run side by side, so only each task's own order is fixed.
    assert per_task(run_id, "qc.failed", "task.rework", "qc.passed") == {
        "liability": ["qc.failed", "task.rework", "qc.passed"], "termination": ["qc.passed"]}
    failed = Event.objects.get(chain=run_id, kind="qc.failed").data
    assert failed["task"] == "liability"
    assert failed["findings"] == [
        "The cap on liability is stated: the answer says liability is limited but not to what"]
    bad = reviewer.post(f"/api/v1/approvals/{signoff.pk}/decision",
                        {"decision": "respond", "output": {"decision": "maybe"}})
    assert bad.status_code == 400 and "decision" in bad.json()["error"]
    ok = reviewer.post(f"/api/v1/approvals/{signoff.pk}/decision",
                       {"decision": "respond", "output": {"decision": "sign",
                                                          "comments": "Standard terms."}})
    assert ok.status_code == 200, ok.content
    run = wait_for(lambda: Run.objects.filter(pk=run_id, status="succeeded").first(),
                   timeout=60, what="the run to succeed")
    assert run.result == {"signoff": "sign", "comments": "Standard terms."}
    result = replay(run)
    assert result.ok, result.summary()


@pytest.mark.django_db(transaction=True)
def test_a_flagged_small_contract_runs_without_the_gate_and_escalates_low_confidence(
        runner: None, demo: None, client: Any) -> None:
    operator, reviewer = Api(client, "operator"), Api(client, "reviewer")
    run_id = operator.post("/api/v1/runs", {"process": "contract-review", "input": {
        **CONTRACT, "value": 5000, "force_low_confidence": True}}).json()["id"]
    unsure = request_for(run_id, "low_confidence")
    assert unsure.task_key == "termination"
    assert "confidence 0.45 is below 0.7" in unsure.detail
    assert not ApprovalRequest.objects.filter(run_id=run_id, reason="plan_review").exists()
    assert reviewer.post(f"/api/v1/approvals/{unsure.pk}/decision",
                         {"decision": "approve"}).status_code == 200
    signoff = request_for(run_id, "human_task")
    assert reviewer.post(f"/api/v1/approvals/{signoff.pk}/decision", {
        "decision": "respond", "output": {"decision": "do not sign"}}).status_code == 200
    run = wait_for(lambda: Run.objects.filter(pk=run_id, status="succeeded").first(),
                   timeout=60, what="the run to succeed")
    assert run.result["signoff"] == "do not sign"
    result = replay(run)
    assert result.ok, result.summary()
