"""Replay and production decide by the same rules: which policy governs a call, what a
request's state means for the gate and for a call of unknown outcome, what a reviewer's
resolution does to a waiting task, and whether a worst case fits a budget. Each rule is one
Django-free function both call, so changing it in that one place changes both."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from approvals import rules as policy_rules
from approvals import services as approvals
from approvals.models import ApprovalRequest, Reason
from orchestration import rules, services
from orchestration.budgets import _why_run, _why_task
from orchestration.engine.governance import Gate, Usage
from orchestration.engine.plan import parse_plan
from orchestration.governance import DjangoGovernor
from orchestration.models import Process, Run, Task
from orchestration.replay import Recorded, ReplayGovernor, policies_as_of
from orchestration.replay.doubles import Request
from orchestration.replay.driver import Replay
from tests.test_replay import REFUND

# ---- the pure functions ------------------------------------------------------------------------


def version(number: int = 1, *, tool: str = "", risk_class: str = "", conditions: Any = (),
            required: int = 1) -> Any:
    return SimpleNamespace(number=number, tool=tool, risk_class=risk_class,
                           conditions=list(conditions), required_approvals=required)


def test_the_rule_modules_import_no_django() -> None:
    code = ("import sys, approvals.rules, orchestration.rules; "
            "sys.exit(any(m == 'django' or m.startswith('django.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_policy_matches_by_tool_risk_class_and_every_condition() -> None:
    over_100 = [{"arg": "amount", "op": ">", "value": 100}]
    assert policy_rules.policy_matches(version(), "anything", "", {})
    assert policy_rules.policy_matches(version(tool="refund"), "refund", "x", {})
    assert not policy_rules.policy_matches(version(tool="refund"), "email", "x", {})
    assert not policy_rules.policy_matches(version(risk_class="financial"), "refund", "pii", {})
    assert policy_rules.policy_matches(version(conditions=over_100), "t", "", {"amount": 101})
    assert not policy_rules.policy_matches(version(conditions=over_100), "t", "", {"amount": 99})
    nested = [{"arg": "customer.country", "op": "in", "value": ["DE"]}]
    assert policy_rules.policy_matches(version(conditions=nested), "t", "",
                                       {"customer": {"country": "DE"}})
    # An unreadable condition holds: a broken policy asks a person.
    assert policy_rules.policy_matches(version(conditions=[{"value": 1}]), "t", "", {})


def test_the_strictest_policy_wins_by_approvals_then_version_number() -> None:
    lax, strict, newer_strict = version(9), version(1, required=2), version(2, required=2)
    assert policy_rules.strictest([]) is None
    assert policy_rules.strictest([lax, strict]) is strict
    assert policy_rules.strictest([strict, newer_strict, lax]) is newer_strict
    over = version(3, tool="refund", conditions=[{"arg": "amount", "op": ">", "value": 1000}],
                   required=3)
    assert policy_rules.strictest_match([lax, over], "refund", "", {"amount": 5}) is lax
    assert policy_rules.strictest_match([lax, over], "refund", "", {"amount": 5000}) is over
    assert policy_rules.strictest_match([over], "email", "", {"amount": 5000}) is None


def test_an_edit_moves_a_request_only_to_a_different_stricter_policy() -> None:
    assert policy_rules.is_upgrade(version(required=2), same_version=False, current_required=1)
    assert not policy_rules.is_upgrade(version(required=2), same_version=True,
                                       current_required=1)
    assert not policy_rules.is_upgrade(version(required=1), same_version=False,
                                       current_required=1)
    assert not policy_rules.is_upgrade(None, same_version=False, current_required=1)


def test_the_gate_follows_the_latest_request() -> None:
    assert rules.gate_from_request("approved", {"a": 1}, "", "r1") == Gate("allow",
                                                                           arguments={"a": 1})
    assert rules.gate_from_request("edited", {"a": 2}, "", "r1") == Gate("allow",
                                                                         arguments={"a": 2})
    assert rules.gate_from_request("pending", {}, "", "r1") == Gate("wait", message="r1")
    assert rules.gate_from_request("rejected", {}, "too much", "r1") == Gate(
        "deny", message="too much")
    assert rules.gate_from_request("expired", {}, "", "r1") == Gate("deny",
                                                                    message="request expired")


def test_an_unknown_outcome_is_rerun_only_when_granted() -> None:
    assert rules.outcome_from_request(None) == ""
    assert rules.outcome_from_request("pending") == ""
    assert rules.outcome_from_request("approved") == "rerun"
    assert rules.outcome_from_request("edited") == "rerun"
    assert rules.outcome_from_request("rejected") == "reject"
    assert rules.outcome_from_request("cancelled") == "reject"


def test_what_a_resolution_does_to_the_waiting_task() -> None:
    def resolve(reason: str, resolution: dict[str, Any], *, waiting: bool = True,
                steps: int | None = 8) -> rules.Resume:
        return rules.apply_resolution(task_waiting=waiting, reason=reason,
                                      resolution=resolution, agent_step_budget=lambda: steps)

    assert resolve("sensitive_action", {"action": "stop"}, waiting=False).action == "cancel"
    assert resolve("sensitive_action", {"action": "proceed"}, waiting=False).action == "nothing"
    assert resolve("sensitive_action", {"action": "proceed"}) == rules.Resume("requeue")
    # A rejected sensitive action goes back to the task: the gate denies the call.
    assert resolve("sensitive_action", {"action": "reject", "note": "no"}) == rules.Resume(
        "requeue")
    assert resolve("budget_exhausted", {"action": "reject", "note": "no"}) == rules.Resume(
        "fail", error="stopped by a reviewer: no")
    assert resolve("budget_exhausted", {"action": "raise_budget", "budget": {"tokens": 5}}) == (
        rules.Resume("requeue", budget={"tokens": 5}))
    assert resolve("step_budget_exhausted", {"action": "proceed"}) == rules.Resume(
        "requeue", budget={"steps": 8})
    assert resolve("step_budget_exhausted", {"action": "proceed"}, steps=None) == (
        rules.Resume("requeue", budget={"steps": rules.DEFAULT_STEP_RAISE}))
    assert resolve("poison_task", {"action": "proceed"}) == rules.Resume("requeue",
                                                                         reset_crashes=True)


def test_a_worst_case_fits_only_within_the_cap() -> None:
    assert not rules.over_cap(None, 10**9, 0, 1)
    assert not rules.over_cap(100, 60, 30, 10)
    assert rules.over_cap(100, 60, 30, 11)
    assert rules.over_cap(Decimal("1.00"), Decimal("0.5"), Decimal("0.25"), Decimal("0.26"))


def test_the_rules_strings_are_the_models_values() -> None:
    assert rules.SENSITIVE_ACTION == Reason.SENSITIVE_ACTION
    assert rules.STEP_BUDGET_EXHAUSTED == Reason.STEP_BUDGET_EXHAUSTED
    assert rules.POISON_TASK == Reason.POISON_TASK
    status = ApprovalRequest.Status
    assert (rules.APPROVED, rules.EDITED, rules.PENDING) == (
        status.APPROVED, status.EDITED, status.PENDING)


# ---- one rule, both paths ------------------------------------------------------------------


def both_policies(arguments: dict[str, Any]) -> tuple[str | None, str | None]:
    """The policy production's matcher picks for a refund, and the one replay picks."""
    live = approvals.policy_match(tool="issue_refund", risk_class="financial",
                                  arguments=arguments)
    replayed = policies_as_of(timezone.now())("issue_refund", "financial", arguments)
    return (str(live) if live is not None else None), replayed


@pytest.mark.django_db
def test_a_changed_policy_rule_changes_production_and_replay_alike(
        demo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo's policies: refunds over 100 need one approval, over 1000 two.
    assert both_policies({"amount": 5000}) == ("refund-over-1000 v1", "refund-over-1000 v1")
    assert both_policies({"amount": 500}) == ("refund-over-100 v1", "refund-over-100 v1")
    assert both_policies({"amount": 5}) == (None, None)

    # Conditions no longer count: every refund falls under both policies.
    def tool_only(v: Any, tool: str, risk_class: str, arguments: Any) -> bool:
        return not v.tool or v.tool == tool

    monkeypatch.setattr(policy_rules, "policy_matches", tool_only)
    assert both_policies({"amount": 5}) == ("refund-over-1000 v1", "refund-over-1000 v1")

    # And the laxest match wins instead of the strictest.
    monkeypatch.setattr(policy_rules, "strictest", lambda versions: min(
        versions, key=lambda v: (v.required_approvals, v.number), default=None))
    assert both_policies({"amount": 5000}) == ("refund-over-100 v1", "refund-over-100 v1")


def waiting_run(task: str = "investigate") -> tuple[Run, Process]:
    process = Process.objects.get(slug="refund-exception")
    run = services.run_create(process=process, input={**REFUND, "amount": 500},
                              user=User.objects.get(username="operator"))
    Run.objects.filter(pk=run.pk).update(status="waiting")
    Task.objects.filter(run=run, key=task).update(status="waiting", error="why it waits")
    return Run.objects.get(pk=run.pk), process


def open_request(run: Run, task: str, reason: str, *, status: str, call_key: str = "",
                 arguments: Any = None, resolution: dict[str, Any] | None = None) -> Any:
    request = approvals.request_open(run_id=run.pk, task_key=task, reason=reason,
                                     requested_by="system", call_key=call_key,
                                     tool="issue_refund", arguments=arguments or {})
    ApprovalRequest.objects.filter(pk=request.pk).update(status=status,
                                                         resolution=resolution or {})
    return ApprovalRequest.objects.get(pk=request.pk)


def replayer_with(run: Run, request: Any) -> Replay:
    """A replay of ``run`` holding the twin of ``request``, decided as it was."""
    replayer = Replay(str(run.pk), [], parse_plan(run.process_version.plan), run.input, 3,
                      lambda *a: None)
    twin = Request(id=str(request.pk), task=request.task_key, call_key=request.call_key,
                   reason=request.reason, status=request.status,
                   arguments=request.arguments, note=(request.resolution or {}).get("note", ""))
    replayer.state.requests[twin.id] = twin
    replayer.state.newest[(twin.call_key, twin.reason)] = twin
    return replayer


def both_gates(run: Run, request: Any) -> tuple[Gate, Gate, str, str]:
    tool = SimpleNamespace(name="issue_refund", input_schema={"type": "object"})
    live = DjangoGovernor(run=run, task_key="refund", actor="system")
    ctx = SimpleNamespace(spec=SimpleNamespace(key="refund"), attempt=1)
    replayed = ReplayGovernor(replayer_with(run, request).state, ctx, lambda *a: None, {})  # type: ignore[arg-type]
    key = request.call_key
    return (live.gate(tool, {"amount": 500}, key), replayed.gate(tool, {"amount": 500}, key),
            live.outcome_decision(key), replayed.outcome_decision(key))


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["approved", "edited", "pending", "rejected", "expired"])
def test_the_gate_and_the_outcome_decision_come_out_the_same(demo: None, status: str) -> None:
    run, _ = waiting_run("refund")
    gate = open_request(run, "refund", Reason.SENSITIVE_ACTION, status=status, call_key="k1",
                        arguments={"amount": 90}, resolution={"note": "too much"})
    live, replayed, _, _ = both_gates(run, gate)
    assert live == replayed
    assert live.action == {"approved": "allow", "edited": "allow", "pending": "wait"}.get(
        status, "deny")
    outcome = open_request(run, "refund", Reason.UNKNOWN_OUTCOME, status=status, call_key="k2")
    _, _, live_outcome, replayed_outcome = both_gates(run, outcome)
    assert live_outcome == replayed_outcome == rules.outcome_from_request(status)


@pytest.mark.django_db
def test_a_changed_gate_rule_changes_production_and_replay_alike(
        demo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = waiting_run("refund")
    request = open_request(run, "refund", Reason.SENSITIVE_ACTION, status="approved",
                           call_key="k1", arguments={"amount": 90})
    assert both_gates(run, request)[:2] == (Gate("allow", arguments={"amount": 90}),) * 2
    monkeypatch.setattr(rules, "gate_from_request", lambda status, arguments, note, rid: Gate(
        "deny", message=f"four eyes are not enough ({status})"))
    monkeypatch.setattr(rules, "outcome_from_request", lambda status: "reject")
    changed = Gate("deny", message="four eyes are not enough (approved)")
    live, replayed, live_outcome, replayed_outcome = both_gates(run, request)
    assert live == replayed == changed
    assert live_outcome == replayed_outcome == "reject"  # even with no request at all


def resume_both(run: Run, request: Any) -> tuple[Task, Any, list[dict[str, Any]]]:
    """Production's resume of ``request``, and replay's application of the same resolution
    (a replay whose task waits on the request's twin): the task row, the replay's task and the
    replay's events after the stimulus."""
    replayer = replayer_with(run, request)
    snapshot = replayer.store.runs[str(run.pk)].snapshot
    snapshot.status = "waiting"
    snapshot.tasks[request.task_key].status = "waiting"
    before = len(replayer.store.events(str(run.pk)))
    replayer._apply(Recorded(seq=99, kind="approval.resolved", data={
        "request": str(request.pk), "status": request.status,
        "resolution": request.resolution}))
    services.resume_after_decision(request)
    events = [{"kind": e.kind, **e.data} for e in replayer.store.events(str(run.pk))[before:]]
    return (Task.objects.get(run=run, key=request.task_key), snapshot.tasks[request.task_key],
            events)


@pytest.mark.django_db
def test_a_resolution_does_the_same_to_the_task_in_production_and_replay(demo: None) -> None:
    run, _ = waiting_run()
    request = open_request(run, "investigate", Reason.BUDGET_EXHAUSTED, status="rejected",
                           resolution={"action": "reject", "note": "enough"})
    live, replayed, events = resume_both(run, request)
    assert live.status == replayed.status == "failed"
    assert live.error == replayed.error == "stopped by a reviewer: enough"
    assert [e["kind"] for e in events] == ["task.failed"]

    run, _ = waiting_run()
    request = open_request(run, "investigate", Reason.STEP_BUDGET_EXHAUSTED, status="approved",
                           resolution={"action": "proceed"})
    live, replayed, events = resume_both(run, request)
    assert live.status == replayed.status == "queued"
    steps = live.step_budget_extra
    assert steps > 0
    assert {"kind": "budget.raised", "task": "investigate", "raise": {"steps": steps}} in events


@pytest.mark.django_db
def test_a_changed_resolution_rule_changes_production_and_replay_alike(
        demo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Today a rejected budget request fails the task; under the changed rule it gets 3 steps.
    monkeypatch.setattr(rules, "apply_resolution", lambda **kw: rules.Resume(
        "requeue", budget={"steps": 3}))
    run, _ = waiting_run()
    request = open_request(run, "investigate", Reason.BUDGET_EXHAUSTED, status="rejected",
                           resolution={"action": "reject", "note": "enough"})
    live, replayed, events = resume_both(run, request)
    assert live.status == replayed.status == "queued"
    assert live.step_budget_extra == 3
    assert {"kind": "budget.raised", "task": "investigate", "raise": {"steps": 3}} in events


@pytest.mark.django_db
def test_a_budget_refusal_names_the_cap_the_shared_arithmetic_found(
        demo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = waiting_run()
    Run.objects.filter(pk=run.pk).update(budget_tokens=100, tokens_in=50, reserved_tokens=40)
    Task.objects.filter(run=run, key="investigate").update(budget_tokens=None)
    worst = Usage(tokens_in=20)
    assert _why_run(str(run.pk), worst).startswith("budget_exhausted: run tokens 50 used")
    monkeypatch.setattr(rules, "over_cap", lambda cap, used, reserved, needed: False)
    assert _why_run(str(run.pk), worst).startswith("budget_exhausted: run steps")
    assert "task investigate cost" in _why_task(str(run.pk), "investigate", worst)
