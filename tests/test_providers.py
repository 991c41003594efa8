"""The real model clients (official OpenAI and Anthropic SDKs) against a loopback server that
speaks each wire protocol: tool calls, usage, retries, errors and timeouts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestration.engine.llm import (
    Message,
    Model,
    ModelRequest,
    ProviderError,
    ToolCall,
    ToolSpec,
)
from orchestration.engine.providers import AnthropicModel, OpenAICompatibleModel
from tests.loopback import ANTHROPIC_PATH, OPENAI_PATH, Loopback, Reply

PROVIDERS = ["openai", "anthropic"]
API_KEY = "sk-loopback-5d1e"
MODEL = {"openai": "gpt-loopback", "anthropic": "claude-loopback"}
PATH = {"openai": OPENAI_PATH, "anthropic": ANTHROPIC_PATH}
NAME = {"openai": "OpenAI-compatible endpoint", "anthropic": "Anthropic endpoint"}
LOOKUP = ToolSpec(
    "lookup_order", "Read an order from the order system.",
    {"type": "object", "required": ["order_id"],
     "properties": {"order_id": {"type": "string"}}},
)


@pytest.fixture
def server() -> Iterator[Loopback]:
    with Loopback() as loopback:
        yield loopback


def make_model(provider: str, server: Loopback, *, timeout_s: float = 5.0,
               max_retries: int = 0) -> Model:
    """The provider's client pointed at the loopback server."""
    cls = OpenAICompatibleModel if provider == "openai" else AnthropicModel
    return cls(model=MODEL[provider], api_key=API_KEY, base_url=server.base_url(provider),
               timeout_s=timeout_s, max_retries=max_retries)


def first_request() -> ModelRequest:
    return ModelRequest(messages=[Message("system", "You handle orders."),
                                  Message("user", "What is the status of ORD-7?")],
                        tools=[LOOKUP])


def sent_tools(provider: str, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tool name → JSON schema, as the request carried them."""
    if provider == "openai":
        assert all(t["type"] == "function" for t in body["tools"])
        return {t["function"]["name"]: t["function"]["parameters"] for t in body["tools"]}
    return {t["name"]: t["input_schema"] for t in body["tools"]}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_it_parses_a_tool_call_turn_with_usage(provider: str, server: Loopback) -> None:
    server.script(Reply.turn(calls=[("lookup_order", {"order_id": "ORD-7"})],
                             tokens_in=42, tokens_out=7))
    response = make_model(provider, server).complete(first_request())

    assert response.tool_calls == [
        ToolCall(id=response.tool_calls[0].id, name="lookup_order",
                 arguments={"order_id": "ORD-7"})]
    assert response.tool_calls[0].id
    assert (response.tokens_in, response.tokens_out) == (42, 7)
    assert response.stop_reason == ("tool_calls" if provider == "openai" else "tool_use")

    [seen] = server.requests
    assert seen.path == PATH[provider]
    assert seen.body["model"] == MODEL[provider]
    assert sent_tools(provider, seen.body) == {"lookup_order": dict(LOOKUP.input_schema)}
    assert seen.bearer == API_KEY  # both installed SDKs send the key as a bearer token
    if provider == "anthropic":
        assert seen.headers["anthropic-version"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_it_sends_the_tool_result_back_in_the_providers_wire_shape(
    provider: str, server: Loopback
) -> None:
    server.script(Reply.turn(calls=[("lookup_order", {"order_id": "ORD-7"})]),
                  Reply.turn("ORD-7 was delivered.", tokens_in=60, tokens_out=9))
    model = make_model(provider, server)
    request = first_request()
    first = model.complete(request)
    [call] = first.tool_calls
    result = json.dumps({"order_id": "ORD-7", "status": "delivered"})
    followup = ModelRequest(
        messages=[*request.messages,
                  Message("assistant", first.text, tool_calls=first.tool_calls),
                  Message("tool", result, tool_call_id=call.id)],
        tools=[LOOKUP])
    final = model.complete(followup)

    assert final.text == "ORD-7 was delivered." and final.tool_calls == []
    assert (final.tokens_in, final.tokens_out) == (60, 9)
    assert len(server.requests) == 2
    messages = server.requests[1].body["messages"]
    if provider == "openai":
        assert messages[0] == {"role": "system", "content": "You handle orders."}
        assistant, tool = messages[-2:]
        [sent_call] = assistant["tool_calls"]
        assert sent_call["id"] == call.id and sent_call["type"] == "function"
        assert sent_call["function"]["name"] == "lookup_order"
        assert json.loads(sent_call["function"]["arguments"]) == {"order_id": "ORD-7"}
        assert tool == {"role": "tool", "tool_call_id": call.id, "content": result}
    else:
        assert server.requests[1].body["system"] == "You handle orders."
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[1]["content"] == [{"type": "tool_use", "id": call.id,
                                           "name": "lookup_order",
                                           "input": {"order_id": "ORD-7"}}]
        assert messages[2]["content"] == [{"type": "tool_result", "tool_use_id": call.id,
                                           "content": result, "is_error": False}]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_it_retries_a_rate_limit_and_then_succeeds(provider: str, server: Loopback) -> None:
    server.script(Reply.rate_limited(), Reply.turn("fine now", tokens_in=3, tokens_out=2))
    response = make_model(provider, server, max_retries=1).complete(first_request())

    assert response.text == "fine now"
    assert len(server.requests) == 2
    assert server.requests[0].body == server.requests[1].body


@pytest.mark.parametrize("provider", PROVIDERS)
def test_it_raises_a_provider_error_naming_the_status_of_a_server_error(
    provider: str, server: Loopback
) -> None:
    server.script(*[Reply.error(500, "upstream exploded")] * 3)
    with pytest.raises(ProviderError) as raised:
        make_model(provider, server, max_retries=0).complete(first_request())

    message = str(raised.value)
    assert message.startswith(f"{NAME[provider]} answered HTTP 500")
    assert "upstream exploded" in message
    assert len(server.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_it_does_not_retry_a_rejected_api_key(provider: str, server: Loopback) -> None:
    server.script(*[Reply.error(401, "invalid api key")] * 3)
    with pytest.raises(ProviderError, match="answered HTTP 401"):
        make_model(provider, server, max_retries=2).complete(first_request())
    assert len(server.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_it_raises_a_provider_error_when_the_server_is_too_slow(
    provider: str, server: Loopback
) -> None:
    server.script(Reply.slow(2.0))
    started = time.monotonic()
    with pytest.raises(ProviderError) as raised:
        make_model(provider, server, timeout_s=0.3, max_retries=0).complete(first_request())

    assert time.monotonic() - started < 1.5
    assert str(raised.value).startswith(f"{NAME[provider]} request failed: APITimeoutError")
    assert len(server.requests) == 1
