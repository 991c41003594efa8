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
from typing import Any

from hashchain import canonical_json
from orchestration.engine import delegation
from orchestration.engine.contracts import ToolContract
from orchestration.engine.delegation import Delegator
from orchestration.engine.gate import StepLog, ToolGate, checks_ahead, contract_lookup
from orchestration.engine.governance import Governor, Ungoverned, Usage
from orchestration.engine.handoff import (
    Envelope,
    HandoffError,
    envelope_for_output,
    extract_block,
    parse_envelope,
    summarise,
)
from orchestration.engine.knowledge import prompt_section
from orchestration.engine.llm import (
    Message,
    Model,
    ModelRequest,
    ModelResponse,
    ProviderError,
    ToolSpec,
)
from orchestration.engine.redaction import redact
from orchestration.engine.runner import Outcome, TaskContext, stopped_outcome
from orchestration.engine.states import TaskStatus
from orchestration.engine.tracing import agent_attributes, traced_complete
from orchestration.engine.transcript import conversation
from orchestration.engine.verify import Call, Verifier, escalated, key_facts


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


def build_prompt(ctx: TaskContext, knowledge: Sequence[Mapping[str, Any]] = ()) -> str:
    """Just-in-time context: the task's own spec, the run input, its inputs' envelopes and,
    when its plan entry declares collections, their best chunks for the spec."""
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
    if spec.knowledge:
        parts.append(prompt_section(knowledge))
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
    unusable: Mapping[str, str] | None = None,
    watch_grant: bool = True,
    verifier: Verifier | None = None,
    delegator: Delegator | None = None,
    knowledge: Sequence[Mapping[str, Any]] = (),
) -> Outcome:
    """Run one agent task. ``tools`` are the contracts offered to the model; ``unusable``
    names tools whose configuration is broken (a call to one escalates
    ``configuration_error``, the others keep working). A ``verifier`` checks the final answer
    (engine/verify.py): findings go back to the model as the next message, and the task gets
    another step budget for the rework. A ``delegator`` offers the task's handoff tools
    (engine/delegation.py): a handoff call adds a task for another agent, and the task waits
    until what it delegated has ended. ``knowledge`` are the chunks its prompt is given
    (engine/knowledge.py), already checkpointed.

    Each call's record carries the governor's checks of the call after it when that call is
    known by then (``Governor.ahead_of_tool``/``ahead_of_model``): the stop signals and the
    reservation commit with the record. What was reserved for a call that does not come is
    given back when the loop ends."""
    governor = governor or Ungoverned()
    try:
        return _loop(ctx, agent, model, tools, log, governor, granted=granted, pricing=pricing,
                     secrets=secrets, unusable=unusable, watch_grant=watch_grant,
                     verifier=verifier, delegator=delegator, knowledge=knowledge)
    finally:
        governor.release_ahead()


def _loop(ctx: TaskContext, agent: AgentSpec, model: Model, tools: Mapping[str, ToolContract],
          log: StepLog, governor: Governor, *, granted: Callable[[str], bool], pricing: Pricing,
          secrets: Sequence[str], unusable: Mapping[str, str] | None, watch_grant: bool,
          verifier: Verifier | None, delegator: Delegator | None,
          knowledge: Sequence[Mapping[str, Any]]) -> Outcome:
    actor = f"agent:{agent.slug}"
    agent_attributes(agent.slug)
    task = ctx.spec.key
    try:
        prompt = build_prompt(ctx, knowledge)
    except HandoffError as exc:
        return Outcome(status=TaskStatus.FAILED, error=f"malformed handoff: {exc}")
    messages: list[Message] = []
    if agent.instructions:
        messages.append(Message("system", agent.instructions))
    messages.append(Message("user", prompt))
    specs = [ToolSpec(t.name, t.description, t.input_schema) for t in tools.values()]
    journal = log.journal()
    if delegator is not None:
        delegator.journal = journal
        specs.extend(delegator.offered())
    gate = ToolGate(contracts=contract_lookup(tools, unusable or {}), log=log, journal=journal,
                    governor=governor, granted=granted, task=task, actor=actor, secrets=secrets,
                    watch_grant=watch_grant)
    tokens_used = 0
    tool_results: dict[str, Any] = {}
    calls: list[Call] = []
    variables = {"input": ctx.run_input,
                 "tasks": {dep: {**out, "key_facts": key_facts(out)} if isinstance(out, dict)
                           else out for dep, out in ctx.dep_outputs.items()}}
    if verifier is not None:
        verifier.recorded = journal.checks
    limit, rework = agent.step_budget, 0
    spec_chars = _spec_chars(specs)

    def worst_of(conversation: Sequence[Message]) -> Usage:
        """A model call's worst case: its prompt's upper bound and the most it may answer."""
        tokens_in = _estimate_tokens(conversation, spec_chars)
        return Usage(steps=1, tokens_in=tokens_in, tokens_out=agent.max_output_tokens,
                     cost=pricing(tokens_in, agent.max_output_tokens))

    def handoff_call(name: str) -> bool:
        return delegator is not None and delegation.callee(name) is not None

    step = 0
    while step < limit:
        step += 1
        recorded = journal.turns.get(step)
        if recorded is not None:
            response = ModelResponse.from_dict(recorded)
        else:
            request = ModelRequest(messages=tuple(messages), tools=specs, params=agent.params,
                                   variables=variables)
            worst = worst_of(messages)
            refused = governor.begin_model_call(worst)  # stop signals, then the reservation
            if refused:
                return stopped_outcome(refused, key=f"{ctx.run_id}:{task}:{step}:model")
            started = time.perf_counter()
            try:
                response = traced_complete(model, request, run_id=ctx.run_id, task=task,
                                           step=step)
            except ProviderError as exc:
                log.record("model.failed", {"task": task, "step": step, "actor": actor,
                                            "provider": model.provider, "model": model.name,
                                            "error": redact(str(exc), secrets)}, usage=Usage(),
                           reserved=worst)
                return Outcome(status=TaskStatus.FAILED, error=redact(str(exc), secrets))
            latency = round((time.perf_counter() - started) * 1000, 3)
            cost = pricing(response.tokens_in, response.tokens_out)
            first = response.tool_calls[0] if response.tool_calls else None
            log.record(
                "model.called",
                {"task": task, "step": step, "actor": actor, "provider": model.provider,
                 "model": model.name, "messages_digest": _digest(messages),
                 "response": redact(response.to_dict(), secrets),
                 "tokens_in": response.tokens_in, "tokens_out": response.tokens_out,
                 "cost": str(cost), "latency_ms": latency},
                usage=Usage(steps=1, tokens_in=response.tokens_in,
                            tokens_out=response.tokens_out, cost=cost),
                reserved=worst, transcript=redact(conversation(messages), secrets),
                ahead=(checks_ahead(gate.ahead_of, f"{ctx.run_id}:{task}:{step}:0", first.name)
                       if first is not None and not handoff_call(first.name) else None),
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
            output = {"answer": redact(response.text, secrets),
                      "handoff": redact(envelope.to_toml(), secrets),
                      "tool_results": tool_results}
            if verifier is None:
                return Outcome(output=output)
            judged = verifier.check(output, calls, rework)
            if judged.action == "pass":
                return Outcome(output=output)
            if judged.action == "fail":
                return Outcome(status=TaskStatus.FAILED, error=judged.error)
            if judged.action == "escalate":
                return escalated(judged)
            verifier.rework(rework, judged.findings)
            rework += 1
            limit += agent.step_budget  # each rework round gets the agent's step budget
            messages.append(Message("user", "Your answer did not pass the checks:\n"
                                    + "\n".join(f"- {f}" for f in judged.findings)
                                    + "\nFix what they found and answer again."))
            continue

        # Whether the loop asks the model again after this turn's calls (unless one of them
        # delegates work or stops the loop).
        again = step < limit and not (agent.token_budget is not None
                                      and tokens_used >= agent.token_budget)
        delegated = ""  # the first handoff of this turn still under way
        for index, call in enumerate(response.tool_calls):
            key = f"{ctx.run_id}:{task}:{step}:{index}"
            handoff = handoff_call(call.name)
            if delegated and not handoff:
                break  # the turn's other calls run once the delegated work has ended
            if handoff:
                assert delegator is not None
                verdict = delegator.call(key, call.name, call.arguments)
                if verdict.pause.startswith(delegation.WAITING + ":"):
                    delegated = delegated or verdict.pause
                    continue  # the turn's other handoffs are delegated at once
            else:
                verdict = gate.call(key, call.name, call.arguments,
                                    _follow(gate, governor, response.tool_calls, index,
                                            f"{ctx.run_id}:{task}:{step}", handoff_call,
                                            worst_of, messages, again and not delegated))
            if verdict.pause:
                return stopped_outcome(verdict.pause, key=key, tool=call.name,
                                       arguments=redact(call.arguments, secrets))
            if not handoff:  # (a handoff is not a tool of the task's scope)
                calls.append(Call(call.name, verdict.arguments, verdict.result,
                                  verdict.error if verdict.is_error else "", verdict.denied))
            if not verdict.is_error:
                tool_results[call.name] = verdict.result
            messages.append(Message("tool", verdict.content, tool_call_id=call.id,
                                    is_error=verdict.is_error))

        if delegated:
            return Outcome(status=TaskStatus.WAITING, error=delegated)
        if agent.token_budget is not None and tokens_used >= agent.token_budget:
            return stopped_outcome(
                f"budget_exhausted: the agent loop used {tokens_used} tokens of its "
                f"{agent.token_budget}", key=f"{ctx.run_id}:{task}:{step}:tokens")

    return stopped_outcome(
        f"step_budget_exhausted: no final answer within {limit} steps",
        key=f"{ctx.run_id}:{task}:{limit}:steps")


def _follow(gate: ToolGate, governor: Governor, calls: Sequence[Any], index: int, turn: str,
            handoff_call: Callable[[str], bool], worst_of: Callable[[Sequence[Message]], Usage],
            messages: Sequence[Message], again: bool) -> Callable[[str], Any] | None:
    """What a successful tool call's record runs ahead: the checks of the turn's next call,
    or, after its last, of the next model call (whose prompt ends with this call's result)."""
    if index + 1 < len(calls):
        following = calls[index + 1]
        if handoff_call(following.name):
            return None
        return lambda content: gate.ahead_of(f"{turn}:{index + 1}", following.name)
    if not again:
        return None
    call = calls[index]
    return lambda content: governor.ahead_of_model(worst_of(
        [*messages, Message("tool", content, tool_call_id=call.id)]))


def _spec_chars(tools: Sequence[ToolSpec]) -> int:
    return sum(len(canonical_json(dict(t.input_schema))) + len(t.description) for t in tools)


def _estimate_tokens(messages: Sequence[Message], spec_chars: int) -> int:
    """A safe upper bound on prompt tokens: about 3 characters a token, plus framing
    (``spec_chars``: the tools' schemas and descriptions, ``_spec_chars``)."""
    chars = sum(len(m.content) + sum(len(str(c.arguments)) for c in m.tool_calls)
                for m in messages)
    return (chars + spec_chars) // 3 + 16 * len(messages) + 64
