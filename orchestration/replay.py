"""Replay: re-run a run's engine logic over its ledger and check that the same decisions come out.

Nothing external is called. Model turns and tool results are fed back from the recorded events
through a model and tools that can only answer from the ledger (a step the ledger does not hold
fails instead of calling out), people's decisions are applied when the original run received
them, and the approval policies in force when the run started are evaluated again. The replay
writes its own events to an in-memory store; task by task and for the run's states they are
compared with the original ones, and the first difference is reported.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jsonschema

from approvals.models import Policy, PolicyVersion, Reason
from approvals.services import _condition_holds, digest
from audit.models import Event
from orchestration.engine.agent import AgentSpec, run_agent
from orchestration.engine.contracts import ToolContract
from orchestration.engine.errors import EngineError, ToolStopped, ToolTimeout
from orchestration.engine.gate import StoreLog, ToolGate, contract_lookup
from orchestration.engine.governance import ALLOW, Gate, Usage
from orchestration.engine.llm import Model, ModelRequest, ModelResponse, ProviderError
from orchestration.engine.plan import Plan, parse_plan
from orchestration.engine.runner import (
    Outcome,
    TaskContext,
    advance,
    execute,
    run_contract_task,
    stopped_outcome,
)
from orchestration.engine.states import (
    RUN_TERMINAL,
    TaskStatus,
    check_run_transition,
    check_task_transition,
)
from orchestration.engine.store import MemoryStore
from orchestration.models import Agent, Run, Tool
from orchestration.services import KILL_SWITCH_RELEASED

MAX_ITERATIONS = 10_000


class NotRecorded(ProviderError):
    """The replay needed a model turn the ledger does not hold (it never calls a provider)."""


class _RecordedFailure(ToolTimeout):
    """A recorded tool error, raised again with its exact message (passes through contracts)."""


@dataclass(frozen=True, slots=True)
class Recorded:
    seq: int
    kind: str
    data: dict[str, Any]
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Divergence:
    seq: int | None
    stream: str
    expected: dict[str, Any] | None
    got: dict[str, Any] | None

    def message(self) -> str:
        where = f"event #{self.seq}" if self.seq is not None else "after the last event"
        kind = (self.expected or self.got or {}).get("kind", "?")
        head = f"diverged at {where} ({kind}, {self.stream})"
        expected = _show(self.expected) if self.expected else "nothing"
        got = _show(self.got) if self.got else "nothing (the replay produced no such event)"
        return f"{head}: expected {expected}; got {got}"


@dataclass(slots=True)
class ReplayResult:
    run_id: str
    compared: int
    status: str
    divergence: Divergence | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.divergence is None and not self.error

    def summary(self) -> str:
        if self.ok:
            return (f"replay of run {self.run_id} matches: {self.compared} recorded decisions "
                    f"and states came out the same (run {self.status})")
        parts = [f"replay of run {self.run_id} diverges"]
        if self.divergence is not None:
            parts.append(self.divergence.message())
        if self.error:
            parts.append(f"the replay stopped: {self.error}")
        return ": ".join(parts[:1]) + ": " + "; ".join(parts[1:])


def _show(item: Mapping[str, Any]) -> str:
    text = json.dumps(item, sort_keys=True, default=str, ensure_ascii=False)
    return text if len(text) <= 400 else text[:397] + "..."


# ---- what is compared ------------------------------------------------------------------------

_TOOL_KINDS = ("tool.failed", "tool.refused", "tool.rejected", "tool.denied",
               "tool.interrupted")


def _project(kind: str, data: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The decision or state an event records, without timings and ids of people."""
    if kind == "run.state":
        item = {"kind": kind, "from": data.get("from"), "to": data.get("to")}
        for name in ("error", "result"):
            if data.get(name) is not None and data.get(name) != "":
                item[name] = data[name]
        return "run", item
    if kind == "run.cancel_requested":
        return "run", {"kind": kind}
    task = data.get("task")
    if not task or data.get("reused_from"):
        return None
    stream = f"task {task}"
    if kind in ("task.queued",):
        return stream, {"kind": kind}
    if kind == "task.requeued":
        return stream, {"kind": kind, "reason": data.get("reason", "")}
    if kind == "task.started":
        return stream, {"kind": kind, "attempt": data.get("attempt")}
    if kind == "task.succeeded":
        return stream, {"kind": kind, "output": data.get("output")}
    if kind in ("task.failed", "task.waiting", "task.cancelled"):
        return stream, {"kind": kind, "error": data.get("error", "")}
    if kind == "model.called":
        return stream, {"kind": kind, "step": data.get("step"),
                        "messages_digest": data.get("messages_digest"),
                        "response": data.get("response")}
    if kind == "model.failed":
        return stream, {"kind": kind, "step": data.get("step"), "error": data.get("error")}
    if kind in ("tool.intent", "tool.called", *_TOOL_KINDS):
        item = {"kind": kind, "tool": data.get("tool"), "call": data.get("idempotency_key"),
                "arguments": data.get("arguments")}
        if kind == "tool.called":
            item["result"] = data.get("result")
        elif kind != "tool.intent":
            item["error"] = data.get("error")
        return stream, item
    if kind == "approval.requested":
        return stream, {"kind": kind, "reason": data.get("reason"), "tool": data.get("tool"),
                        "arguments_digest": data.get("arguments_digest"),
                        "policy": data.get("policy")}
    if kind == "budget.raised":
        return stream, {"kind": kind, "raise": data.get("raise")}
    return None


def _streams(events: Iterable[Recorded]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    streams: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for e in events:
        projected = _project(e.kind, e.data)
        if projected is not None:
            # Through JSON, so a replayed value compares like the stored one (tuples, Decimals).
            streams[projected[0]].append((e.seq, json.loads(json.dumps(projected[1],
                                                                        default=str))))
    return streams


def compare(original: Iterable[Recorded], replayed: Iterable[Recorded]) -> tuple[
        int, Divergence | None]:
    """How many recorded items were compared, and the earliest difference (by original seq)."""
    want, got = _streams(original), _streams(replayed)
    compared = sum(len(items) for items in want.values())
    found: list[tuple[float, Divergence]] = []
    for stream in sorted(set(want) | set(got)):
        a, b = want.get(stream, []), got.get(stream, [])
        for i in range(max(len(a), len(b))):
            left = a[i] if i < len(a) else None
            right = b[i] if i < len(b) else None
            if left is not None and right is not None and left[1] == right[1]:
                continue
            order = left[0] if left is not None else (a[-1][0] + 0.5 if a else 0.5)
            found.append((order, Divergence(seq=left[0] if left else None, stream=stream,
                                            expected=left[1] if left else None,
                                            got=right[1] if right else None)))
            break
    if not found:
        return compared, None
    return compared, min(found, key=lambda f: f[0])[1]


# ---- the original ledger, indexed ------------------------------------------------------------


class _Ledger:
    def __init__(self, events: list[Recorded]) -> None:
        self.events = events
        self.turns: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
        self.models: dict[str, tuple[str, str]] = {}
        self.results: dict[str, deque[tuple[int, dict[str, Any]]]] = defaultdict(deque)
        self.requests: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self.refused: dict[str, deque[str]] = defaultdict(deque)
        self.ends: dict[tuple[str, int], str] = {}
        self.stimuli: list[Recorded] = []
        self.reused: dict[str, Any] = {}
        attempt: dict[str, int] = defaultdict(int)
        for e in events:
            data, task = e.data, e.data.get("task", "")
            if e.kind == "task.started":
                attempt[task] = int(data.get("attempt", attempt[task] + 1))
            elif e.kind == "task.succeeded" and data.get("reused_from"):
                self.reused[task] = data.get("output")
            elif e.kind in ("task.succeeded", "task.failed", "task.waiting", "task.cancelled"):
                self.ends[(task, attempt[task])] = data.get("error", "")
            elif e.kind == "model.called":
                self.turns[(task, int(data["step"]))] = (attempt[task], data["response"])
                self.models[task] = (data.get("provider", ""), data.get("model", ""))
            elif e.kind == "tool.called":
                self.results[data["idempotency_key"]].append(
                    (attempt[task], {"result": data.get("result")}))
            elif e.kind == "tool.failed":
                self.results[data["idempotency_key"]].append(
                    (attempt[task], {"error": data.get("error", "")}))
            elif e.kind == "tool.interrupted":
                self.results[data["idempotency_key"]].append(
                    (attempt[task], {"interrupted": data.get("error", ""),
                                     "stopped": bool(data.get("stopped"))}))
            elif e.kind == "tool.refused":
                self.refused[task].append(data.get("tool", ""))
            elif e.kind == "approval.requested":
                self.requests[task].append(data)
            elif e.kind in ("approval.resolved", "run.cancel_requested") or (
                    e.kind == "task.requeued" and data.get("reason") == KILL_SWITCH_RELEASED):
                self.stimuli.append(e)

    def end(self, task: str, attempt: int) -> str:
        return self.ends.get((task, attempt), "")


@dataclass(slots=True)
class _Request:
    id: str
    task: str
    call_key: str
    reason: str
    status: str = "pending"
    arguments: Any = None
    note: str = ""


@dataclass(slots=True)
class _State:
    run_id: str
    ledger: _Ledger
    store: ReplayStore
    current_key: str = ""
    requests: dict[str, _Request] = field(default_factory=dict)
    extra_steps: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    opened: int = 0

    def open_request(self, *, task: str, call_key: str, reason: str, tool: str,
                     arguments: Any, policy: str | None) -> _Request:
        """Open the replay's twin of a request: it takes the id of the original one the
        same task opened next, so the people's recorded decisions apply to it."""
        queue = self.ledger.requests[task]
        original = queue.popleft() if queue else None
        self.opened += 1
        rid = original["request"] if original else f"replay-{self.opened}"
        request = _Request(id=rid, task=task, call_key=call_key, reason=reason,
                           arguments=arguments)
        self.requests[rid] = request
        self.store.record(self.run_id, "approval.requested", {
            "request": rid, "task": task, "reason": reason, "tool": tool,
            "arguments": arguments, "arguments_digest": digest(arguments), "policy": policy})
        return request

    def latest(self, key: str, reason: str) -> _Request | None:
        matches = [r for r in self.requests.values() if r.call_key == key and r.reason == reason]
        return matches[-1] if matches else None

    def model_steps(self, task: str) -> int:
        return sum(1 for e in self.store.events(self.run_id)
                   if e.kind == "model.called" and e.data.get("task") == task)


class ReplayStore(MemoryStore):
    """The in-memory store, writing the same events as the Django store does."""

    def __init__(self) -> None:
        super().__init__()
        self.state: _State | None = None

    def set_run_status(self, run_id: str, status: str, *, result: Any = None, error: str = "",
                       reason: str = "") -> None:
        with self._lock:
            run = self.runs[run_id]
            old = run.snapshot.status
            new = check_run_transition(old, status)
            run.snapshot.status = new.value
            data: dict[str, Any] = {"from": old, "to": new.value}
            if reason:
                data["reason"] = reason
            if error:
                data["error"] = error
                run.error = error
            if result is not None:
                data["result"] = result
                run.result = result
            self.record(run_id, "run.state", data)

    def finish_task(self, run_id: str, key: str, status: str, *, output: Any = None,
                    error: str = "", events: list[tuple[str, dict[str, Any]]] | None = None,
                    escalation: Mapping[str, Any] | None = None, lease: str = "") -> None:
        with self._lock:
            task = self._task(run_id, key)
            new = check_task_transition(task.status, status)
            for kind, data in events or ():
                self.record(run_id, kind, data)
            task.status, task.output, task.error = new.value, output, error
            data: dict[str, Any] = {"task": key}
            if new == TaskStatus.SUCCEEDED:
                data["output"] = output
            if error:
                data["error"] = error
            self.record(run_id, f"task.{new.value}", data)
            reason = (escalation or {}).get("reason", "")
            if (new == TaskStatus.WAITING and self.state is not None
                    and reason != "awaiting_approval" and reason in Reason.values):
                assert escalation is not None
                self.state.open_request(task=key, call_key=escalation.get("call_key", ""),
                                        reason=reason, tool=escalation.get("tool", ""),
                                        arguments=escalation.get("arguments") or {},
                                        policy=None)


# ---- model, tools and governance that answer from the ledger ---------------------------------


class RecordedModel(Model):
    """Answers each step with the turn the ledger recorded for it; never calls a provider."""

    def __init__(self, ledger: _Ledger, task: str) -> None:
        self.ledger, self.task = ledger, task
        self.provider, self.name = ledger.models.get(task, ("replay", "replay"))

    def complete(self, request: ModelRequest) -> ModelResponse:
        step = sum(1 for m in request.messages if m.role == "assistant") + 1
        recorded = self.ledger.turns.get((self.task, step))
        if recorded is None:
            raise NotRecorded(f"replay: the ledger holds no model turn for task {self.task} "
                              f"step {step}; a replay never calls a model")
        return ModelResponse.from_dict(recorded[1])


def _recorded_fn(state: _State) -> Any:
    def answer(**arguments: Any) -> Any:
        key = state.current_key
        queue = state.ledger.results.get(key)
        if not queue:
            raise _RecordedFailure(f"replay: the ledger holds no result for call {key}; a "
                                   "replay never calls a tool")
        _, outcome = queue.popleft()
        if "error" in outcome:
            raise _RecordedFailure(outcome["error"])
        if "interrupted" in outcome:
            raise (ToolStopped if outcome["stopped"] else ToolTimeout)(outcome["interrupted"])
        return outcome["result"]

    return answer


def _recorded_contract(base: ToolContract, state: _State, **changes: Any) -> ToolContract:
    fields = {"name": base.name, "input_schema": base.input_schema,
              "output_schema": base.output_schema, "idempotent": base.idempotent,
              "description": base.description, "cost_per_call": base.cost_per_call, **changes}
    return ToolContract(fn=_recorded_fn(state), timeout_s=None, **fields)


class ReplayGovernor:
    """Approval gates from the policies in force and the recorded decisions; budget and quota
    refusals where the original attempt was refused (their counters are not replayed)."""

    def __init__(self, state: _State, ctx: TaskContext, policies: Any,
                 risk: Mapping[str, str]) -> None:
        self.state, self.task, self.attempt = state, ctx.spec.key, ctx.attempt
        self.policies, self.risk = policies, risk

    def _refused_here(self, code: str, recorded: bool) -> str:
        end = self.state.ledger.end(self.task, self.attempt)
        return end if end.startswith(code) and not recorded else ""

    def _recorded_in_attempt(self, attempts: Iterable[int]) -> bool:
        return self.attempt in attempts

    def reserve(self, worst: Usage) -> str:
        ledger = self.state.ledger
        if worst.tool_calls:
            outcomes = ledger.results.get(self.state.current_key, ())
            recorded = self._recorded_in_attempt(a for a, _ in outcomes)
        else:
            step = self.state.model_steps(self.task) + 1
            turn = ledger.turns.get((self.task, step))
            recorded = turn is not None and turn[0] == self.attempt
        return self._refused_here("budget_exhausted", recorded)

    def release(self, reserved: Usage) -> None:
        return None

    def admit(self, tool: Any, key: str) -> str:
        self.state.current_key = key
        outcomes = self.state.ledger.results.get(key, ())
        return self._refused_here("quota_exhausted",
                                  self._recorded_in_attempt(a for a, _ in outcomes))

    def gate(self, tool: Any, arguments: Mapping[str, Any], key: str) -> Gate:
        request = self.state.latest(key, Reason.SENSITIVE_ACTION)
        if request is not None:
            if request.status in ("approved", "edited"):
                return Gate("allow", arguments=request.arguments)
            if request.status == "pending":
                return Gate("wait", message=request.id)
            return Gate("deny", message=request.note or f"request {request.status}")
        policy = self.policies(tool.name, self.risk.get(tool.name, ""), dict(arguments))
        if policy is None:
            return ALLOW
        request = self.state.open_request(task=self.task, call_key=key,
                                          reason=Reason.SENSITIVE_ACTION, tool=tool.name,
                                          arguments=dict(arguments), policy=policy)
        return Gate("wait", message=request.id)

    def stopped(self, tool: str | None = None, key: str = "") -> str:
        """A stop (cancel, kill switch, retired agent) where the original attempt stopped:
        at the first call it has no record of."""
        end = self.state.ledger.end(self.task, self.attempt)
        if not end.startswith(("cancelled", "paused", "agent_retired")):
            return ""
        if tool is None:
            turn = self.state.ledger.turns.get((self.task, self.state.model_steps(self.task) + 1))
            recorded = turn is not None and turn[0] == self.attempt
        else:
            outcomes = self.state.ledger.results.get(key, ())
            recorded = self._recorded_in_attempt(a for a, _ in outcomes)
        return "" if recorded else end

    def outcome_decision(self, key: str) -> str:
        request = self.state.latest(key, Reason.UNKNOWN_OUTCOME)
        if request is None or request.status == "pending":
            return ""
        return "rerun" if request.status in ("approved", "edited") else "reject"


def policies_as_of(moment: datetime) -> Any:
    """A policy matcher over the policy versions that were current at ``moment``."""
    versions: dict[int, PolicyVersion] = {}
    for version in PolicyVersion.objects.filter(created_at__lte=moment).select_related(
            "policy").order_by("number"):
        versions[version.policy_id] = version
    live = set(Policy.objects.values_list("pk", flat=True))
    chosen = [v for pk, v in versions.items() if pk in live]

    def match(tool: str, risk_class: str, arguments: Any) -> str | None:
        hits = [v for v in chosen
                if (not v.tool or v.tool == tool) and (not v.risk_class or
                                                        v.risk_class == risk_class)
                and all(_condition_holds(c, arguments) for c in v.conditions or [])]
        if not hits:
            return None
        return str(max(hits, key=lambda v: (v.required_approvals, v.number)))

    return match


# ---- the driver ------------------------------------------------------------------------------


class _Replay:
    def __init__(self, run_id: str, events: list[Recorded], plan: Plan, run_input: Any,
                 hydration_limit: int, policies: Any, process: str = "") -> None:
        self.run_id = run_id
        self.process_actor = f"process:{process}"  # who the plan-level steps act as
        self.ledger = _Ledger(events)
        self.store = ReplayStore()
        self.state = _State(run_id=run_id, ledger=self.ledger, store=self.store)
        self.store.state = self.state
        self.plan, self.policies = plan, policies
        self.store.create_run(run_id, plan, run_input, hydration_limit)
        snapshot = self.store.runs[run_id].snapshot
        for key, output in self.ledger.reused.items():
            if key in snapshot.tasks:
                snapshot.tasks[key].status = TaskStatus.SUCCEEDED
                snapshot.tasks[key].output = output
        self.agents = {a.slug: a for a in Agent.objects.all()}
        rows = list(Tool.objects.all())
        self.risk = {t.slug: t.risk_class for t in rows}
        self.tools: dict[str, ToolContract] = {}
        self.unusable: dict[str, str] = {}
        for row in rows:
            try:
                self.tools[row.slug] = _recorded_contract(_contract_shape(row), self.state)
            except jsonschema.SchemaError as exc:  # production escalated configuration_error
                self.unusable[row.slug] = (f"tool {row.slug!r} has a schema that is not valid "
                                           f"JSON Schema: {exc.message}")
        self.executors = {"tool": self._tool, "function": self._tool, "agent": self._agent}
        self.pending = list(self.ledger.stimuli)
        self.applied: list[Recorded] = []

    # executors -----------------------------------------------------------------------
    def _tool(self, ctx: TaskContext) -> Outcome:
        task = ctx.spec.key
        self.state.current_key = ctx.idempotency_key(0)
        log = StoreLog(self.store, self.run_id, task)
        gate = ToolGate(contracts=contract_lookup(self.tools, self.unusable), log=log,
                        journal=log.journal(),
                        governor=ReplayGovernor(self.state, ctx, self.policies, self.risk),
                        granted=self._granted(task), task=task, actor=self.process_actor,
                        steps=1, watch_grant=False)
        return run_contract_task(ctx, gate)

    def _granted(self, task: str) -> Any:
        """Grants as they were: a call the original run refused is refused again."""
        refused = self.ledger.refused[task]

        def granted(name: str) -> bool:
            if refused and refused[0] == name:
                refused.popleft()
                return False
            return True

        return granted

    def _agent(self, ctx: TaskContext) -> Outcome:
        task = ctx.spec.key
        end = self.ledger.end(task, ctx.attempt)
        if end.startswith("configuration_error"):
            return stopped_outcome(end, key=f"{ctx.run_id}:{task}:configuration:{ctx.attempt}")
        if end.startswith("agent_retired"):
            return Outcome(status=TaskStatus.WAITING, error=end, escalation={
                "reason": "agent_retired", "detail": end,
                "call_key": f"{ctx.run_id}:{task}:retired"})
        agent = self.agents.get(ctx.spec.executor_ref)
        if agent is None:
            return Outcome(status=TaskStatus.FAILED,
                           error=f"no agent named {ctx.spec.executor_ref!r}")
        spec = AgentSpec(slug=agent.slug, instructions=agent.instructions,
                         step_budget=agent.step_budget + self.state.extra_steps[task],
                         token_budget=agent.token_budget or None,
                         max_output_tokens=int(agent.model_params.get("max_tokens", 1024)))
        governor = ReplayGovernor(self.state, ctx, self.policies, self.risk)
        return run_agent(ctx, spec, RecordedModel(self.ledger, task), self.tools,
                         StoreLog(self.store, self.run_id, task), granted=self._granted(task),
                         governor=governor, unusable=self.unusable, watch_grant=False)

    # people's decisions, when the original run received them ---------------------------
    def _due(self, stimulus: Recorded) -> bool:
        before = _streams(e for e in self.ledger.events if e.seq < stimulus.seq)
        now = _streams(_as_recorded(self.store.events(self.run_id)))
        return all(len(now.get(s, [])) >= len(items) for s, items in before.items())

    def _apply(self, stimulus: Recorded) -> None:
        self.pending.remove(stimulus)
        snapshot = self.store.runs[self.run_id].snapshot
        if stimulus.kind == "run.cancel_requested":
            snapshot.cancel_requested = True
            self.store.record(self.run_id, "run.cancel_requested", {})
            for request in self.state.requests.values():
                if request.status == "pending":
                    request.status = "cancelled"
            return
        data = stimulus.data
        if stimulus.kind == "task.requeued":  # a kill switch was released
            task = snapshot.tasks.get(data.get("task", ""))
            if task is not None and task.status == TaskStatus.WAITING:
                self.store.requeue_task(self.run_id, task.key, reason=KILL_SWITCH_RELEASED)
            return
        request = self.state.requests.get(data.get("request", ""))
        if request is None:
            return  # the replay never asked for it; the comparison shows where it differs
        resolution = data.get("resolution") or {}
        request.status = data.get("status", "")
        request.note = resolution.get("note", "")
        if "arguments" in resolution:
            request.arguments = resolution["arguments"]
        action = resolution.get("action")
        task = snapshot.tasks.get(request.task)
        if action == "stop" or task is None or task.status != TaskStatus.WAITING:
            return  # a stop arrives as the run's cancel request
        budget: dict[str, Any] | None = None
        if action == "raise_budget":
            budget = resolution.get("budget", {})
        elif action == "proceed" and request.reason == Reason.STEP_BUDGET_EXHAUSTED:
            agent = self.agents.get(self.plan.by_key()[request.task].executor_ref)
            budget = {"steps": agent.step_budget if agent is not None else 5}
        elif action == "reject" and request.reason != Reason.SENSITIVE_ACTION:
            self.store.finish_task(self.run_id, request.task, TaskStatus.FAILED,
                                   error=f"stopped by a reviewer: {resolution.get('note', '')}")
            return
        if budget is not None:
            self.state.extra_steps[request.task] += int(budget.get("steps", 0))
            self.store.record(self.run_id, "budget.raised", {"task": request.task,
                                                             "raise": budget})
        self.store.requeue_task(self.run_id, request.task,
                                reason=f"approval {request.id} {request.status}")

    def run(self) -> str:
        for _ in range(MAX_ITERATIONS):
            for stimulus in list(self.pending):
                if self._due(stimulus):
                    self._apply(stimulus)
            with self.store.locked(self.run_id) as snapshot:
                queued = [t.key for t in self.plan.tasks
                          if snapshot.tasks[t.key].status == TaskStatus.QUEUED]
            if queued:
                execute(self.store, self.run_id, queued[0], self.executors)
                advance(self.store, self.run_id)
                continue
            result = advance(self.store, self.run_id)
            if result.released:
                continue
            if result.status in RUN_TERMINAL or not self.pending:
                return str(result.status)
            self._apply(self.pending[0])
        raise EngineError(f"the replay did not settle within {MAX_ITERATIONS} steps")


def _contract_shape(tool: Tool) -> ToolContract:
    """A tool row's contract (schemas, idempotency), without its implementation."""
    return ToolContract(name=tool.slug, fn=lambda **_: None, input_schema=tool.input_schema,
                        output_schema=tool.output_schema, idempotent=tool.idempotent,
                        description=tool.description, cost_per_call=tool.cost_per_call)


def _as_recorded(events: Iterable[Any]) -> list[Recorded]:
    return [Recorded(seq=e.seq, kind=e.kind, data=e.data) for e in events]


def ledger_of(run: Run) -> list[Recorded]:
    rows = Event.objects.filter(chain=run.pk).order_by("seq").values_list(
        "seq", "kind", "data", "at")
    return [Recorded(seq=seq, kind=kind, data=data, at=at) for seq, kind, data, at in rows]


def replay(run: Run, *, events: list[Recorded] | None = None,
           plan: Mapping[str, Any] | None = None,
           policies_at: datetime | None = None) -> ReplayResult:
    """Replay ``run`` from its ledger (or from ``events``, e.g. an altered copy) under its pinned
    plan (or ``plan``) and the policies in force when it started (or at ``policies_at``)."""
    original = ledger_of(run) if events is None else list(events)
    parsed = parse_plan(plan if plan is not None else run.process_version.plan)
    replayer = _Replay(str(run.pk), original, parsed, run.input,
                       run.process_version.hydration_limit,
                       policies_as_of(policies_at or run.created_at),
                       process=run.process_version.process.slug)
    error, status = "", ""
    try:
        status = replayer.run()
    except EngineError as exc:
        error = str(exc)
    replayed = _as_recorded(replayer.store.events(str(run.pk)))
    compared, divergence = compare(original, replayed)
    return ReplayResult(run_id=str(run.pk), compared=compared, status=status,
                        divergence=divergence, error=error if divergence is None else "")
