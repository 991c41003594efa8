"""Agent tasks through Django: demo processes offline, waiting states, grants, secrets, resume."""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from guardian.shortcuts import assign_perm, remove_perm

from audit.models import Event
from orchestration import services
from orchestration.engine.agent import AgentSpec, run_agent
from orchestration.engine.gate import StoreLog
from orchestration.engine.llm import ModelRequest, ModelResponse, ScriptedModel
from orchestration.engine.runner import TaskContext
from orchestration.models import Agent, Process, Run, Task, Tool
from orchestration.plans import plan_for
from orchestration.store import DjangoRunStore
from orchestration.tooling import contract_for
from tests.conftest import TEST_CRM_SECRET, wait_for_run

REFUND = {"order_id": "ORD-1042", "amount": 40, "reason": "damaged",
          "customer_email": "kim@example.com"}
INQUIRY = {"customer_email": "kim@example.com", "order_id": "ORD-1042",
           "message": "Where is my order?"}


def make_agent(slug: str, script: list[dict[str, Any]], tools: list[str],
               step_budget: int = 5) -> Agent:
    user = User.objects.create(username=f"agent-{slug}")
    agent = Agent.objects.create(slug=slug, name=slug, user=user, provider="scripted",
                                 model_name="scripted-demo", model_params={"script": script},
                                 step_budget=step_budget)
    for tool in tools:
        assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug=tool))
    return agent


def held(run_id: Any) -> list[tuple[Any, ...]]:
    """What the run and its tasks still hold reserved: (tokens, cost, steps) of each that does."""
    rows = [Run.objects.values_list("reserved_tokens", "reserved_cost", "reserved_steps")
            .get(pk=run_id)]
    rows += Task.objects.filter(run_id=run_id).values_list("reserved_tokens", "reserved_cost",
                                                           "reserved_steps")
    return [row for row in rows if any(row)]


def one_task_process(slug: str, agent: Agent) -> Process:
    process = Process.objects.create(slug=slug, name=slug, pattern="agent_workflow")
    services.process_publish(process=process, input_schema={"type": "object"},
                             plan={"tasks": [{"key": "work", "title": "Work",
                                              "executor": {"type": "agent", "ref": agent.slug}}]})
    return process


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("slug, data, model_calls, tool_calls", [
    ("refund-exception", REFUND, 6, 4),
    ("customer-inquiry", INQUIRY, 5, 5),  # its front desk also searches the refund policy
])
def test_it_runs_the_agent_demo_processes_offline_with_usage_and_cost(
    runner: None, api: Any, slug: str, data: dict, model_calls: int, tool_calls: int
) -> None:
    created = api.post("/api/v1/runs", {"process": slug, "input": data})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"])
    assert run.status == "succeeded", run.error

    body = api.get(f"/api/v1/runs/{run.pk}").json()
    # The agents' turns, and the auditor's checks of answers (counted like model calls).
    calls = list(Event.objects.filter(chain=run.pk, kind__in=["model.called", "qc.checked"]))
    assert sum(e.kind == "model.called" for e in calls) == model_calls
    assert body["usage"]["tokens_in"] == sum(e.data["tokens_in"] for e in calls) > 0
    assert body["usage"]["tokens_out"] == sum(e.data["tokens_out"] for e in calls) > 0
    per_step = sum(Decimal(e.data["cost"]) for e in calls)
    assert per_step > 0 and Decimal(body["usage"]["cost"]) == per_step
    expected = sum((Decimal(3) * e.data["tokens_in"] + Decimal(15) * e.data["tokens_out"])
                   for e in calls) / Decimal(1_000_000)
    assert per_step == expected.quantize(Decimal("0.000001"))
    assert body["usage"]["tool_calls"] == tool_calls
    assert body["result"]["message_id"].startswith("MAIL-")
    assert all(e.actor.startswith("agent:") for e in calls)
    assert held(run.pk) == []


@pytest.mark.django_db(transaction=True)
def test_it_parks_a_run_whose_agent_spends_its_step_budget(runner: None, api: Any) -> None:
    agent = make_agent("looper", [{"tool_calls": [{"name": "lookup_order",
                                                   "arguments": {"order_id": f"ORD-{i}"}}]}
                                  for i in range(8)], ["lookup_order"], step_budget=5)
    one_task_process("loop", agent)
    from guardian.shortcuts import assign_perm as grant

    grant("orchestration.start_run", User.objects.get(username="operator"),
          Process.objects.get(slug="loop"))
    run_id = api.post("/api/v1/runs", {"process": "loop", "input": {}}).json()["id"]
    run = wait_for_run(run_id)
    assert run.status == "waiting"
    body = api.get(f"/api/v1/runs/{run_id}").json()
    assert body["status"] == "waiting"
    assert body["waiting_on"][0]["task"] == "work"
    assert body["waiting_on"][0]["reason"].startswith("step_budget_exhausted")
    assert body["usage"]["steps"] == 5
    kinds = list(Event.objects.filter(chain=run_id).values_list("kind", flat=True))
    assert "task.waiting" in kinds and kinds.count("model.called") == 5
    assert held(run_id) == []


def _task_ctx(run: Run) -> TaskContext:
    spec = plan_for(run.process_version).by_key()["work"]
    return TaskContext(run_id=str(run.pk), spec=spec, attempt=1, run_input=run.input,
                       dep_outputs={})


@pytest.mark.django_db
def test_it_refuses_and_records_a_revoked_grant(demo: None, operator: User) -> None:
    agent = make_agent("revoked", [
        {"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "ORD-1"}}]},
        {"text": "done"}], ["lookup_order"])
    process = one_task_process("revoked", agent)
    run = services.run_create(process=process, input={}, user=operator)
    remove_perm("orchestration.invoke_tool", agent.user, Tool.objects.get(slug="lookup_order"))

    from orchestration.agents import run_agent_task

    outcome = run_agent_task(_task_ctx(run))
    assert outcome.status == "succeeded"
    refused = Event.objects.get(chain=run.pk, kind="tool.refused")
    assert refused.actor == "agent:revoked" and "not granted" in refused.data["error"]
    assert not Event.objects.filter(chain=run.pk, kind="tool.called").exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("ending, status", [
    ("answer", "succeeded"), ("revoked", "succeeded"), ("step_budget", "waiting"),
    ("token_budget", "waiting"), ("cancelled", "cancelled"), ("approval", "waiting")])
def test_what_a_record_reserved_ahead_is_given_back_when_its_call_does_not_come(
        demo: None, operator: User, monkeypatch: pytest.MonkeyPatch, ending: str,
        status: str) -> None:
    """A call's record reserves the next call's worst case in its own transaction. Whatever the
    loop does next (a refusal, a budget, a cancellation, a policy that waits on people), the
    run and its task hold nothing once the loop has ended."""
    from approvals.models import Policy
    from approvals.services import policy_publish
    from orchestration import dispatch
    from orchestration.agents import run_agent_task
    from orchestration.builtin_tools import registry

    monkeypatch.setattr(dispatch, "send", lambda *args, **kwargs: None)
    # A tool call reserves its cost (an agent's calls are part of its model turn's step).
    Tool.objects.filter(slug="lookup_order").update(cost_per_call=Decimal("0.01"))
    turns: list[dict[str, Any]] = [
        {"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": f"ORD-{i}"}},
                        {"name": "lookup_order", "arguments": {"order_id": f"ORD-{i}0"}}],
         "tokens_in": 50, "tokens_out": 5} for i in range(3)]
    agent = make_agent(f"ahead-{ending.replace('_', '-')}",
                       [*turns, {"text": "done", "tokens_in": 50, "tokens_out": 5}],
                       ["lookup_order"], step_budget=2 if ending == "step_budget" else 5)
    process = one_task_process(f"ahead-{ending.replace('_', '-')}", agent)
    run = services.run_create(process=process, input={}, user=operator)
    if ending == "token_budget":
        Agent.objects.filter(pk=agent.pk).update(token_budget=100)
    elif ending == "revoked":
        remove_perm("orchestration.invoke_tool", agent.user, Tool.objects.get(slug="lookup_order"))
    elif ending == "approval":
        template = Policy.objects.exclude(current_version=None).first().current_version
        policy_publish(policy=Policy.objects.create(slug="lookups", name="Lookups"),
                       tool="lookup_order", decider_group=template.decider_group,
                       required_approvals=1)
    elif ending == "cancelled":  # the first call's result comes back to a cancelled run
        contract = registry.get("lookup_order")
        real = contract.fn

        def cancelling(order_id: str) -> dict[str, Any]:
            Run.objects.filter(pk=run.pk).update(cancel_requested=True)
            return real(order_id)

        monkeypatch.setattr(contract, "fn", cancelling)
    outcome = run_agent_task(_task_ctx(run))
    assert outcome.status == status, outcome.error
    assert held(run.pk) == []
    called = Event.objects.filter(chain=run.pk, kind="tool.called").count()
    assert called == {"answer": 6, "revoked": 0, "step_budget": 4, "token_budget": 4,
                      "cancelled": 1, "approval": 0}[ending]


class _Crash(BaseException):
    pass


@pytest.mark.django_db
def test_it_resumes_from_the_ledger_without_calling_the_model_again(
    demo: None, operator: User
) -> None:
    script = [{"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "ORD-1"}}]},
              {"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "ORD-2"}}]},
              {"text": "done"}]
    agent = make_agent("resumer", script, ["lookup_order"])
    run = services.run_create(process=one_task_process("resume", agent), input={},
                              user=operator)
    requests: list[ModelRequest] = []

    class Flaky(ScriptedModel):
        crash_at: int | None = 3

        def complete(self, request: ModelRequest) -> ModelResponse:
            requests.append(request)
            if len(requests) == self.crash_at:
                raise _Crash()
            return super().complete(request)

    tools = {"lookup_order": contract_for(Tool.objects.get(slug="lookup_order"))}
    log = StoreLog(DjangoRunStore(), str(run.pk), "work")
    with pytest.raises(_Crash):
        run_agent(_task_ctx(run), AgentSpec("resumer"), Flaky(script), tools, log,
                  granted=lambda name: True)
    assert Event.objects.filter(chain=run.pk, kind="model.called").count() == 2

    requests.clear()
    model = Flaky(script)
    model.crash_at = None
    outcome = run_agent(_task_ctx(run), AgentSpec("resumer"), model, tools, log,
                        granted=lambda name: True)
    assert outcome.status == "succeeded"
    assert len(requests) == 1
    assert Event.objects.filter(chain=run.pk, kind="model.called").count() == 3
    assert Event.objects.filter(chain=run.pk, kind="tool.called").count() == 2


class _EchoAuth(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        reply = json.dumps({"customer": body.get("customer_id"),
                            "seen_auth": self.headers.get("Authorization", "")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.django_db(transaction=True)
def test_it_injects_credentials_at_call_time_and_never_records_them(
    runner: None, operator: User
) -> None:
    secret = TEST_CRM_SECRET
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoAuth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        Tool.objects.create(
            slug="crm_lookup", name="CRM lookup", kind=Tool.Kind.HTTP, http_method="POST",
            url_template=f"http://127.0.0.1:{server.server_port}/customers",
            credential_ref="crm", timeout_s=5,
            input_schema={"type": "object", "required": ["customer_id"],
                          "properties": {"customer_id": {"type": "string"}}},
            output_schema={"type": "object", "required": ["customer"]},
        )
        agent = make_agent("crm-reader", [
            {"tool_calls": [{"name": "crm_lookup", "arguments": {"customer_id": "C-7"}}]},
            {"text": "Customer {{last.customer}} found; auth was {{last.seen_auth}}."}],
            ["crm_lookup"])
        process = one_task_process("crm", agent)
        with override_settings(SWITCHBOARD_CREDENTIALS={"crm": secret}):
            run = services.run_create(process=process, input={}, user=operator)
            run = wait_for_run(run.pk)
        assert run.status == "succeeded", run.error
        called = Event.objects.get(chain=run.pk, kind="tool.called")
        assert called.data["result"]["seen_auth"] == "Bearer [redacted]"
        bodies = "".join(Event.objects.filter(chain=run.pk).values_list("body", flat=True))
        assert secret not in bodies
        assert "[redacted]" in bodies
        assert secret not in json.dumps(Run.objects.get(pk=run.pk).result)
    finally:
        server.shutdown()
        server.server_close()
