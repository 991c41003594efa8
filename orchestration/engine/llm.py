"""Models of language behind one interface, and the scripted model used offline."""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonkit import map_strings
from orchestration.engine.errors import EngineError
from orchestration.engine.refs import resolve


class ProviderError(EngineError):
    """A model provider failed (after its retries): the message says which and why."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    # Arguments as the model sent them: a dict when it sent valid JSON, else the raw string.
    arguments: Any

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    input_schema: Mapping[str, Any]


@dataclass(slots=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str = ""
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class ModelRequest:
    messages: Sequence[Message]
    tools: Sequence[ToolSpec] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    # Values a scripted model may substitute into its turns ($input.x, $last.y). Never sent out.
    variables: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ModelResponse:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    stop_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tool_calls": [c.to_dict() for c in self.tool_calls],
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "stop_reason": self.stop_reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelResponse:
        return cls(
            text=data.get("text", ""),
            tool_calls=[ToolCall(c["id"], c["name"], c["arguments"])
                        for c in data.get("tool_calls", [])],
            tokens_in=int(data.get("tokens_in", 0)),
            tokens_out=int(data.get("tokens_out", 0)),
            stop_reason=data.get("stop_reason", ""),
        )


class Model(abc.ABC):
    provider: str = ""
    name: str = ""

    @abc.abstractmethod
    def complete(self, request: ModelRequest) -> ModelResponse:
        """One turn. Raises ProviderError on failure; never hangs past its timeout."""


def parse_arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return raw
    return raw


class ScriptedModel(Model):
    """Replays a script of assistant turns, one per call, chosen by how many assistant turns the
    conversation already holds, so a resumed loop gets the same turn again.

    A turn is ``{"text": str, "tool_calls": [{"name", "arguments"}], "tokens_in", "tokens_out"}``,
    or ``{"variants": [...]}`` of such turns chosen by a ``when`` path (see ``_variant``).
    An argument that is exactly ``$input.<path>``, ``$tasks.<dep>.<path>`` or ``$last.<path>``
    takes that value (the run input, a dependency's output as its handoff reads, with
    ``key_facts``; the last tool result in the conversation); ``{{input.path}}``,
    ``{{tasks.<dep>.path}}``, ``{{last.path}}`` and ``{{tools.<name>.path}}`` (the latest
    result of that tool in the conversation; a list's items by index, ``results.0.text``)
    inside any string are filled in as text, ``{{input.path|toml}}`` as a TOML value (quoted
    and escaped), for handoff envelopes, and ``{{...|sentence}}`` as the text's first
    sentence (a scripted agent quoting what a search found).
    """

    provider = "scripted"

    def __init__(self, script: Sequence[Mapping[str, Any]], name: str = "scripted") -> None:
        self.script = list(script)
        self.name = name

    def complete(self, request: ModelRequest) -> ModelResponse:
        index = sum(1 for m in request.messages if m.role == "assistant")
        if index >= len(self.script):
            raise ProviderError(f"the script has {len(self.script)} turns; turn {index + 1} "
                                "was asked for")
        turn = _variant(self.script[index], request.variables)
        last: Any = {}
        for m in reversed(request.messages):
            if m.role == "tool":
                last = parse_arguments(m.content)
                break
        results = _results_by_tool(request.messages)
        run_input = request.variables.get("input", {})
        tasks = request.variables.get("tasks", {})
        calls = []
        try:
            for i, call in enumerate(turn.get("tool_calls", [])):
                args = _resolve_last(
                    resolve(call.get("arguments", {}), run_input=run_input, outputs=tasks), last)
                args = _interpolate(args, run_input, last, tasks, results)
                calls.append(ToolCall(id=f"call_{index}_{i}", name=call["name"], arguments=args))
            text = _interpolate(turn.get("text", ""), run_input, last, tasks, results)
        except EngineError as exc:
            raise ProviderError(f"scripted turn {index + 1}: {exc}") from None
        prompt_chars = sum(len(m.content) for m in request.messages)
        return ModelResponse(
            text="" if text is None else str(text),
            tool_calls=calls,
            tokens_in=int(turn.get("tokens_in", max(1, prompt_chars // 4))),
            tokens_out=int(turn.get("tokens_out", 20)),
            stop_reason="tool_use" if calls else "end_turn",
        )


def _variant(turn: Mapping[str, Any], variables: Mapping[str, Any]) -> Mapping[str, Any]:
    """A turn written as ``{"variants": [{"when": "input.flag", ...}, {...}]}`` is the first
    variant whose ``when`` path is true in the request's variables (one without ``when`` always
    is): a scripted agent that answers differently for some inputs, e.g. a demo flag."""
    for variant in turn.get("variants", ()):
        path = variant.get("when")
        if path is None:
            return variant
        node: Any = variables
        for part in str(path).split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node:
            return variant
    return turn


_PLACEHOLDER = re.compile(
    r"\{\{\s*(input|last|tasks|tools)((?:\.[A-Za-z0-9_-]+)*)\s*(?:\|\s*(toml|sentence)\s*)?\}\}")
_SENTENCE = re.compile(r"(.+?[.!?])(?=\s|$)", re.DOTALL)


def _results_by_tool(messages: Sequence[Message]) -> dict[str, Any]:
    """Each tool's latest successful result in the conversation, by the tool's name."""
    names = {c.id: c.name for m in messages if m.role == "assistant" for c in m.tool_calls}
    found: dict[str, Any] = {}
    for m in messages:
        if m.role == "tool" and not m.is_error and m.tool_call_id in names:
            found[names[m.tool_call_id]] = parse_arguments(m.content)
    return found


def _first_sentence(value: Any) -> str:
    text = " ".join(str("" if value is None else value).split())
    match = _SENTENCE.match(text)
    return match.group(1) if match else text


def _toml_value(value: Any) -> str:
    """A value written as a TOML value (a quoted, escaped string for text), for placeholders
    inside a handoff envelope: run input must never be able to change the envelope's shape."""
    import tomli_w

    if value is None:
        value = ""
    try:
        return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
    except TypeError:
        return tomli_w.dumps({"v": str(value)}).split("=", 1)[1].strip()


def _interpolate(value: Any, run_input: Any, last: Any, tasks: Any = None,
                 results: Any = None) -> Any:
    """Fill ``{{input.path}}``, ``{{last.path}}``, ``{{tasks.<dep>.path}}`` and
    ``{{tools.<name>.path}}`` placeholders inside strings."""
    roots = {"input": run_input, "last": last, "tasks": tasks or {}, "tools": results or {}}

    def fill(match: re.Match[str]) -> str:
        node: Any = roots[match.group(1)]
        for part in filter(None, match.group(2).split(".")):
            if isinstance(node, list) and part.isdigit():
                node = node[int(part)] if int(part) < len(node) else None
            else:
                node = node.get(part) if isinstance(node, Mapping) else None
        if match.group(3) == "toml":
            return _toml_value(node)
        if match.group(3) == "sentence":
            return _first_sentence(node)
        return "" if node is None else str(node)

    return map_strings(value, lambda text: _PLACEHOLDER.sub(fill, text))


def _resolve_last(value: Any, last: Any) -> Any:
    """Replace each ``$last.path`` string with that value of the previous task's output."""
    def resolve(text: str) -> Any:
        if not text.startswith("$last"):
            return text
        node = last
        for part in text.split(".")[1:]:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                return None
        return node

    return map_strings(value, resolve)
