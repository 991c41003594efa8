"""The agent loop: model call → tool calls → results → model call, until a final answer or the
step budget is spent. Every model and tool call is checkpointed before the loop goes on, and a
resumed loop re-reads recorded turns and results instead of calling anything again."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from audit.chain import canonical_json
from orchestration.engine.contracts import ToolContract
from orchestration.engine.errors import ContractError, ToolInputInvalid
from orchestration.engine.governance import Governor, Ungoverned, Usage
from orchestration.engine.handoff import (
    Envelope,
    HandoffError,
    envelope_for_output,
    extract_block,
    parse_envelope,
    summarise,
)
from orchestration.engine.llm import (
    Message,
    Model,
    ModelRequest,
    ModelResponse,
    ProviderError,
    ToolSpec,
)
from orchestration.engine.redaction import redact
from orchestration.engine.runner import Outcome, TaskContext
from orchestration.engine.states import TaskStatus


@dataclass(slots=True)
class Journal:
    """What the ledger already holds for this task: recorded turns and tool outcomes."""

    turns: dict[int, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    intents: set[str] = field(default_factory=set)


class StepLog(Protocol):
    def journal(self) -> Journal: ...

    def record(self, kind: str, data: dict[str, Any], *, usage: Usage,
               reserved: Usage | None = None) -> None:
        """Checkpoint one step; settle its reservation against the real usage atomically."""
        ...


@dataclass(slots=True)
class AgentSpec:
    slug: str
    instructions: str = ""
    step_budget: int = 5
    token_budget: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    max_output_tokens: int = 1024


Pricing = Callable[[int, int], Decimal]


def no_cost(tokens_in: int, tokens_out: int) -> Decimal:
    return Decimal("0")


def build_prompt(ctx: TaskContext) -> str:
    """Just-in-time context: the task's own spec, the run input and its inputs' envelopes."""
    spec = ctx.spec
    parts = [f"Task: {spec.title or spec.key}"]
    if spec.spec:
        parts.append(spec.spec)
    if spec.acceptance:
        parts.append("Acceptance criteria:\n" + "\n".join(f"- {a}" for a in spec.acceptance))
    parts.append("Run input (JSON):\n" + json.dumps(dict(ctx.run_input), ensure_ascii=False,
                                                     sort_keys=True))
    for dep in spec.depends_on:
        envelope = envelope_for_output(dep, ctx.dep_outputs.get(dep))
        parts.append(f"Handoff from {dep} (TOML):\n{envelope.to_toml()}")
    parts.append("Finish with your answer. You may end it with a ```toml block holding your "
                 "handoff: summary, key_facts, artefacts, open_questions.")
    return "\n\n".join(parts)


def _digest(messages: Sequence[Message]) -> str:
    payload = [{"role": m.role, "content": m.content, "tool_call_id": m.tool_call_id,
                "tool_calls": [c.to_dict() for c in m.tool_calls]} for m in messages]
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def run_agent(
    ctx: TaskContext,
    agent: AgentSpec,
    model: Model,
    tools: Mapping[str, ToolContract],
    log: StepLog,
    *,
    granted: Callable[[str], bool],
    pricing: Pricing = no_cost,
    secrets: Sequence[str] = (),
    governor: Governor | None = None,
) -> Outcome:
    governor = governor or Ungoverned()
    actor = f"agent:{agent.slug}"
    task = ctx.spec.key
    try:
        prompt = build_prompt(ctx)
    except HandoffError as exc:
        return Outcome(status=TaskStatus.FAILED, error=f"malformed handoff: {exc}")
    messages: list[Message] = []
    if agent.instructions:
        messages.append(Message("system", agent.instructions))
    messages.append(Message("user", prompt))
    specs = [ToolSpec(t.name, t.description, t.input_schema) for t in tools.values()]
    journal = log.journal()
    tokens_used = 0
    tool_results: dict[str, Any] = {}

    for step in range(1, agent.step_budget + 1):
        recorded = journal.turns.get(step)
        if recorded is not None:
            response = ModelResponse.from_dict(recorded)
        else:
            request = ModelRequest(messages=tuple(messages), tools=specs, params=agent.params,
                                   variables={"input": ctx.run_input})
            worst_in = _estimate_tokens(messages, specs)
            worst = Usage(steps=1, tokens_in=worst_in, tokens_out=agent.max_output_tokens,
                          cost=pricing(worst_in, agent.max_output_tokens))
            refused = governor.reserve(worst)
            if refused:
                return _escalate(refused, key=f"{ctx.run_id}:{task}:{step}:model")
            started = time.perf_counter()
            try:
                response = model.complete(request)
            except ProviderError as exc:
                log.record("model.failed", {"task": task, "step": step, "actor": actor,
                                            "provider": model.provider, "model": model.name,
                                            "error": redact(str(exc), secrets)}, usage=Usage(),
                           reserved=worst)
                return Outcome(status=TaskStatus.FAILED, error=redact(str(exc), secrets))
            latency = round((time.perf_counter() - started) * 1000, 3)
            cost = pricing(response.tokens_in, response.tokens_out)
            log.record(
                "model.called",
                {"task": task, "step": step, "actor": actor, "provider": model.provider,
                 "model": model.name, "messages_digest": _digest(messages),
                 "response": redact(response.to_dict(), secrets),
                 "tokens_in": response.tokens_in, "tokens_out": response.tokens_out,
                 "cost": str(cost), "latency_ms": latency},
                usage=Usage(steps=1, tokens_in=response.tokens_in,
                            tokens_out=response.tokens_out, cost=cost),
                reserved=worst,
            )
        tokens_used += response.tokens_in + response.tokens_out
        messages.append(Message("assistant", response.text, tool_calls=list(response.tool_calls)))

        if not response.tool_calls:
            block = extract_block(response.text)
            try:
                envelope = (parse_envelope(block, source="your") if block is not None
                            else Envelope(summary=summarise(response.text)))
            except HandoffError as exc:
                messages.append(Message("user", f"{exc}. Write the answer again with a valid "
                                                "envelope."))
                continue
            return Outcome(output={"answer": response.text, "handoff": envelope.to_toml(),
                                   "tool_results": tool_results})

        for index, call in enumerate(response.tool_calls):
            key = f"{ctx.run_id}:{task}:{step}:{index}"
            content, is_error = _tool_step(
                key, call.name, call.arguments, task=task, actor=actor, tools=tools, log=log,
                journal=journal, granted=granted, secrets=secrets, governor=governor)
            if isinstance(content, Pause):
                return _escalate(content.reason, key=key, tool=call.name,
                                 arguments=redact(call.arguments, secrets))
            if not is_error:
                tool_results[call.name] = json.loads(content)
            messages.append(Message("tool", content, tool_call_id=call.id, is_error=is_error))

        if agent.token_budget is not None and tokens_used >= agent.token_budget:
            return _escalate(f"budget_exhausted: the agent loop used {tokens_used} tokens of "
                             f"its {agent.token_budget}", key=f"{ctx.run_id}:{task}:{step}:tokens")

    return _escalate(f"step_budget_exhausted: no final answer within {agent.step_budget} steps",
                     key=f"{ctx.run_id}:{task}:{agent.step_budget}:steps")


@dataclass(frozen=True, slots=True)
class Pause:
    """A tool step that cannot go on without people: the reason names why."""

    reason: str


def _escalate(reason: str, *, key: str, tool: str = "", arguments: Any = None) -> Outcome:
    """Park the task for people. ``reason`` starts with the escalation code."""
    code = reason.split(":", 1)[0]
    return Outcome(status=TaskStatus.WAITING, error=reason,
                   escalation={"reason": code, "detail": reason, "call_key": key, "tool": tool,
                               "arguments": arguments if arguments is not None else {}})


def _estimate_tokens(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> int:
    """A safe upper bound on prompt tokens: about 3 characters a token, plus framing."""
    chars = sum(len(m.content) + sum(len(str(c.arguments)) for c in m.tool_calls)
                for m in messages)
    chars += sum(len(canonical_json(dict(t.input_schema))) + len(t.description) for t in tools)
    return chars // 3 + 16 * len(messages) + 64


def _tool_step(
    key: str, name: str, arguments: Any, *, task: str, actor: str,
    tools: Mapping[str, ToolContract], log: StepLog, journal: Journal,
    granted: Callable[[str], bool], secrets: Sequence[str], governor: Governor,
) -> tuple[str | Pause, bool]:
    """One tool call, governed: grant, validation, approval policy, quota, budget, execution
    with a timeout, output verification, record.

    Returns the content fed back to the model and whether it is an error, or a Pause when the
    call must wait for people (approval, quota, budget, unknown outcome)."""
    recorded = journal.results.get(key)
    if recorded is not None:
        if "error" in recorded:
            return recorded["error"], True
        return canonical_json(recorded["result"]), False

    base = {"task": task, "actor": actor, "tool": name, "idempotency_key": key}
    contract = tools.get(name)
    if contract is None or not granted(name):
        error = f"tool {name!r} is not granted to this agent; the call was refused"
        log.record("tool.refused", {**base, "arguments": redact(arguments, secrets),
                                    "error": error}, usage=Usage())
        return error, True
    try:
        if not isinstance(arguments, Mapping):
            raise ToolInputInvalid(f"arguments for {name} must be a JSON object, got "
                                   f"{type(arguments).__name__}")
        contract.validate_input(arguments)
    except ToolInputInvalid as exc:
        log.record("tool.rejected", {**base, "arguments": redact(arguments, secrets),
                                     "error": str(exc)}, usage=Usage())
        return f"{exc}. Fix the arguments and call again.", True

    gate = governor.gate(contract, arguments, key)
    if gate.action == "wait":
        return Pause(f"awaiting_approval: {gate.message}"), True
    if gate.action == "deny":
        log.record("tool.denied", {**base, "arguments": redact(dict(arguments), secrets),
                                   "error": gate.message}, usage=Usage())
        return f"A reviewer rejected this call: {gate.message}", True
    if gate.arguments is not None:
        arguments = gate.arguments  # a reviewer's edit, already re-validated and digest-bound

    if key in journal.intents and not contract.idempotent:
        decided = governor.outcome_decision(key)
        if decided == "reject":
            return ("A reviewer decided this call must not be repeated; treat it as not "
                    "done."), True
        if decided != "rerun":
            return Pause(f"unknown_outcome: {name} may or may not have run (call {key})"), True
    refused = governor.admit(contract, key)
    if refused:
        return Pause(refused), True
    worst = Usage(tool_calls=1, cost=contract.cost_per_call)
    refused = governor.reserve(worst)
    if refused:
        return Pause(refused), True
    if not contract.idempotent:
        # Written before the call: if we die mid-call, a resume knows not to repeat it.
        log.record("tool.intent", {**base, "arguments": redact(dict(arguments), secrets)},
                   usage=Usage())
    started = time.perf_counter()
    try:
        result = contract.call(arguments, idempotency_key=key)
    except ContractError as exc:
        latency = round((time.perf_counter() - started) * 1000, 3)
        error = redact(str(exc), secrets)
        log.record("tool.failed", {**base, "arguments": redact(dict(arguments), secrets),
                                   "error": error, "latency_ms": latency},
                   usage=Usage(tool_calls=1, cost=contract.cost_per_call), reserved=worst)
        return error, True
    latency = round((time.perf_counter() - started) * 1000, 3)
    clean = redact(result, secrets)
    log.record("tool.called", {**base, "arguments": redact(dict(arguments), secrets),
                               "result": clean, "latency_ms": latency},
               usage=Usage(tool_calls=1, cost=contract.cost_per_call), reserved=worst)
    return canonical_json(clean), False
