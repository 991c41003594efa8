"""One gate for every side effect: plan-level tool and function steps pass the same checks as an
agent's tool calls (identity and grant, schema, approval policy, quota, budget, redaction,
ledger); stop signals (cancel, kill switches, retired agents, revoked grants) are checked before
every call and interrupt calls in flight; a timed-out non-idempotent call is never repeated
without a person; a broken configuration escalates instead of crashing."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from guardian.shortcuts import assign_perm, remove_perm

from approvals.models import ApprovalRequest
from audit.models import Event
from orchestration import grants, kill_switches, services, work
from orchestration.builtin_tools import registry
from orchestration.engine.contracts import ToolContract
from orchestration.engine.errors import UngatedCall
from orchestration.models import Agent, KillSwitch, Process, Run, Task, Tool
from tests.conftest import TEST_CRM_SECRET

OBJECT = {"type": "object"}


def _kinds(run: Run) -> list[str]:
    return list(Event.objects.filter(chain=run.pk).order_by("seq").values_list("kind", flat=True))


def _events(run: Run, kind: str) -> list[dict[str, Any]]:
    return list(Event.objects.filter(chain=run.pk, kind=kind).order_by("seq")
                .values_list("data", flat=True))


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Register test tools (in this process's registry, with Tool rows) and build one-step
    processes over them; runs are driven in this process with the outbox's messages."""
    sent: list[tuple[str, dict[str, Any]]] = []
    from orchestration import dispatch

    monkeypatch.setattr(dispatch, "send", lambda topic, **message: sent.append((topic, message)))

    class Steps:
        def tool(self, name: str, fn: Any, *, idempotent: bool = True, timeout_s: float = 10,
                 cost: str = "0", schema: dict[str, Any] | None = None, **row: Any) -> Tool:
            contract = ToolContract(name=name, fn=fn, idempotent=idempotent,
                                    input_schema=schema or OBJECT, timeout_s=timeout_s)
            monkeypatch.setitem(registry._tools, name, contract)
            return Tool.objects.create(slug=name, name=name, implementation=name,
                                       input_schema=schema or OBJECT, idempotent=idempotent,
                                       timeout_s=timeout_s, cost_per_call=Decimal(cost), **row)

        def process(self, slug: str, tasks: list[dict[str, Any]], *, grant: bool = True,
                    budgets: dict[str, Any] | None = None) -> Process:
            process = Process.objects.create(slug=slug, name=slug, pattern="deterministic")
            services.process_publish(process=process, input_schema=OBJECT,
                                     plan={"tasks": tasks}, budgets=budgets)
            if grant:
                grants.grant_plan_tools(process, by=None)
            assign_perm("orchestration.start_run", User.objects.get(username="operator"),
                        process)
            return process

        def start(self, process: Process, data: dict[str, Any] | None = None) -> Run:
            return services.run_create(process=process, input=data or {},
                                       user=User.objects.get(username="operator"))

        def drain(self, until: float = 20.0) -> None:
            """Deliver what the outbox sent, as a worker would, until nothing is left."""
            deadline = time.monotonic() + until
            while sent and time.monotonic() < deadline:
                topic, message = sent.pop(0)
                if topic == "advance":
                    work.advance(message["run_id"], message["message_id"])
                elif topic == "execute":
                    work.execute(message["run_id"], message["key"], message["message_id"])
                elif topic == "resume":
                    from orchestration.tasks import resume_after_decision

                    resume_after_decision.run(message["request_id"], message["message_id"])

    return Steps()


def step(key: str, ref: str, kind: str = "tool", **extra: Any) -> dict[str, Any]:
    return {"key": key, "executor": {"type": kind, "ref": ref}, **extra}


# ---- no second path ---------------------------------------------------------------------------


def test_no_tool_can_be_called_except_through_the_gate() -> None:
    for name in registry.names():
        with pytest.raises(UngatedCall):
            registry.get(name).call({})


# ---- plan-level steps pass the same gate --------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_plan_step_runs_as_its_process_identity_and_needs_a_grant(demo: None,
                                                                     steps: Any) -> None:
    calls: list[int] = []
    steps.tool("t_count", lambda: calls.append(1) or {"ok": True})
    granted = steps.process("granted", [step("a", "t_count")])
    bare = steps.process("bare", [step("a", "t_count", kind="function")], grant=False)

    run = steps.start(granted)
    steps.drain()
    assert Run.objects.get(pk=run.pk).status == "succeeded"
    (called,) = _events(run, "tool.called")
    assert called["actor"] == "process:granted"

    run = steps.start(bare)
    steps.drain()
    run.refresh_from_db()
    assert run.status == "failed"
    assert "not granted to process:bare" in run.error
    (refused,) = _events(run, "tool.refused")
    assert refused["actor"] == "process:bare"
    assert calls == [1]  # the ungranted step never called the tool

    # The grant is the same django-guardian permission an agent's is, on the process's user.
    user = Process.objects.get(slug="bare").service_user
    assert user is not None and not user.has_usable_password()
    assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug="t_count"))
    run = steps.start(bare)
    steps.drain()
    assert Run.objects.get(pk=run.pk).status == "succeeded"
    assert calls == [1, 1]


@pytest.mark.django_db(transaction=True)
def test_a_deterministic_refund_waits_for_the_reviewers_the_policy_names(demo: None,
                                                                         steps: Any) -> None:
    process = steps.process("pay-out", [step("pay", "issue_refund", args={
        "order_id": "ORD-1042", "amount": "$input.amount"})])
    run = steps.start(process, {"amount": 5000})
    steps.drain()
    run.refresh_from_db()
    assert run.status == "waiting"
    assert "tool.called" not in _kinds(run)
    request = ApprovalRequest.objects.get(run_id=run.pk)
    assert request.reason == "sensitive_action"
    assert request.policy_version.policy.slug == "refund-over-1000"
    assert request.required_approvals == 2
    assert request.requested_by == "process:pay-out"

    from approvals import services as approvals

    for name in ("reviewer", "reviewer2"):
        approvals.request_decide(request_id=request.pk, user=User.objects.get(username=name),
                                 decision="approve")
    steps.drain()
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    (called,) = _events(run, "tool.called")
    assert called["arguments"] == {"order_id": "ORD-1042", "amount": 5000}


@pytest.mark.django_db(transaction=True)
def test_plan_steps_count_against_quotas_and_budgets(demo: None, steps: Any) -> None:
    steps.tool("t_quota", lambda: {"ok": True}, quota_per_run=1)
    steps.tool("t_costly", lambda: {"ok": True}, cost="0.50")
    quota = steps.process("quota", [step("a", "t_quota"), step("b", "t_quota",
                                                                depends_on=["a"])])
    run = steps.start(quota)
    steps.drain()
    run.refresh_from_db()
    assert run.status == "waiting"
    assert ApprovalRequest.objects.get(run_id=run.pk).reason == "quota_exhausted"
    assert len(_events(run, "tool.called")) == 1

    costly = steps.process("costly", [step("a", "t_costly")], budgets={"cost": "0.25"})
    run = steps.start(costly)
    steps.drain()
    run.refresh_from_db()
    assert run.status == "waiting"
    assert ApprovalRequest.objects.get(run_id=run.pk).reason == "budget_exhausted"
    assert run.cost == 0 and run.reserved_cost == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not TEST_CRM_SECRET, reason="needs the test credential")
def test_a_plan_step_result_is_redacted(demo: None, steps: Any, settings: Any) -> None:
    settings.SWITCHBOARD_CREDENTIALS = {**settings.SWITCHBOARD_CREDENTIALS,
                                        "crm": TEST_CRM_SECRET}
    steps.tool("t_leak", lambda: {"echo": f"key={TEST_CRM_SECRET}"})
    run = steps.start(steps.process("leak", [step("a", "t_leak")]))
    steps.drain()
    run.refresh_from_db()
    assert run.status == "succeeded"
    texts = [str(d) for d in Event.objects.filter(chain=run.pk).values_list("data", flat=True)]
    assert not any(TEST_CRM_SECRET in t for t in texts)
    assert TEST_CRM_SECRET not in str(run.result)


# ---- stop means stop ------------------------------------------------------------------------


class Slow:
    """A tool that runs until cancelled (or 30 s), recording that it was told to stop."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def __call__(self, *, cancel: threading.Event) -> dict[str, Any]:
        self.started.set()
        if cancel.wait(30):
            self.cancelled.set()
        return {"done": True}


def _in_background(fn: Any) -> threading.Thread:
    from django.db import connection

    def run() -> None:
        try:
            fn()
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("signal", ["cancel", "kill_switch", "revoke"])
def test_a_stop_signal_interrupts_a_call_in_flight(demo: None, steps: Any, signal: str) -> None:
    slow = Slow()
    steps.tool("t_slow", slow, timeout_s=60)
    process = steps.process("slow", [step("a", "t_slow")])
    run = steps.start(process)
    worker = _in_background(steps.drain)
    assert slow.started.wait(10)
    stopped_at = time.monotonic()
    if signal == "cancel":
        services.run_cancel(run=run, user=User.objects.get(username="operator"))
    elif signal == "kill_switch":
        kill_switches.kill_switch_engage(scope="tool", target="t_slow", reason="incident 42",
                                    by=User.objects.get(username="admin"))
    else:
        grants.tool_revoke(tool=Tool.objects.get(slug="t_slow"), process=process, by=None)
    assert slow.cancelled.wait(10), "the call was not told to stop"
    worker.join(20)
    assert not worker.is_alive()
    assert time.monotonic() - stopped_at < 5
    task = Task.objects.get(run=run, key="a")
    (interrupted,) = _events(run, "tool.interrupted")
    assert "tool.called" not in _kinds(run)
    if signal == "cancel":
        assert task.status == "cancelled"
        assert Run.objects.get(pk=run.pk).status == "cancelled"
    elif signal == "kill_switch":
        assert task.status == "waiting"
        assert task.error.startswith("paused: kill switch on tool t_slow: incident 42")
        assert interrupted["stopped"] is True
    else:
        assert task.status == "failed"
        assert "lost its grant" in task.error


@pytest.mark.django_db(transaction=True)
def test_a_kill_switch_parks_work_at_the_gate_until_released(demo: None, steps: Any) -> None:
    calls: list[int] = []
    steps.tool("t_ok", lambda: calls.append(1) or {"ok": True})
    process = steps.process("switched", [step("a", "t_ok")])
    admin = User.objects.get(username="admin")
    switch = kill_switches.kill_switch_engage(scope="all", reason="maintenance", by=admin)
    run = steps.start(process)
    steps.drain()
    run.refresh_from_db()
    assert run.status == "waiting"
    assert calls == []
    assert Task.objects.get(run=run, key="a").error == (
        "paused: kill switch on everything: maintenance")
    assert not ApprovalRequest.objects.filter(run_id=run.pk).exists()

    config = list(Event.objects.filter(kind__startswith="config.kill_switch")
                  .values_list("kind", flat=True))
    assert config == ["config.kill_switch.engaged"]
    assert kill_switches.kill_switch_release(switch=switch, by=admin) == 1
    steps.drain()
    assert Run.objects.get(pk=run.pk).status == "succeeded"
    assert calls == [1]
    assert KillSwitch.objects.get(pk=switch.pk).released_by == admin

    from orchestration.replay import replay

    result = replay(Run.objects.get(pk=run.pk))
    assert result.ok, result.summary()


@pytest.mark.django_db
def test_a_kill_switch_must_name_something_that_exists(demo: None) -> None:
    with pytest.raises(services.ServiceError, match="no agent named 'nobody'"):
        kill_switches.kill_switch_engage(scope="agent", target="nobody", reason="x", by=None)


@pytest.mark.django_db(transaction=True)
def test_a_timed_out_non_idempotent_call_escalates_and_is_never_repeated(demo: None,
                                                                         steps: Any) -> None:
    calls: list[int] = []

    def pay(*, cancel: threading.Event) -> dict[str, Any]:
        calls.append(1)
        cancel.wait(5)
        return {"paid": True}

    steps.tool("t_pay", pay, idempotent=False, timeout_s=0.3)
    run = steps.start(steps.process("pay", [step("a", "t_pay")]))
    steps.drain()
    run.refresh_from_db()
    assert run.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=run.pk)
    assert request.reason == "unknown_outcome"
    kinds = _kinds(run)
    assert "tool.failed" not in kinds and "tool.interrupted" in kinds
    # Nothing repeats it: a second delivery of the task still waits for the person.
    Task.objects.filter(run=run, key="a").update(status="queued")
    work.execute(str(run.pk), "a")
    assert calls == [1]


# ---- agents: stops before every model call, broken configuration -------------------------------


def _agent_process(slug: str, agent: Agent) -> Process:
    process = Process.objects.create(slug=slug, name=slug, pattern="agent_workflow")
    services.process_publish(process=process, input_schema=OBJECT, plan={"tasks": [
        {"key": "work", "executor": {"type": "agent", "ref": agent.slug}}]})
    assign_perm("orchestration.start_run", User.objects.get(username="operator"), process)
    return process


def _agent(slug: str, script: list[Any], tools: list[str], **fields: Any) -> Agent:
    user = User.objects.create(username=f"agent-{slug}")
    agent = Agent.objects.create(slug=slug, name=slug, user=user, provider="scripted",
                                 model_name="scripted-demo", model_params={"script": script},
                                 **fields)
    for tool in tools:
        assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug=tool))
    return agent


@pytest.mark.django_db(transaction=True)
def test_an_agent_stops_before_its_next_model_call_when_retired(demo: None,
                                                                steps: Any) -> None:
    slow = Slow()
    steps.tool("t_wait", slow, timeout_s=60)
    agent = _agent("stopper", [{"tool_calls": [{"name": "t_wait", "arguments": {}}]},
                               {"text": "done"}], ["t_wait"])
    run = steps.start(_agent_process("stopper", agent))
    worker = _in_background(steps.drain)
    assert slow.started.wait(10)
    grants.agent_retire(agent=agent, by=User.objects.get(username="admin"))
    worker.join(20)
    assert slow.cancelled.is_set()
    run.refresh_from_db()
    assert run.status == "waiting"
    assert _kinds(run).count("model.called") == 1  # no model call after the retirement
    assert ApprovalRequest.objects.filter(run_id=run.pk, reason="agent_retired").exists()


@pytest.mark.django_db(transaction=True)
def test_one_broken_tool_fails_only_the_calls_to_it(demo: None, steps: Any) -> None:
    Tool.objects.filter(slug="lookup_refund_policy").update(input_schema={"type": "bogus"})
    ok = _agent("reader", [{"tool_calls": [{"name": "lookup_order",
                                            "arguments": {"order_id": "ORD-1042"}}]},
                           {"text": "found it"}], ["lookup_order"])
    run = steps.start(_agent_process("reader", ok))
    steps.drain()
    assert Run.objects.get(pk=run.pk).status == "succeeded"

    broken = _agent("policy-reader", [{"tool_calls": [{"name": "lookup_refund_policy",
                                                       "arguments": {"reason": "damaged"}}]},
                                      {"text": "x"}], ["lookup_refund_policy"])
    run = steps.start(_agent_process("policy-reader", broken))
    steps.drain()
    run.refresh_from_db()
    assert run.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=run.pk)
    assert request.reason == "configuration_error"
    assert "lookup_refund_policy" in request.detail and "JSON Schema" in request.detail


@pytest.mark.django_db(transaction=True)
def test_bad_model_parameters_escalate_instead_of_crashing(demo: None, steps: Any) -> None:
    agent = _agent("misconfigured", [{"text": "x"}], [])
    Agent.objects.filter(pk=agent.pk).update(model_params=[1])
    run = steps.start(_agent_process("misconfigured", agent))
    steps.drain()
    run.refresh_from_db()
    assert run.status == "waiting"
    assert ApprovalRequest.objects.get(run_id=run.pk).reason == "configuration_error"


def test_revoking_a_grant_is_seen_by_the_next_check(db: Any) -> None:
    """The grant check reads the database each time (no cache that could outlive a revoke)."""
    from orchestration.precheck import grant_checker

    user = User.objects.create(username="agent-x")
    tool = Tool.objects.create(slug="t_x", name="x", implementation="t_x", input_schema=OBJECT)
    holds = grant_checker(user.pk)
    assert not holds(tool)
    assign_perm("orchestration.invoke_tool", user, tool)
    assert holds(tool)
    remove_perm("orchestration.invoke_tool", user, tool)
    assert not holds(tool)


@pytest.mark.django_db
def test_admins_engage_and_release_kill_switches_and_everyone_sees_them(
        client: Any, demo: None) -> None:
    admin = User.objects.get(username="admin")
    client.force_login(admin)
    answer = client.post("/admin/orchestration/killswitch/add/",
                         {"scope": "agent", "target": "refund-executor",
                          "reason": "refunds <b>paused</b>"})
    assert answer.status_code == 302, answer.content
    switch = KillSwitch.objects.get()
    assert switch.engaged_by == admin and switch.engaged
    assert Event.objects.filter(kind="config.kill_switch.engaged").count() == 1
    assert client.post("/admin/orchestration/killswitch/add/", {
        "scope": "tool", "target": "no-such-tool", "reason": "x"}).status_code == 200
    assert KillSwitch.objects.count() == 1
    assert client.post(f"/admin/orchestration/killswitch/{switch.pk}/delete/").status_code == 403

    client.force_login(User.objects.get(username="operator"))
    page = client.get("/").content.decode()
    assert "kill switch on agent refund-executor" in page
    assert "refunds &lt;b&gt;paused&lt;/b&gt;" in page  # the reason is escaped

    client.force_login(admin)
    client.post("/admin/orchestration/killswitch/", {
        "action": "release", "_selected_action": [str(switch.pk)]})
    assert not KillSwitch.objects.get().engaged
    assert "kill switch on" not in client.get("/").content.decode()


@pytest.mark.django_db(transaction=True)
def test_a_plan_step_on_a_tool_the_admin_could_not_have_saved_escalates(demo: None,
                                                                        steps: Any) -> None:
    """Rows written around the admin's checks (a script, a migration) meet the same checks at
    run time: a rate limit that does not parse makes the call wait for a person."""
    calls: list[int] = []
    steps.tool("t_limited", lambda: calls.append(1) or {"ok": True})
    Tool.objects.filter(slug="t_limited").update(rate_limit="banana")
    run = steps.start(steps.process("limited", [step("a", "t_limited")]))
    steps.drain()
    run.refresh_from_db()
    assert run.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=run.pk)
    assert request.reason == "configuration_error"
    assert "rate_limit" in request.detail
    assert calls == []


@pytest.mark.django_db
def test_a_service_identity_never_takes_over_an_existing_account(demo: None) -> None:
    person = User.objects.create_user(username="process-payroll", password="a-real-password")
    process = Process.objects.create(slug="payroll", name="Payroll", pattern="deterministic")
    services.process_publish(process=process, input_schema=OBJECT,
                             plan={"tasks": [step("a", "lookup_order")]})
    process.refresh_from_db()
    assert process.service_user != person
    assert process.service_user.username.startswith("process-payroll-")
    person.refresh_from_db()
    assert person.has_usable_password()


@pytest.mark.django_db(transaction=True)
def test_an_ungranted_call_to_a_broken_tool_is_refused_not_escalated(demo: None,
                                                                     steps: Any) -> None:
    steps.tool("t_broken", lambda: {"ok": True})
    Tool.objects.filter(slug="t_broken").update(input_schema=[1, 2])
    run = steps.start(steps.process("broken", [step("a", "t_broken")], grant=False))
    steps.drain()
    run.refresh_from_db()
    assert run.status == "failed" and "not granted" in run.error
    assert not ApprovalRequest.objects.filter(run_id=run.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_releasing_one_switch_leaves_work_another_still_holds(demo: None, steps: Any) -> None:
    steps.tool("t_held", lambda: {"ok": True})
    process = steps.process("held", [step("a", "t_held")])
    admin = User.objects.get(username="admin")
    everything = kill_switches.kill_switch_engage(scope="all", reason="freeze", by=admin)
    run = steps.start(process)
    steps.drain()
    tool = kill_switches.kill_switch_engage(scope="tool", target="t_held", reason="bad", by=admin)
    assert kill_switches.kill_switch_release(switch=tool, by=admin) == 0
    assert Task.objects.get(run=run, key="a").error.startswith("paused: kill switch on "
                                                                 "everything")
    assert kill_switches.resume_unpaused() == 0  # the sweep agrees: still held
    assert kill_switches.kill_switch_release(switch=everything, by=admin) == 1
    steps.drain()
    assert Run.objects.get(pk=run.pk).status == "succeeded"
