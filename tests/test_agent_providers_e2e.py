"""Agent runs whose model is a real provider client (OpenAI or Anthropic SDK) talking to a
loopback model server: tool use, ledger, usage and cost, and a failing provider."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from guardian.shortcuts import assign_perm

from audit.models import Event
from orchestration import services
from orchestration.models import Agent, ModelPrice, Process, Run, Task, Tool
from tests.conftest import TEST_LLM_SECRET, wait_for_run
from tests.loopback import ANTHROPIC_PATH, OPENAI_PATH, Loopback, Reply

PROVIDERS = ["openai", "anthropic"]
MODEL = {"openai": "gpt-loopback", "anthropic": "claude-loopback"}
PATH = {"openai": OPENAI_PATH, "anthropic": ANTHROPIC_PATH}
NAME = {"openai": "OpenAI-compatible endpoint", "anthropic": "Anthropic endpoint"}
CREDENTIALS = {"llm": TEST_LLM_SECRET}


@pytest.fixture
def server() -> Iterator[Loopback]:
    with Loopback() as loopback:
        yield loopback


def provider_process(provider: str, server: Loopback) -> Process:
    """A one-task process run by an agent on ``provider``, granted ``lookup_order``."""
    slug = f"{provider}-clerk"
    user = User.objects.create(username=f"agent-{slug}")
    agent = Agent.objects.create(
        slug=slug, name=slug, user=user, provider=provider, model_name=MODEL[provider],
        instructions="You look up orders.", credential_ref="llm",
        model_params={"base_url": server.base_url(provider), "timeout_s": 5, "max_retries": 0})
    ModelPrice.objects.create(provider=provider, model_name=MODEL[provider],
                              input_per_mtok=Decimal("3"), output_per_mtok=Decimal("15"))
    assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug="lookup_order"))
    process = Process.objects.create(slug=f"{provider}-orders", name=slug,
                                     pattern="agent_workflow")
    services.process_publish(
        process=process, input_schema={"type": "object"},
        plan={"tasks": [{"key": "work", "title": "Look up the order",
                         "executor": {"type": "agent", "ref": agent.slug}}]})
    return process


def start_and_wait(process: Process, operator: User) -> Run:
    with override_settings(SWITCHBOARD_CREDENTIALS=CREDENTIALS):
        run = services.run_create(process=process, input={"order_id": "ORD-1042"},
                                  user=operator)
        return wait_for_run(run.pk, timeout=30)


def tool_result_sent(provider: str, body: dict[str, Any]) -> tuple[str, Any]:
    """(tool call id, parsed result) of the tool result in a model request."""
    last = body["messages"][-1]
    if provider == "openai":
        assert last["role"] == "tool"
        return last["tool_call_id"], json.loads(last["content"])
    assert last["role"] == "user"
    [block] = last["content"]
    assert block["type"] == "tool_result" and block["is_error"] is False
    return block["tool_use_id"], json.loads(block["content"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_it_runs_an_agent_on_a_real_provider_client_with_tools_usage_and_cost(
    runner: None, operator: User, server: Loopback, provider: str
) -> None:
    server.script(
        Reply.turn(calls=[("lookup_order", {"order_id": "ORD-1042"})],
                   tokens_in=120, tokens_out=30),
        Reply.turn("ORD-1042 was delivered.", tokens_in=200, tokens_out=40),
    )
    run = start_and_wait(provider_process(provider, server), operator)

    assert run.status == "succeeded", run.error
    assert len(server.requests) == 2
    first, second = server.requests
    assert {first.path, second.path} == {PATH[provider]}
    assert first.body["model"] == MODEL[provider]
    assert first.bearer == TEST_LLM_SECRET
    tools = first.body["tools"]
    names = {t["function"]["name"] if provider == "openai" else t["name"] for t in tools}
    assert "lookup_order" in names

    called = Event.objects.get(chain=run.pk, kind="tool.called")
    assert called.data["tool"] == "lookup_order"
    assert called.data["arguments"] == {"order_id": "ORD-1042"}
    call_id, result = tool_result_sent(provider, second.body)
    assert result == called.data["result"] and result["order_id"] == "ORD-1042"
    prefix = "call_1_" if provider == "openai" else "toolu_1_"
    assert call_id == f"{prefix}0"

    model_calls = list(Event.objects.filter(chain=run.pk, kind="model.called").order_by("seq"))
    assert [(e.data["provider"], e.data["model"]) for e in model_calls] == [
        (provider, MODEL[provider])] * 2
    assert [(e.data["tokens_in"], e.data["tokens_out"]) for e in model_calls] == [
        (120, 30), (200, 40)]
    assert run.tokens_in == 320 and run.tokens_out == 70
    assert run.cost == Decimal("0.002010")  # (3 × 320 + 15 × 70) / 1e6
    assert run.result["work"]["answer"] == "ORD-1042 was delivered."
    bodies = "".join(Event.objects.filter(chain=run.pk).values_list("body", flat=True))
    assert TEST_LLM_SECRET not in bodies


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_it_fails_the_task_when_the_provider_answers_a_server_error(
    runner: None, operator: User, server: Loopback, provider: str
) -> None:
    server.script(*[Reply.error(500, "model backend down")] * 3)
    run = start_and_wait(provider_process(provider, server), operator)

    assert run.status == "failed"
    assert run.error.startswith(f"work: {NAME[provider]} answered HTTP 500")
    assert "model backend down" in run.error
    assert len(server.requests) == 1
    task = Task.objects.get(run=run, key="work")
    assert task.status == "failed" and "HTTP 500" in task.error
    failed = Event.objects.get(chain=run.pk, kind="model.failed")
    assert failed.data["provider"] == provider and "HTTP 500" in failed.data["error"]
    assert not Event.objects.filter(chain=run.pk, kind="model.called").exists()
