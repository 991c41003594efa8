"""Delegation between agents (the autonomous front end): a handoff call adds a task for the
callee, run under its own identity and grants with a budget carved from the caller's; the
caller waits without holding a hydration slot and gets the callee's envelope back; calls
beyond the process's depth and fan-out limits are refused and the agent is told why; replay
re-derives all of it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.test import Client
from guardian.shortcuts import assign_perm

from audit import ledger
from audit.models import Event
from orchestration import services
from orchestration.engine.delegation import child_spec
from orchestration.models import Agent, Process, Run, Task, Tool
from orchestration.plans import plan_of
from orchestration.replay import replay
from orchestration.store import DjangoRunStore
from tests.conftest import wait_for_run

INQUIRY = {"customer_email": "kim@example.com", "order_id": "ORD-1042",
           "message": "Where is my order?"}


def kinds(run: Run, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in Event.objects.filter(chain=run.pk, kind=kind).order_by("seq")]


@pytest.mark.django_db(transaction=True)
def test_the_front_desk_delegates_the_lookup_and_answers_from_the_handoff(
        runner: None, api: Any) -> None:
    created = api.post("/api/v1/runs", {"process": "customer-inquiry", "input": INQUIRY})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"])
    assert run.status == "succeeded", run.error

    [delegated] = kinds(run, "task.delegated")
    assert delegated["task"] == "answer" and delegated["agent"] == "order-desk"
    assert delegated["child"] == "answer_d1" and delegated["depth"] == 1
    child = Task.objects.get(run=run, key="answer_d1")
    assert child.status == "succeeded" and child.executor_ref == "order-desk"
    # The callee works under its own identity: only it looked the order up (the front desk
    # holds no grant on lookup_order), and the front desk wrote the email.
    called = kinds(run, "tool.called")
    assert {(c["tool"], c["actor"]) for c in called} >= {
        ("lookup_order", "agent:order-desk"), ("send_customer_email", "agent:frontdesk"),
        ("delegate_to_order-desk", "agent:frontdesk")}
    handoff = next(c for c in called if c["tool"] == "delegate_to_order-desk")
    assert handoff["result"]["key_facts"] == {"order_id": "ORD-1042", "status": "delivered"}
    assert 'status = "delivered"' in handoff["result"]["envelope"]
    email = next(c for c in called if c["tool"] == "send_customer_email")
    assert email["arguments"]["body"] == "Your order ORD-1042 is delivered."
    # The caller waited on its delegate, then ran again; its budget was carved and what the
    # callee did not spend came back: the caller's cap is down by exactly what it used.
    answer = Task.objects.get(run=run, key="answer")
    assert answer.error == "" and answer.attempts == 2
    requeued = [d for d in kinds(run, "task.requeued") if d["task"] == "answer"]
    assert requeued == [{"task": "answer", "reason": "its delegated tasks ended"}]
    assert 0 < delegated["budget"]["tokens"] < 8000
    assert answer.budget_tokens == 8000 - child.used_tokens and child.used_tokens > 0
    # The delegated task is part of the run's plan (API and run page read it from there).
    body = api.get(f"/api/v1/runs/{run.pk}").json()
    keys = [t["key"] for t in body["plan"]["plan"]["tasks"]]
    assert keys == ["classify", "answer", "answer_d1"]
    assert body["plan"]["plan"]["tasks"][2]["delegated_by"] == "answer"
    client = Client()
    client.force_login(User.objects.get(username="operator"))
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="plan-node-answer_d1"' in page and "plan-delegation" in page

    result = replay(Run.objects.get(pk=run.pk))
    assert result.ok, result.summary()


def _agent(slug: str, script: list[dict[str, Any]], tools: tuple[str, ...] = ()) -> Agent:
    user = User.objects.create(username=f"agent-{slug}")
    agent = Agent.objects.create(slug=slug, name=slug, user=user, provider="scripted",
                                 model_name="scripted-demo", model_params={"script": script})
    for tool in tools:
        assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug=tool))
    return agent


def _answer(text: str, **facts: str) -> dict[str, Any]:
    lines = "".join(f'{k} = "{v}"\n' for k, v in facts.items())
    return {"text": f'{text}\n```toml\nsummary = "{text}"\n\n[key_facts]\n{lines}```',
            "tokens_in": 100, "tokens_out": 20}


@pytest.fixture
def limited(runner: None, demo: None) -> Process:
    """A lead that may delegate to a helper, a sub-helper and a missing agent, at most two
    tasks, one level deep."""
    _agent("lead", [
        {"tool_calls": [
            {"name": "delegate_to_helper", "arguments": {"task": "Find fact A."}},
            {"name": "delegate_to_ghost", "arguments": {"task": "Find fact B."}},
            {"name": "delegate_to_helper", "arguments": {"task": "Find fact C."}},
            {"name": "delegate_to_stranger", "arguments": {"task": "Find fact D."}},
        ], "tokens_in": 100, "tokens_out": 40},
        _answer("Lead is done."),
    ])
    _agent("helper", [
        {"tool_calls": [{"name": "delegate_to_sub", "arguments": {"task": "Go deeper."}}],
         "tokens_in": 80, "tokens_out": 10},
        _answer("Fact A found.", fact="A"),
    ])
    _agent("sub", [_answer("Sub never runs.")])
    process = Process.objects.create(slug="delegating", name="Delegating",
                                     pattern=Process.Pattern.AUTONOMOUS_FRONTEND)
    services.process_publish(process=process, input_schema={"type": "object"}, plan={
        "tasks": [{"key": "lead", "executor": {"type": "agent", "ref": "lead"},
                   "delegates": ["helper", "sub", "ghost"]}],
        "delegation": {"max_depth": 1, "max_fan_out": 2},
    })
    return process


@pytest.mark.django_db(transaction=True)
def test_delegation_beyond_the_limits_is_refused_and_the_agent_is_told(
        limited: Process, api: Any) -> None:
    run = services.run_create(process=limited, input={},
                              user=User.objects.get(username="operator"))
    run = wait_for_run(run.pk)
    assert run.status == "succeeded", run.error

    # (by the call's index in its turn, and the task that made it)
    refused = {f'{d["idempotency_key"].rsplit(":", 1)[1]}@{d["task"]}': d["error"]
               for d in kinds(run, "delegation.refused")}
    # The lead's third handoff is over the fan-out limit; its fourth names an agent it may
    # not delegate to; the helper, one level deep already, may not delegate again.
    assert "fan-out limit is 2" in refused["2@lead"], refused
    assert "may not delegate to 'stranger'" in refused["3@lead"], refused
    assert "depth limit is 1" in refused["0@lead_d1"], refused
    # The missing agent's task failed; the lead was told and went on: a delegated task's
    # failure is its caller's to handle, not the run's.
    tasks = {t.key: t for t in Task.objects.filter(run=run)}
    assert set(tasks) == {"lead", "lead_d1", "lead_d2"}
    assert tasks["lead_d2"].status == "failed" and "ghost" in tasks["lead_d2"].error
    failed = [d for d in kinds(run, "tool.failed") if d["task"] == "lead"]
    assert len(failed) == 1 and "lead_d2 (ghost) failed" in failed[0]["error"]
    assert "Lead is done." in tasks["lead"].output["handoff"]
    # What the helper handed back reached the lead.
    [handoff] = [d for d in kinds(run, "tool.called") if d["task"] == "lead"]
    assert handoff["result"]["key_facts"] == {"fact": "A"}

    result = replay(Run.objects.get(pk=run.pk))
    assert result.ok, result.summary()


@pytest.mark.django_db(transaction=True)
def test_a_handoff_delegates_once_however_often_its_worker_retries(limited: Process) -> None:
    """A worker lost after delegating runs the call again: it finds the task it delegated
    instead of adding a second one, and the caller's budget is carved once."""
    run = Run.objects.create(process_version=limited.current_version, input={},
                             created_by=User.objects.get(username="operator"))
    Task.objects.create(run=run, key="lead", executor_type="agent", executor_ref="lead",
                        budget_tokens=1000)
    with transaction.atomic():
        ledger.append(run.pk, "run.created", {"input": {}}, actor="system")
    store = DjangoRunStore()
    plan = plan_of(run)
    lead = plan.by_key()["lead"]
    spec = child_spec(plan, lead, "helper", {"task": "Find fact A."}, f"{run.pk}:lead:1:0")
    first = store.delegate(str(run.pk), "lead", spec, {"tokens": 300})
    again = store.delegate(str(run.pk), "lead", spec, {"tokens": 300})
    assert first.key == again.key == "lead_d1"
    assert Task.objects.filter(run=run).count() == 2
    assert Task.objects.get(run=run, key="lead").budget_tokens == 700
    assert Task.objects.get(run=run, key="lead_d1").budget_tokens == 300
    assert len(kinds(run, "task.delegated")) == 1
    plan, made = store.delegations(str(run.pk), "lead")
    assert list(made) == [f"{run.pk}:lead:1:0"] and made[f"{run.pk}:lead:1:0"].key == "lead_d1"
    assert Run.objects.get(pk=run.pk).plan_version == 1
    assert Decimal(0) == Task.objects.get(run=run, key="lead").used_cost


def test_a_handoff_asking_for_more_tokens_than_a_budget_can_hold_is_refused() -> None:
    from orchestration.engine.delegation import MAX_TOKENS, refusal
    from orchestration.engine.plan import parse_plan

    plan = parse_plan({"tasks": [{"key": "lead", "executor": {"type": "agent", "ref": "lead"},
                                  "delegates": ["helper"]}]})
    lead = plan.by_key()["lead"]
    assert refusal(plan, lead, "helper", {"task": "x", "tokens": MAX_TOKENS}) == ""
    why = refusal(plan, lead, "helper", {"task": "x", "tokens": 10 ** 20})
    assert why.startswith("delegation refused: the arguments are invalid at tokens")


@pytest.mark.django_db(transaction=True)
def test_concurrent_runs_each_delegate_once_and_finish(runner: None, api: Any) -> None:
    """Six front-desk runs at once: each delegates exactly one lookup, every caller is woken,
    and each run replays as it ran."""
    ids = []
    for n in range(6):
        created = api.post("/api/v1/runs", {"process": "customer-inquiry",
                                            "input": {**INQUIRY, "order_id": f"ORD-20{n}"}})
        assert created.status_code == 201, created.content
        ids.append(created.json()["id"])
    for run_id in ids:
        run = wait_for_run(run_id, timeout=120)
        assert run.status == "succeeded", run.error
        assert [d["child"] for d in kinds(run, "task.delegated")] == ["answer_d1"]
        assert Task.objects.filter(run=run).count() == 3
        result = replay(Run.objects.get(pk=run.pk))
        assert result.ok, result.summary()
