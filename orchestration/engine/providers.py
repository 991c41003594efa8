"""Real model clients: the official OpenAI SDK (any OpenAI-compatible server) and Anthropic's.

Both SDKs retry 429 and 5xx answers with exponential backoff themselves (``max_retries``) and
honour a per-request ``timeout``; whatever still fails becomes a ProviderError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from orchestration.engine.llm import (
    Model,
    ModelRequest,
    ModelResponse,
    ProviderError,
    ToolCall,
    parse_arguments,
)

_PASSTHROUGH = ("temperature", "top_p", "max_tokens", "stop", "seed")


def _describe(exc: Exception, provider: str) -> str:
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc)
    if status:
        return f"{provider} answered HTTP {status}: {message}"
    return f"{provider} request failed: {type(exc).__name__}: {message}"


class OpenAICompatibleModel(Model):
    provider = "openai"

    def __init__(self, *, model: str, api_key: str, base_url: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 2,
                 params: Mapping[str, Any] | None = None) -> None:
        import openai

        self.name = model
        self.params = dict(params or {})
        self._openai = openai
        self.client = openai.OpenAI(api_key=api_key or "unused", base_url=base_url,
                                    timeout=timeout_s, max_retries=max_retries)

    def _messages(self, request: ModelRequest) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in request.messages:
            if m.role == "assistant":
                item: dict[str, Any] = {"role": "assistant", "content": m.content or None}
                if m.tool_calls:
                    item["tool_calls"] = [
                        {"id": c.id, "type": "function",
                         "function": {"name": c.name, "arguments": c.arguments
                                      if isinstance(c.arguments, str) else json.dumps(c.arguments)}}
                        for c in m.tool_calls
                    ]
                out.append(item)
            elif m.role == "tool":
                out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
            else:
                out.append({"role": m.role, "content": m.content})
        return out

    def complete(self, request: ModelRequest) -> ModelResponse:
        kwargs: dict[str, Any] = {
            k: v for k, v in {**self.params, **request.params}.items() if k in _PASSTHROUGH
        }
        if request.tools:
            kwargs["tools"] = [
                {"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": dict(t.input_schema)}}
                for t in request.tools
            ]
        try:
            response = self.client.chat.completions.create(
                model=self.name, messages=self._messages(request), **kwargs)
        except self._openai.OpenAIError as exc:
            raise ProviderError(_describe(exc, "OpenAI-compatible endpoint")) from None
        if not response.choices:
            raise ProviderError("OpenAI-compatible endpoint returned no choices")
        choice = response.choices[0]
        calls = [
            ToolCall(id=c.id, name=c.function.name, arguments=parse_arguments(c.function.arguments))
            for c in (choice.message.tool_calls or [])
            if getattr(c, "function", None) is not None
        ]
        usage = response.usage
        return ModelResponse(
            text=choice.message.content or "",
            tool_calls=calls,
            tokens_in=int(getattr(usage, "prompt_tokens", 0) or 0),
            tokens_out=int(getattr(usage, "completion_tokens", 0) or 0),
            stop_reason=choice.finish_reason or "",
        )


class AnthropicModel(Model):
    provider = "anthropic"

    def __init__(self, *, model: str, api_key: str, base_url: str | None = None,
                 timeout_s: float = 60.0, max_retries: int = 2,
                 params: Mapping[str, Any] | None = None) -> None:
        import anthropic

        self.name = model
        self.params = dict(params or {})
        self._anthropic = anthropic
        self.client = anthropic.Anthropic(api_key=api_key or "unused", base_url=base_url,
                                          timeout=timeout_s, max_retries=max_retries)

    def complete(self, request: ModelRequest) -> ModelResponse:
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        messages: list[dict[str, Any]] = []
        for m in request.messages:
            if m.role == "system":
                continue
            if m.role == "assistant":
                blocks: list[dict[str, Any]] = []
                if m.content:
                    blocks.append({"type": "text", "text": m.content})
                for c in m.tool_calls:
                    args = c.arguments if isinstance(c.arguments, dict) else {"_raw": c.arguments}
                    blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": args})
                messages.append({"role": "assistant", "content": blocks or m.content})
            elif m.role == "tool":
                block = {"type": "tool_result", "tool_use_id": m.tool_call_id,
                         "content": m.content, "is_error": m.is_error}
                # Consecutive tool results travel together in one user turn.
                if messages and messages[-1]["role"] == "user" and isinstance(
                        messages[-1]["content"], list) and messages[-1].get("_results"):
                    messages[-1]["content"].append(block)
                else:
                    messages.append({"role": "user", "content": [block], "_results": True})
            else:
                messages.append({"role": "user", "content": m.content})
        for item in messages:
            item.pop("_results", None)
        params = {**self.params, **request.params}
        kwargs: dict[str, Any] = {"max_tokens": int(params.get("max_tokens", 1024))}
        for key in ("temperature", "top_p"):
            if key in params:
                kwargs[key] = params[key]
        if system:
            kwargs["system"] = system
        if request.tools:
            kwargs["tools"] = [{"name": t.name, "description": t.description,
                                "input_schema": dict(t.input_schema)} for t in request.tools]
        try:
            response = self.client.messages.create(model=self.name, messages=messages, **kwargs)
        except self._anthropic.AnthropicError as exc:
            raise ProviderError(_describe(exc, "Anthropic endpoint")) from None
        text = "".join(b.text for b in response.content if b.type == "text")
        calls = [ToolCall(id=b.id, name=b.name, arguments=b.input)
                 for b in response.content if b.type == "tool_use"]
        return ModelResponse(
            text=text, tool_calls=calls,
            tokens_in=int(response.usage.input_tokens or 0),
            tokens_out=int(response.usage.output_tokens or 0),
            stop_reason=response.stop_reason or "",
        )
