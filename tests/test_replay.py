"""Replay from the ledger and fork from a step: same decisions out, nothing external called."""

from __future__ import annotations

import copy
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from approvals import services as approvals
from approvals.models import ApprovalRequest, Policy
from audit.models import Event
from console.models import ApiToken
from orchestration.models import Agent, Run
from orchestration.replay import ledger_of, replay
from tests.conftest import VENDOR_INPUT, wait_for_run

REFUND = {"order_id": "ORD-1042", "reason": "damaged", "customer_email": "kim@example.com"}
INQUIRY = {"customer_email": "kim@example.com", "order_id": "ORD-1042",
           "message": "Where is my order?"}


@pytest.fixture
def runner(runner: None, demo: None) -> None:
    """The worker, with the demo data seeded."""


class Api:
    def __init__(self, client: Any, username: str) -> None:
        self.client = client
        self.auth = f"Bearer {ApiToken.issue(User.objects.get(username=username))[1]}"

    def post(self, path: str, data: Any) -> Any:
        import json

        return self.client.post(path, data=json.dumps(data), content_type="application/json",
                                HTTP_AUTHORIZATION=self.auth)


def start(client: Any, process: str, data: dict[str, Any]) -> Run:
    created = Api(client, "operator").post("/api/v1/runs", {"process": process, "input": data})
    assert created.status_code == 201, created.content
    return wait_for_run(created.json()["id"])


def approved_refund(client: Any, amount: float) -> Run:
    run = start(client, "refund-exception", {**REFUND, "amount": amount})
    assert run.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    approvals.request_decide(request_id=request.pk, user=User.objects.get(username="reviewer"),
                             decision="approve")
    return wait_for_run_end(run)


def wait_for_run_end(run: Run) -> Run:
    from tests.conftest import wait_for

    return wait_for(lambda: Run.objects.filter(pk=run.pk, status__in=[
        "succeeded", "failed", "cancelled"]).first(), what=f"run {run.pk} to finish")


def replay_command(*args: str) -> tuple[int, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("replay", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        return int(exc.code or 0), err.getvalue()
    return 0, out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_it_replays_every_demo_process_to_the_same_decisions(runner: None, client: Any) -> None:
    runs = [
        start(client, "vendor-onboarding", dict(VENDOR_INPUT)),
        start(client, "refund-exception", {**REFUND, "amount": 40}),
        approved_refund(client, 500),
        start(client, "customer-inquiry", INQUIRY),
    ]
    assert [r.status for r in runs] == ["succeeded"] * 4
    assert Event.objects.filter(chain=runs[2].pk, kind="approval.resolved").exists()
    for run in runs:
        result = replay(run)
        assert result.ok, result.summary()
        assert result.compared > 10
        code, text = replay_command(str(run.pk))
        assert code == 0, text
        assert "matches" in text


@pytest.mark.django_db(transaction=True)
def test_it_calls_no_model_and_no_tool_when_replaying(runner: None, client: Any) -> None:
    run = start(client, "customer-inquiry", INQUIRY)
    # Scripts that would fail if a replay ran the agent's model for real.
    Agent.objects.update(model_params={"script": []})
    assert replay(run).ok
    events = ledger_of(run)
    dropped = [e for e in events if not (e.kind == "model.called" and e.data["step"] == 2
                                         and e.data["task"] == "answer")]
    result = replay(run, events=dropped)
    assert not result.ok
    assert "holds no model turn for task answer step 2" in result.summary()


@pytest.mark.django_db(transaction=True)
def test_it_reports_the_first_divergence_when_a_recorded_tool_result_differs(
        runner: None, client: Any) -> None:
    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    events = copy.deepcopy(ledger_of(run))
    altered = []
    for e in events:
        if e.kind == "tool.called" and e.data["task"] == "sanctions":
            e = type(e)(seq=e.seq, kind=e.kind, data={**e.data, "result": {
                "clear": False, "list": "consolidated-2026-11"}})
        altered.append(e)
    result = replay(run, events=altered)
    assert not result.ok
    divergence = result.divergence
    assert divergence is not None and divergence.stream == "task sanctions"
    assert divergence.expected == {"kind": "task.succeeded",
                                   "output": {"clear": True, "list": "consolidated-2026-11"}}
    assert divergence.got["output"]["clear"] is False
    assert f"event #{divergence.seq}" in result.summary()


@pytest.mark.django_db(transaction=True)
def test_it_reports_a_divergence_when_the_plan_changes(runner: None, client: Any) -> None:
    run = start(client, "refund-exception", {**REFUND, "amount": 40})
    plan = copy.deepcopy(run.process_version.plan)
    plan["tasks"][0]["spec"] = "Check the order only."
    result = replay(run, plan=plan)
    assert not result.ok
    assert result.divergence is not None
    assert result.divergence.stream == "task investigate"
    assert result.divergence.expected["kind"] == "model.called"
    assert result.divergence.expected["messages_digest"] != result.divergence.got[
        "messages_digest"]


@pytest.mark.django_db(transaction=True)
def test_it_exits_1_when_todays_policies_would_decide_differently(
        runner: None, client: Any) -> None:
    run = start(client, "refund-exception", {**REFUND, "amount": 40})
    assert replay_command(str(run.pk), "--current-policies")[0] == 0
    policy = Policy.objects.get(slug="refund-over-100")
    current = policy.current_version
    approvals.policy_publish(policy=policy, tool="issue_refund", risk_class="",
                             conditions=[{"arg": "amount", "op": ">", "value": 10}],
                             decider_group=current.decider_group, required_approvals=1,
                             deadline_minutes=60, on_expiry="reject")
    assert replay_command(str(run.pk))[0] == 0  # the policies in force when it ran
    code, text = replay_command(str(run.pk), "--current-policies")
    assert code == 1
    assert "diverged at event #" in text and "task refund" in text
    assert "approval.requested" in text and "refund-over-100 v2" in text


@pytest.mark.django_db(transaction=True)
def test_it_forks_from_a_step_reusing_earlier_results_and_running_the_rest(
        runner: None, client: Any) -> None:
    origin = start(client, "refund-exception", {**REFUND, "amount": 40})
    assert origin.status == "succeeded"
    # The earlier agents now fail if they run at all; the later one has a new prompt.
    Agent.objects.filter(slug__in=["refund-investigator", "refund-executor"]).update(
        model_params={"script": []})
    comms = Agent.objects.get(slug="customer-comms")
    comms.model_params["script"][0]["tool_calls"][0]["arguments"]["subject"] = "Refund sent"
    comms.save()

    response = Api(client, "operator").post(f"/api/v1/runs/{origin.pk}/fork", {"step": 3})
    assert response.status_code == 201, response.content
    fork = wait_for_run_end(Run.objects.get(pk=response.json()["id"]))
    assert fork.status == "succeeded", fork.error
    assert fork.forked_from_id == origin.pk and fork.fork_point == 3
    assert fork.result["refund_id"] == origin.result["refund_id"]

    events = Event.objects.filter(chain=fork.pk)
    forked = events.get(kind="run.forked")
    assert forked.data == {"origin": str(origin.pk), "step": 3, "task": "notify_customer",
                           "reused": ["investigate", "refund"]}
    for key in ("investigate", "refund"):
        assert not events.filter(kind__in=["model.called", "tool.called", "task.started"],
                                 data__task=key).exists()
    assert events.filter(kind="model.called", data__task="notify_customer").count() == 2
    sent = events.get(kind="tool.called", data__task="notify_customer")
    assert sent.data["arguments"]["subject"] == "Refund sent"
    assert replay(fork).ok


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_fork_from_a_step_out_of_range_or_by_an_outsider(
        runner: None, client: Any) -> None:
    origin = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    api = Api(client, "operator")
    assert api.post(f"/api/v1/runs/{origin.pk}/fork", {"step": 9}).status_code == 400
    assert "from 1 to 6" in api.post(f"/api/v1/runs/{origin.pk}/fork",
                                     {"step": 7}).json()["error"]
    User.objects.create_user("outsider")
    assert Api(client, "outsider").post(f"/api/v1/runs/{origin.pk}/fork",
                                        {"step": 1}).status_code == 404
    assert Api(client, "reviewer").post(f"/api/v1/runs/{origin.pk}/fork",
                                        {"step": 1}).status_code == 403
    assert not Run.objects.filter(forked_from=origin).exists()


@pytest.mark.django_db(transaction=True)
def test_it_shows_the_replay_verdict_on_the_run_page(runner: None, client: Any) -> None:
    """The page queues a replay check and shows its verdict once a worker has done it (more
    in tests/test_replay_jobs.py)."""
    from orchestration.models import ReplayCheck
    from tests.conftest import wait_for

    run = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    client.force_login(User.objects.get(username="reviewer"))
    page = client.get(f"/runs/{run.pk}/")
    assert b"Replay checks" in page.content
    assert b"Replay from the ledger" not in page.content  # reviewers see, they do not act
    assert b'name="step"' not in page.content  # reviewers may not start runs
    assert client.post(f"/runs/{run.pk}/replay").status_code == 403
    client.force_login(User.objects.get(username="operator"))
    assert b"Replay from the ledger" in client.get(f"/runs/{run.pk}/").content
    visit = client.get(f"/runs/{run.pk}/replay")  # a GET queues nothing
    assert visit.status_code == 303 and visit["Location"] == f"/runs/{run.pk}/#replay"
    assert not ReplayCheck.objects.filter(run=run).exists()
    queued = client.post(f"/runs/{run.pk}/replay")
    check = ReplayCheck.objects.get(run=run)
    assert queued.status_code == 303
    assert queued["Location"] == f"/runs/{run.pk}/#replay-check-{check.pk}"
    wait_for(lambda: ReplayCheck.objects.filter(run=run, status="matched").exists(),
             what="the replay check's verdict")
    page = client.get(queued["Location"])
    assert b'class="replay-verdict success"' in page.content and b"matches" in page.content
    client.force_login(User.objects.create_user("outsider"))
    assert client.post(f"/runs/{run.pk}/replay").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_it_forks_from_the_run_page_and_the_command(runner: None, client: Any) -> None:
    origin = start(client, "vendor-onboarding", dict(VENDOR_INPUT))
    client.force_login(User.objects.get(username="operator"))
    response = client.post(f"/runs/{origin.pk}/fork", {"step": "5"})
    fork = Run.objects.get(forked_from=origin)
    assert response.status_code == 302 and response.url == f"/runs/{fork.pk}/"
    fork = wait_for_run_end(fork)
    assert fork.status == "succeeded" and fork.result == origin.result
    assert b'id="forked-from"' in client.get(f"/runs/{fork.pk}/").content
    out = StringIO()
    call_command("fork", str(origin.pk), "--step", "2", "--user", "operator", stdout=out)
    second = wait_for_run_end(Run.objects.get(pk=out.getvalue().split()[-1]))
    assert second.status == "succeeded" and second.fork_point == 2
    assert replay(second).ok
