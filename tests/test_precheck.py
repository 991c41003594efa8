"""The checks a governed call makes before it runs come from one query (orchestration/precheck.py)
and a reservation is one statement: each answer still follows the database from one call to the
next, and a reservation the task's budget refuses leaves the run's budget as it was."""

from __future__ import annotations

import threading
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection, transaction
from guardian.shortcuts import assign_perm, remove_perm

from approvals.models import ApprovalRequest, Policy
from approvals.services import policy_publish
from orchestration import services
from orchestration.budgets import reserve
from orchestration.engine.governance import ALLOW, Usage
from orchestration.governance import DjangoGovernor
from orchestration.models import Process, Run, Task, Tool
from tests.test_replay import REFUND

LOOKUP = SimpleNamespace(name="lookup_order", input_schema={"type": "object"})


def refund_run() -> Run:
    process = Process.objects.get(slug="refund-exception")
    run = services.run_create(process=process, input={**REFUND, "amount": 500},
                              user=User.objects.get(username="operator"))
    return Run.objects.select_related("process_version__process").get(pk=run.pk)


def idle_run() -> Run:
    """A refund run with its ``refund`` task running, which no worker was given: nothing but
    the test reserves against its budgets (a created run's own tasks would, in a test that
    commits)."""
    process = Process.objects.get(slug="refund-exception")
    run = Run.objects.create(process_version=process.current_version, input=REFUND,
                             status="running", created_by=User.objects.get(username="operator"))
    Task.objects.create(run=run, key="refund", title="Refund", executor_type="agent",
                        executor_ref="refund-executor", status="running", attempts=1)
    return Run.objects.select_related("process_version__process").get(pk=run.pk)


@pytest.mark.django_db
def test_the_grant_read_with_the_stop_signals_follows_a_revocation(demo: None) -> None:
    user = User.objects.create(username="agent-probe")
    tool = Tool.objects.get(slug="lookup_order")
    assign_perm("orchestration.invoke_tool", user, tool)
    governor = DjangoGovernor(run=refund_run(), task_key="refund", actor="agent:probe",
                              grantee=user.pk)
    assert governor.stopped(tool="lookup_order", key="k1") == ""
    assert governor.granted("lookup_order") is True
    remove_perm("orchestration.invoke_tool", user, tool)
    assert governor.stopped(tool="lookup_order", key="k2") == ""
    assert governor.granted("lookup_order") is False
    # Asked with no stop check just before: a query of its own.
    assign_perm("orchestration.invoke_tool", user, tool)
    assert governor.granted("lookup_order") is True
    # An answer read with the stop signals is used once, and only for its own tool.
    assert governor.stopped(tool="lookup_order", key="k3") == ""
    remove_perm("orchestration.invoke_tool", user, tool)
    assert governor.granted("no_such_tool") is False
    assert governor.granted("lookup_order") is False
    User.objects.filter(pk=user.pk).update(is_active=False)
    assign_perm("orchestration.invoke_tool", user, tool)
    assert governor.stopped(tool="lookup_order", key="k4") == ""
    assert governor.granted("lookup_order") is False  # a deactivated identity holds nothing


@pytest.mark.django_db
def test_a_policy_published_between_two_calls_governs_the_second(demo: None) -> None:
    governor = DjangoGovernor(run=refund_run(), task_key="refund", actor="agent:probe")
    assert governor.stopped(tool="lookup_order", key="k1") == ""
    assert governor.gate(LOOKUP, {"order_id": "ORD-1"}, "k1") == ALLOW
    template = Policy.objects.exclude(current_version=None).first().current_version
    version = policy_publish(policy=Policy.objects.create(slug="lookups", name="Lookups"),
                             tool="lookup_order", decider_group=template.decider_group,
                             required_approvals=1)
    assert governor.stopped(tool="lookup_order", key="k2") == ""
    gate = governor.gate(LOOKUP, {"order_id": "ORD-1"}, "k2")
    assert gate.action == "wait"
    request = ApprovalRequest.objects.get(call_key="k2")
    assert request.policy_version_id == version.pk and str(request.pk) == gate.message
    # The same call again: the request naming it is read, not opened twice.
    assert governor.stopped(tool="lookup_order", key="k2") == ""
    assert governor.gate(LOOKUP, {"order_id": "ORD-1"}, "k2").message == str(request.pk)
    assert ApprovalRequest.objects.filter(call_key="k2").count() == 1
    # Retired (no current version): calls go through again.
    Policy.objects.filter(slug="lookups").update(current_version=None)
    assert governor.stopped(tool="lookup_order", key="k3") == ""
    assert governor.gate(LOOKUP, {"order_id": "ORD-1"}, "k3") == ALLOW


@pytest.mark.django_db
def test_a_stop_signal_is_still_seen_with_the_call_answers(demo: None) -> None:
    run = refund_run()
    governor = DjangoGovernor(run=run, task_key="refund", actor="agent:probe")
    Run.objects.filter(pk=run.pk).update(cancel_requested=True)
    assert governor.stopped(tool="lookup_order", key="k1").startswith("cancelled")
    assert governor.stopped().startswith("cancelled")


@pytest.mark.django_db(transaction=True)
def test_concurrent_reservations_stop_at_the_task_budget_and_the_run_keeps_only_theirs(
        demo: None) -> None:
    run = idle_run()
    Run.objects.filter(pk=run.pk).update(budget_tokens=None, budget_cost=None,
                                         budget_steps=None)
    Task.objects.filter(run=run, key="refund").update(budget_tokens=1000, budget_cost=None)
    granted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(4):
                why = reserve(str(run.pk), "refund", Usage(steps=1, tokens_in=70, tokens_out=30,
                                                           cost=Decimal("0.1")))
                with lock:
                    (granted if why == "" else refused).append(why)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    task = Task.objects.get(run=run, key="refund")
    row: Any = Run.objects.get(pk=run.pk)
    assert len(granted) == 10  # 12 x 4 tried; exactly what fits the task's 1000 tokens
    assert len(refused) == 38
    assert all(why.startswith("budget_exhausted: task refund tokens") for why in refused)
    assert task.reserved_tokens == row.reserved_tokens == 1000
    assert row.reserved_steps == 10 and row.reserved_cost == Decimal("1.0")


@pytest.mark.django_db
@pytest.mark.parametrize("stop", ["cancel", "kill_switch", "retired", "none"])
def test_a_model_call_reserves_only_when_nothing_stops_it(demo: None, stop: str) -> None:
    from orchestration.models import Agent, KillSwitch

    run = refund_run()
    agent = Agent.objects.exclude(user=None).first()
    governor = DjangoGovernor(run=run, task_key="refund", actor=f"agent:{agent.slug}",
                              agent=agent.slug)
    if stop == "cancel":
        Run.objects.filter(pk=run.pk).update(cancel_requested=True)
    elif stop == "kill_switch":
        KillSwitch.objects.create(scope="agent", target=agent.slug, reason="drill",
                                  engaged_by=User.objects.get(username="admin"))
    elif stop == "retired":
        Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.RETIRED)
    why = governor.begin_model_call(Usage(steps=1, tokens_in=70, tokens_out=30))
    row = Run.objects.get(pk=run.pk)
    task = Task.objects.get(run=run, key="refund")
    if stop == "none":
        assert why == "" and row.reserved_tokens == task.reserved_tokens == 100
        assert row.reserved_steps == 1
    else:
        assert why.startswith({"cancel": "cancelled", "kill_switch": "paused",
                               "retired": "agent_retired"}[stop]), why
        assert row.reserved_tokens == task.reserved_tokens == row.reserved_steps == 0


def _record_with(run: Run, ahead: Any, key: str = "k1") -> None:
    from orchestration.store import DjangoRunStore

    DjangoRunStore().record_step(str(run.pk), "tool.called", {
        "task": "refund", "tool": "lookup_order", "idempotency_key": key},
        usage=Usage(tool_calls=1), ahead=ahead)


def _reserved(run: Run) -> tuple[Any, ...]:
    task = Task.objects.get(run=run, key="refund")
    row = Run.objects.get(pk=run.pk)
    return (row.reserved_tokens, row.reserved_cost, row.reserved_steps, task.reserved_tokens,
            task.reserved_cost)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("cancelled", [False, True])
def test_a_call_whose_checks_ran_with_the_record_before_asks_nothing_more(
        demo: None, cancelled: bool) -> None:
    """The next call's stop signals, grant, policies and reservation are read in the
    transaction that records the call before it; the gate's questions then make no query."""
    from django.test.utils import CaptureQueriesContext

    run = idle_run()
    user = User.objects.create(username="agent-probe")
    assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug="lookup_order"))
    governor = DjangoGovernor(run=run, task_key="refund", actor="agent:probe", grantee=user.pk)
    worst = Usage(tool_calls=1, cost=Decimal("0.25"))
    # The policies in force are read once per change of them, by the first call that meets it.
    assert governor.stopped(tool="lookup_order", key="k0") == ""
    assert governor.gate(LOOKUP, {"order_id": "ORD-0"}, "k0") == ALLOW
    if cancelled:
        Run.objects.filter(pk=run.pk).update(cancel_requested=True)
    _record_with(run, governor.ahead_of_tool("lookup_order", "k2", worst))
    with CaptureQueriesContext(connection) as queries:
        why = governor.stopped(tool="lookup_order", key="k2")
        if not cancelled:
            assert why == "" and governor.granted("lookup_order") is True
            assert governor.gate(LOOKUP, {"order_id": "ORD-1"}, "k2") == ALLOW
            assert governor.reserve(worst) == ""
    assert [q["sql"] for q in queries.captured_queries] == []
    if cancelled:
        assert why.startswith("cancelled")
        assert _reserved(run) == (0, 0, 0, 0, 0)  # stopped: nothing reserved
    else:
        assert _reserved(run) == (0, Decimal("0.25"), 0, 0, Decimal("0.25"))
    # Polled again while the call runs: a query of its own, which sees a cancellation now.
    Run.objects.filter(pk=run.pk).update(cancel_requested=True)
    assert governor.stopped(tool="lookup_order", key="k2").startswith("cancelled")


@pytest.mark.django_db(transaction=True)
def test_a_reservation_made_ahead_for_another_call_is_given_back(demo: None) -> None:
    run = idle_run()
    governor = DjangoGovernor(run=run, task_key="refund", actor="agent:probe")
    model = Usage(steps=1, tokens_in=70, tokens_out=30)
    _record_with(run, governor.ahead_of_model(model))
    assert _reserved(run) == (100, 0, 1, 100, 0)
    # The model call asks for a different worst case (its prompt changed): the one made ahead
    # is given back and the call's own reserved instead.
    assert governor.begin_model_call(Usage(steps=1, tokens_in=50, tokens_out=30)) == ""
    assert _reserved(run) == (80, 0, 1, 80, 0)
    governor.release(Usage(steps=1, tokens_in=50, tokens_out=30))
    # One that no call takes up is given back when the loop lets it go.
    _record_with(run, governor.ahead_of_model(model), key="k2")
    assert _reserved(run) == (100, 0, 1, 100, 0)
    governor.release_ahead()
    assert _reserved(run) == (0, 0, 0, 0, 0)
    # A record that rolls back holds nothing and its checks are asked again.
    ahead = governor.ahead_of_model(model)
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        _record_with(run, ahead, key="k3")
        raise ZeroDivisionError
    assert not ahead.ready and _reserved(run) == (0, 0, 0, 0, 0)
    assert governor.begin_model_call(model) == ""
    assert _reserved(run) == (100, 0, 1, 100, 0)


@pytest.mark.django_db(transaction=True)
def test_a_call_waiting_on_people_is_answered_ahead_with_its_own_request(demo: None) -> None:
    run = idle_run()
    governor = DjangoGovernor(run=run, task_key="refund", actor="agent:probe")
    template = Policy.objects.exclude(current_version=None).first().current_version
    policy_publish(policy=Policy.objects.create(slug="lookups", name="Lookups"),
                   tool="lookup_order", decider_group=template.decider_group,
                   required_approvals=1)
    assert governor.stopped(tool="lookup_order", key="k2") == ""
    opened = governor.gate(LOOKUP, {"order_id": "ORD-1"}, "k2")
    assert opened.action == "wait"
    _record_with(run, governor.ahead_of_tool("lookup_order", "k2", Usage(tool_calls=1)))
    assert governor.stopped(tool="lookup_order", key="k2") == ""
    # The request naming this call is found (the task's key is not the call's), not opened
    # again.
    assert governor.gate(LOOKUP, {"order_id": "ORD-1"}, "k2") == opened
    assert ApprovalRequest.objects.filter(call_key="k2").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_reservation_ahead_the_task_refuses_holds_nothing_at_the_run_either(
        demo: None) -> None:
    run = idle_run()
    Task.objects.filter(run=run, key="refund").update(budget_tokens=10)
    governor = DjangoGovernor(run=run, task_key="refund", actor="agent:probe")
    worst = Usage(steps=1, tokens_in=70, tokens_out=30)
    _record_with(run, governor.ahead_of_model(worst))
    assert _reserved(run) == (0, 0, 0, 0, 0)
    assert governor.begin_model_call(worst).startswith("budget_exhausted: task refund tokens")
    assert _reserved(run) == (0, 0, 0, 0, 0)


@pytest.mark.django_db(transaction=True)
def test_a_reservation_ahead_is_not_given_back_twice_once_the_task_was_taken_over(
        demo: None) -> None:
    run = idle_run()
    Task.objects.filter(run=run, key="refund").update(lease_owner="first")
    governor = DjangoGovernor(run=run, task_key="refund", actor="agent:probe", lease="first")
    _record_with(run, governor.ahead_of_model(Usage(steps=1, tokens_in=70, tokens_out=30)))
    assert _reserved(run) == (100, 0, 1, 100, 0)
    # Another worker takes the task over and gives back all it held (store.claim_task).
    Task.objects.filter(run=run, key="refund").update(lease_owner="second", reserved_tokens=0,
                                                      reserved_steps=0)
    Run.objects.filter(pk=run.pk).update(reserved_tokens=0, reserved_steps=0)
    governor.release_ahead()
    assert _reserved(run) == (0, 0, 0, 0, 0)
