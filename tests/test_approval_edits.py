"""Edits are new requests: edited arguments are matched against the policies again, the stricter
requirement applies, and the next approver sees what the edit changed."""

from __future__ import annotations

import html
from typing import Any

import pytest
from django.contrib.auth.models import Group, User

from approvals import services as approvals
from approvals.models import ApprovalRequest, Policy
from audit.models import Event
from orchestration.models import Run
from tests.conftest import wait_for
from tests.test_approvals import Client, _open_request, pending, refund_run

HUGE = {"order_id": "ORD-1042", "amount": 99999}


@pytest.fixture
def as_(client: Any, people: dict[str, User]) -> Any:
    return lambda name: Client(client, people[name])


def decide(as_: Any, who: str, request: ApprovalRequest, **body: Any) -> Any:
    return as_(who).post(f"/api/v1/approvals/{request.pk}/decision",
                         {"decision": "approve", **body})


@pytest.mark.django_db(transaction=True)
def test_it_holds_an_edit_into_a_stricter_policy_until_a_second_reviewer_approves(
        runner: None, as_: Any) -> None:
    run = refund_run(as_, 500)
    assert run.status == "waiting"
    request = pending(run)
    assert request.required_approvals == 1 and str(request.policy_version) == "refund-over-100 v1"

    edited = decide(as_, "reviewer", request, decision="edit", arguments=HUGE,
                    arguments_digest=request.arguments_digest)
    assert edited.status_code == 200, edited.content
    body = edited.json()
    assert body["status"] == "pending"
    assert body["policy"] == "refund-over-1000 v1"
    assert body["required_approvals"] == 2 and body["approvals"] == 1
    assert body["arguments_digest"] == approvals.digest(HUGE)

    # The run keeps waiting: nothing resolved, nothing resumed, no refund paid.
    assert Run.objects.get(pk=run.pk).status == "waiting"
    assert not Event.objects.filter(chain=run.pk, kind="approval.resolved").exists()
    assert not Event.objects.filter(chain=run.pk, kind="tool.called",
                                    data__tool="issue_refund").exists()

    again = decide(as_, "reviewer", request, arguments_digest=body["arguments_digest"])
    assert again.status_code == 409 and "already decided" in again.json()["error"]
    second = decide(as_, "reviewer2", request, arguments_digest=body["arguments_digest"])
    assert second.status_code == 200 and second.json()["status"] == "approved"

    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                   what="the run to finish after the second approval")
    called = Event.objects.get(chain=run.pk, kind="tool.called", data__tool="issue_refund")
    assert called.data["arguments"] == HUGE


@pytest.mark.django_db
def test_it_records_the_upgrade_with_the_old_and_the_new_policy(as_: Any, people: dict) -> None:
    request = _open_request(people["operator"])
    assert decide(as_, "reviewer", request, decision="edit", arguments=HUGE).status_code == 200
    upgraded = Event.objects.get(chain=request.run_id, kind="approval.upgraded")
    assert upgraded.actor == "user:reviewer"
    assert upgraded.data["request"] == str(request.pk)
    assert upgraded.data["old"]["policy"] == "refund-over-100 v1"
    assert upgraded.data["old"]["required_approvals"] == 1
    assert upgraded.data["new"]["policy"] == "refund-over-1000 v1"
    assert upgraded.data["new"]["required_approvals"] == 2
    assert upgraded.data["arguments_digest"] == approvals.digest(HUGE)
    assert upgraded.data["changes"] == [{"field": "amount", "from": 500, "to": 99999}]
    assert "refund-over-1000 v1" in upgraded.data["why"]
    # The upgrade follows the decision that caused it on the run's chain.
    decision = Event.objects.get(chain=request.run_id, kind="approval.decision")
    assert decision.seq < upgraded.seq

    request.refresh_from_db()
    assert request.status == "pending" and request.required_approvals == 2
    assert str(request.policy_version) == "refund-over-1000 v1"
    assert request.decider_group.name == "reviewer"


@pytest.mark.django_db
def test_it_keeps_one_approval_when_an_edit_lowers_the_amount(as_: Any, people: dict) -> None:
    request = _open_request(people["operator"])
    lower = {"order_id": "ORD-1042", "amount": 80}
    answer = decide(as_, "reviewer", request, decision="edit", arguments=lower)
    assert answer.status_code == 200
    assert answer.json()["status"] == "edited"
    assert answer.json()["required_approvals"] == 1
    assert answer.json()["policy"] == "refund-over-100 v1"
    request.refresh_from_db()
    assert request.resolution == {"action": "proceed", "arguments": lower}
    assert not Event.objects.filter(chain=request.run_id, kind="approval.upgraded").exists()


@pytest.mark.django_db
def test_it_keeps_the_stricter_requirement_when_an_edit_needs_fewer_approvals(
        as_: Any, people: dict) -> None:
    request = _open_request(people["operator"], amount=5000)
    assert request.required_approvals == 2
    answer = decide(as_, "reviewer", request, decision="edit",
                    arguments={"order_id": "ORD-1042", "amount": 50})
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "pending" and body["required_approvals"] == 2
    assert body["policy"] == "refund-over-1000 v1" and body["approvals"] == 1
    assert not Event.objects.filter(chain=request.run_id, kind="approval.upgraded").exists()
    assert decide(as_, "reviewer2", request).json()["status"] == "approved"


@pytest.mark.django_db
def test_it_shows_a_swapped_order_id_to_the_next_approver(as_: Any, people: dict) -> None:
    request = _open_request(people["operator"], amount=5000)
    swapped = {"order_id": "<b>ORD-9999</b>", "amount": 5000}
    assert decide(as_, "reviewer", request, decision="edit",
                  arguments=swapped).json()["status"] == "pending"

    seen = as_("reviewer2").get(f"/api/v1/approvals/{request.pk}").json()
    assert seen["arguments"] == swapped
    assert seen["original_arguments"] == {"order_id": "ORD-1042", "amount": 5000}
    assert seen["changes"] == [{"field": "order_id", "from": "ORD-1042",
                                "to": "<b>ORD-9999</b>"}]
    queued = as_("reviewer2").get("/api/v1/approvals?status=pending").json()
    assert [q["changes"] for q in queued if q["id"] == str(request.pk)] == [seen["changes"]]

    from django.test import Client as Browser

    browser = Browser()
    browser.force_login(people["reviewer2"])
    page = browser.get(f"/review/{request.pk}/").content.decode()
    assert 'id="changes"' in page
    assert html.escape('"<b>ORD-9999</b>"', quote=True) in page and "<b>ORD-9999</b>" not in page
    assert html.escape('"ORD-1042"', quote=True) in page
    queue = browser.get("/review/").content.decode()
    assert "Edited:" in queue and "<b>ORD-9999</b>" not in queue


@pytest.mark.django_db
def test_it_shows_no_changes_for_an_unedited_request(as_: Any, people: dict) -> None:
    request = _open_request(people["operator"])
    seen = as_("reviewer").get(f"/api/v1/approvals/{request.pk}").json()
    assert seen["changes"] == []
    assert seen["original_arguments"] == seen["arguments"]


@pytest.mark.django_db
def test_it_refuses_an_edit_into_a_policy_the_editor_may_not_decide(as_: Any,
                                                                     people: dict) -> None:
    request = _open_request(people["operator"])
    policy = Policy.objects.create(slug="refund-over-50000", name="Refunds over 50000")
    approvals.policy_publish(policy=policy, tool="issue_refund", risk_class="",
                             conditions=[{"arg": "amount", "op": ">", "value": 50000}],
                             decider_group=Group.objects.get(name="admin"),
                             required_approvals=3)
    refused = decide(as_, "reviewer", request, decision="edit", arguments=HUGE)
    assert refused.status_code == 403 and "refund-over-50000 v1" in refused.json()["error"]
    request.refresh_from_db()
    assert request.status == "pending" and request.required_approvals == 1
    assert request.arguments["amount"] == 500 and not request.decisions.exists()
