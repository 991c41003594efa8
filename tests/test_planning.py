"""Planned runs: a planner agent proposes the run's tasks, the plan is validated (and re-planned
when it is not), the design gate asks a reviewer when the process says so, and replay
reproduces the run from the ledger. Runs on the worker of each mode."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User

from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit.models import Event
from console.models import ApiToken
from orchestration import services
from orchestration.models import Agent, Process, Run
from tests.conftest import wait_for

REFUND = {"order_id": "ORD-1042", "amount": 40, "reason": "damaged",
          "customer_email": "kim@example.com"}
INPUT_SCHEMA = {"type": "object", "required": ["order_id", "customer_email"]}

GOOD = {"tasks": [
    {"key": "investigate", "title": "Investigate the request",
     "executor": {"type": "agent", "ref": "refund-investigator"},
     "tools": ["lookup_order", "lookup_refund_policy"], "budget": {"cost": "0.5"}},
    {"key": "notify_customer", "executor": {"type": "agent", "ref": "customer-comms"},
     "depends_on": ["investigate"], "budget": {"cost": "0.5"}},
], "result": {"message_id": "$tasks.notify_customer.tool_results.send_customer_email.message_id"}}
# An executor that does not exist, and a tool the agent was not granted.
BAD = {"tasks": [
    {"key": "investigate", "executor": {"type": "agent", "ref": "refund-investigator"},
     "tools": ["issue_refund"]},
    {"key": "pay", "executor": {"type": "agent", "ref": "ghost"}, "depends_on": ["investigate"]},
]}


def turn(plan: dict[str, Any], fence: str = "json") -> dict[str, Any]:
    body = json.dumps(plan, indent=1)
    return {"text": f"Here is the plan.\n```{fence}\n{body}\n```", "tokens_in": 300,
            "tokens_out": 120}


def planned_process(script: list[dict[str, Any]], gate: dict[str, Any] | None = None,
                    slug: str = "planned-refund") -> Process:
    identity, _ = User.objects.get_or_create(username=f"agent-planner-{slug}")
    Agent.objects.update_or_create(
        slug=f"planner-{slug}",
        defaults={"name": "Planner", "user": identity, "provider": "scripted",
                  "model_name": "scripted-demo", "instructions": "You plan refund handling.",
                  "model_params": {"script": script}, "step_budget": 3})
    process = Process.objects.create(slug=slug, name="Planned refund", pattern="hybrid")
    plan: dict[str, Any] = {"planning": {
        "agent": f"planner-{slug}",
        "goal": "Handle the refund request for order {{input.order_id}} ({{input.reason}}).",
        "constraints": {"max_tasks": 4, "max_cost": 5}}}
    if gate is not None:
        plan["design_gate"] = gate
    services.process_publish(process=process, plan=plan, input_schema=INPUT_SCHEMA)
    return process


def start(process: Process) -> Run:
    return services.run_create(process=process, input=dict(REFUND),
                               user=User.objects.get(username="operator"))


def settled(run: Run, timeout: float = 60) -> Run:
    def done() -> Any:
        row = Run.objects.get(pk=run.pk)
        return row if row.status in ("succeeded", "failed", "cancelled", "waiting",
                                     "awaiting_plan_approval") else None

    return wait_for(done, timeout=timeout, what=f"run {run.pk} to settle")


def finished(run: Run, timeout: float = 60) -> Run:
    """The run once it ended (after a decision, which a worker applies)."""
    return wait_for(lambda: Run.objects.filter(
        pk=run.pk, status__in=["succeeded", "failed", "cancelled"]).first(), timeout=timeout,
        what=f"run {run.pk} to end")


def kinds(run: Run, prefix: str = "plan.") -> list[str]:
    return list(Event.objects.filter(chain=run.pk, kind__startswith=prefix).order_by("seq")
                .values_list("kind", flat=True))


def pending(run: Run) -> ApprovalRequest:
    return ApprovalRequest.objects.get(run_id=run.pk, status="pending")


def decide(request: ApprovalRequest, decision: str, **kw: Any) -> ApprovalRequest:
    return approvals.request_decide(request_id=request.pk, decision=decision,
                                    user=User.objects.get(username="reviewer"), **kw)


@pytest.fixture
def planned(runner: None, demo: None) -> None:
    """The worker, with the demo's agents and tools seeded."""


@pytest.mark.django_db(transaction=True)
def test_a_planned_run_goes_from_its_goal_to_success(planned: None, client: Any) -> None:
    # The gate's threshold is above the estimate (1.0): the plan runs at once.
    run = settled(start(planned_process([turn(GOOD)], gate={"cost_over": 2})))
    assert run.status == "succeeded", run.error
    assert kinds(run) == ["plan.proposed", "plan.validated"]
    assert run.plan_version == 1 and [t["key"] for t in run.plan["tasks"]] == [
        "investigate", "notify_customer"]
    assert list(run.tasks.values_list("key", "status")) == [
        ("investigate", "succeeded"), ("notify_customer", "succeeded")]
    states = [(e["from"], e["to"]) for e in Event.objects.filter(
        chain=run.pk, kind="run.state").order_by("seq").values_list("data", flat=True)]
    assert states[:3] == [("pending", "planning"), ("planning", "queued"), ("queued", "running")]
    # The planner's call counts against the run like any model call.
    assert run.tokens_in >= 300 + 300 and run.steps >= 1
    proposed = Event.objects.get(chain=run.pk, kind="plan.proposed").data
    assert proposed["version"] == 1 and proposed["tokens_in"] == 300

    token = ApiToken.issue(User.objects.get(username="operator"))[1]
    body = client.get(f"/api/v1/runs/{run.pk}", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert body["phase"] == "done"
    assert body["plan"]["version"] == 1
    assert [t["key"] for t in body["plan"]["plan"]["tasks"]] == ["investigate",
                                                                 "notify_customer"]
    client.force_login(User.objects.get(username="operator"))
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="plan"' in page and "Plan v1" in page and "notify_customer" in page
    assert "planner (planner-planned-refund)" in page


@pytest.mark.django_db(transaction=True)
def test_an_invalid_plan_goes_back_to_the_planner_with_its_errors(planned: None) -> None:
    run = settled(start(planned_process([turn(BAD), turn(GOOD, fence="yaml")])))
    assert run.status == "succeeded", run.error
    assert kinds(run) == ["plan.proposed", "plan.rejected", "plan.proposed", "plan.validated"]
    rejected = Event.objects.get(chain=run.pk, kind="plan.rejected").data
    assert rejected["version"] == 1
    assert any("ghost" in e for e in rejected["errors"])
    assert any("issue_refund" in e for e in rejected["errors"])
    assert run.plan_version == 2


@pytest.mark.django_db(transaction=True)
def test_a_planner_that_never_finds_a_valid_plan_escalates(planned: None) -> None:
    run = settled(start(planned_process([turn(BAD)] * 3)))
    assert run.status == "awaiting_plan_approval"
    assert kinds(run) == ["plan.proposed", "plan.rejected"] * 3
    request = pending(run)
    assert request.reason == "plan_invalid"
    assert "ghost" in request.detail
    assert not run.tasks.exists()
    decide(request, "stop", note="give up")
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="cancelled").first(),
                   what="the run to be cancelled")


@pytest.mark.django_db(transaction=True)
def test_the_design_gate_waits_for_a_reviewer_who_approves(planned: None, client: Any) -> None:
    run = settled(start(planned_process([turn(GOOD)], gate={"tools": ["send_customer_email"]})))
    assert run.status == "awaiting_plan_approval"
    assert not run.tasks.exists()
    request = pending(run)
    assert request.reason == "plan_review"
    assert request.decider_group.name == "reviewer"
    assert request.context["plan"]["tasks"][0]["key"] == "investigate"
    assert request.context["estimate"] == "1.0"
    assert request.context["validation"] == {"valid": True, "errors": []}
    token = ApiToken.issue(User.objects.get(username="operator"))[1]
    body = client.get(f"/api/v1/runs/{run.pk}", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert body["phase"] == "plan_review" and body["plan"]["version"] == 1
    assert body["waiting_on"] == [{"kind": "approval", "task": "", "reason": "plan_review",
                                   "id": str(request.pk)}]
    decide(request, "approve")
    run = finished(run)
    assert run.status == "succeeded", run.error
    assert kinds(run) == ["plan.proposed", "plan.validated", "plan.approved"]
    approved = Event.objects.get(chain=run.pk, kind="plan.approved")
    assert approved.data["by"] == "reviewer" and approved.data["version"] == 1


@pytest.mark.django_db(transaction=True)
def test_a_reviewer_edits_the_plan_and_an_invalid_edit_changes_nothing(planned: None,
                                                                      client: Any) -> None:
    run = settled(start(planned_process([turn(GOOD)], gate={"always": True})))
    request = pending(run)
    with pytest.raises(approvals.ApprovalError, match="ghost"):
        decide(request, "edit", arguments=BAD)
    # On the review page, the refused edit comes back with its error and what was typed.
    client.force_login(User.objects.get(username="reviewer"))
    assert "Edited plan" in client.get(f"/review/{request.pk}/").content.decode()
    typed = json.dumps(BAD)
    page = client.post(f"/review/{request.pk}/decide", {"decision": "edit", "arguments": typed})
    assert page.status_code == 400
    assert "there is no agent" in page.content.decode()
    assert "ghost" in page.content.decode() and "issue_refund" in page.content.decode()
    request.refresh_from_db()
    assert request.status == "pending" and request.arguments["tasks"][1]["key"] == (
        "notify_customer")
    only_investigate = {"tasks": GOOD["tasks"][:1]}
    decide(request, "edit", arguments=only_investigate)
    run = finished(run)
    assert run.status == "succeeded", run.error
    assert kinds(run) == ["plan.proposed", "plan.validated", "plan.edited", "plan.validated",
                          "plan.approved"]
    assert run.plan_version == 2
    assert list(run.tasks.values_list("key", flat=True)) == ["investigate"]
    edited = Event.objects.get(chain=run.pk, kind="plan.edited").data
    assert edited["by"] == "reviewer" and edited["plan"] == only_investigate


@pytest.mark.django_db(transaction=True)
def test_a_rejected_plan_is_planned_again_with_the_reviewers_note(planned: None) -> None:
    second = {"tasks": GOOD["tasks"][:1]}
    run = settled(start(planned_process([turn(GOOD), turn(second)], gate={"always": True})))
    decide(pending(run), "reject", note="do not email the customer yet")
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="awaiting_plan_approval",
                                              plan_version=2).first(), what="a second plan")
    feedback = Event.objects.get(chain=run.pk, kind="plan.feedback").data
    assert feedback["note"] == "do not email the customer yet"
    assert [r.status for r in ApprovalRequest.objects.filter(run_id=run.pk)
            .order_by("created_at")] == ["rejected", "pending"]
    decide(pending(run), "approve")
    run = finished(run)
    assert run.status == "succeeded", run.error
    assert kinds(run) == ["plan.proposed", "plan.validated", "plan.feedback", "plan.proposed",
                          "plan.validated", "plan.approved"]


@pytest.mark.django_db(transaction=True)
def test_replay_reproduces_a_planned_run_from_its_ledger(planned: None) -> None:
    from orchestration.replay import replay

    run = settled(start(planned_process([turn(BAD), turn(GOOD), turn(GOOD)],
                                        gate={"always": True})))
    decide(pending(run), "reject", note="try again")
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="awaiting_plan_approval",
                                              plan_version=3).first(), what="a third plan")
    decide(pending(run), "approve")
    run = finished(run)
    assert run.status == "succeeded", run.error
    result = replay(run)
    assert result.ok, result.summary()
    planned_events = Event.objects.filter(chain=run.pk, kind__startswith="plan.").count()
    assert result.compared > planned_events

    edited = settled(start(planned_process([turn(GOOD)], gate={"always": True},
                                           slug="planned-edit")))
    decide(pending(edited), "edit", arguments={"tasks": GOOD["tasks"][:1]})
    edited = finished(edited)
    assert replay(edited).ok, replay(edited).summary()


@pytest.mark.django_db
def test_a_resumed_planner_does_not_ask_again_for_a_turn_the_ledger_holds(demo: None) -> None:
    """A worker lost after a turn was recorded: the next one reads the conversation back from
    the ledger, so the model is asked for the second turn, not the first again."""
    from audit import ledger
    from orchestration import planning

    run = start(planned_process([turn(BAD), turn(GOOD)]))  # not committed: no worker runs it
    Run.objects.filter(pk=run.pk).update(status="planning")
    ledger.append(run.pk, "plan.proposed", {"version": 1, "agent": "planner-planned-refund",
                                            "response": {"text": turn(BAD)["text"]}},
                  actor="agent:planner-planned-refund")
    ledger.append(run.pk, "plan.rejected", {"version": 1, "errors": ["no agent 'ghost'"]},
                  actor="system")
    planning.plan_run(str(run.pk))
    run.refresh_from_db()
    assert run.status == "queued" and run.plan_version == 2
    assert kinds(run) == ["plan.proposed", "plan.rejected", "plan.proposed", "plan.validated"]
    assert run.tokens_in == 300 and run.steps == 1  # one call: the second turn's


@pytest.mark.django_db
def test_tool_steps_need_the_process_grant_and_the_planner_counts_against_the_budget(
        demo: None) -> None:
    from orchestration import planning

    process = planned_process([turn(GOOD)])
    run = start(process)
    step = {"tasks": [{"key": "look", "executor": {"type": "tool", "ref": "lookup_order"},
                       "args": {"order_id": "$input.order_id"}}]}
    _, errors, _ = planning.check_for(run.pk, step)
    assert errors == ["task 'look': the process is not granted the tool 'lookup_order'"]
    _, errors, _ = planning.check_for(run.pk, {"tasks": [
        {"key": "ask", "executor": {"type": "human", "ref": "nobody"}}]})
    assert errors == ["task 'ask': there is no group 'nobody' of people"]

    Run.objects.filter(pk=run.pk).update(budget_tokens=100)
    planning.plan_run(str(run.pk))
    run.refresh_from_db()
    assert run.status == "awaiting_plan_approval" and run.tokens_in == 0
    request = pending(run)
    assert request.reason == "plan_invalid" and "budget_exhausted" in request.detail


def test_a_plan_is_either_fixed_or_planned_and_the_rules_know_the_reasons() -> None:
    from approvals.models import Reason
    from orchestration import rules
    from orchestration.engine.errors import PlanError
    from orchestration.engine.plan import parse_plan

    planned = parse_plan({"planning": {"agent": "p", "goal": "g", "constraints": {"max_tasks": 2}},
                          "design_gate": {"cost_over": 3, "tools": ["issue_refund"]}})
    assert planned.tasks == () and planned.planning["agent"] == "p"
    assert planned.design_gate == {"cost_over": 3, "tools": ["issue_refund"]}
    with pytest.raises(PlanError):
        parse_plan({**GOOD, "planning": {"agent": "p", "goal": "g"}})
    with pytest.raises(PlanError):
        parse_plan({"planning": {"agent": "p", "goal": "g", "constraints": {"max_tasks": 0}}})
    with pytest.raises(PlanError):
        parse_plan({"design_gate": {"always": True}})
    assert (rules.PLAN_REVIEW, rules.PLAN_INVALID) == (Reason.PLAN_REVIEW, Reason.PLAN_INVALID)
    assert rules.plan_resolution(reason="plan_review", status="approved",
                                 resolution={"action": "proceed"}).action == "accept"
    assert rules.plan_resolution(reason="plan_invalid", status="approved",
                                 resolution={"action": "proceed"}).action == "replan"
    assert rules.plan_resolution(reason="plan_review", status="rejected", resolution={
        "action": "reject", "note": "no"}) == rules.PlanDecision("replan", note="no")


def test_the_planner_reads_its_plan_out_of_a_reply_and_the_gate_names_its_reasons() -> None:
    from orchestration.engine import planner
    from orchestration.engine.plan import parse_plan

    assert planner.extract("```yaml\ntasks:\n  - key: a\n    executor: {type: tool, ref: t}\n```"
                           ) == {"tasks": [{"key": "a", "executor": {"type": "tool", "ref": "t"}}]}
    assert planner.extract(json.dumps(GOOD)) == GOOD
    with pytest.raises(Exception, match="neither valid JSON nor valid YAML|no plan"):
        planner.extract("I cannot plan this: [")
    assert planner.fill_goal("Refund {{input.order_id}} ({{ input.missing }})",
                             {"order_id": "ORD-1"}) == "Refund ORD-1 ()"
    plan = parse_plan(GOOD)
    assert str(planner.estimate(plan)) == "1.0"
    assert planner.gate_reasons({"cost_over": 0.5, "tools": ["send_customer_email", "x"]}, plan,
                                ["send_customer_email"]) == [
        "the estimated cost 1.0 is over 0.5", "the plan uses send_customer_email"]
    assert planner.gate_reasons({"cost_over": 2}, plan, []) == []
    assert planner.within(plan, {"max_tasks": 1, "max_cost": 0.5}) == [
        "the plan has 2 tasks; at most 1 are allowed",
        "the tasks' budgets add up to 1.0; at most 0.5 is allowed"]
    history = [("plan.proposed", {}), ("plan.rejected", {}), ("plan.feedback", {}),
               ("plan.proposed", {})]
    assert planner.turns_left(3, history) == 2
    messages = planner.conversation("Plan well.", "Goal: x", [
        ("plan.proposed", {"response": {"text": "v1"}}),
        ("plan.rejected", {"errors": ["bad"]}), ("plan.feedback", {"note": "smaller"})])
    assert [m.role for m in messages] == ["system", "user", "assistant", "user", "user"]
    assert "bad" in messages[3].content and "smaller" in messages[4].content


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_run_under_plan_review_cancels_its_request(planned: None) -> None:
    run = settled(start(planned_process([turn(GOOD)], gate={"always": True})))
    request = pending(run)
    run = services.run_cancel(run=run, user=User.objects.get(username="operator"))
    assert run.status == "cancelled"
    request.refresh_from_db()
    assert request.status == "cancelled" and not run.tasks.exists()
