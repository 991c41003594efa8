"""Stand-ins that answer from the ledger: the model, the tools, the governor and the store.

None of them calls out: a model turn or tool result the ledger does not hold fails the step, and
approval gates come from the policies in force and the people's recorded decisions, decided by
the same rules (approvals/rules.py, orchestration/rules.py) the live run was governed by.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from approvals import rules as policy_rules
from approvals.models import Policy, PolicyVersion, Reason
from approvals.services import digest
from orchestration import rules
from orchestration.engine.contracts import ToolContract
from orchestration.engine.errors import ToolStopped, ToolTimeout
from orchestration.engine.gate import Journal
from orchestration.engine.governance import ALLOW, Gate, Usage
from orchestration.engine.llm import Model, ModelRequest, ModelResponse, ProviderError
from orchestration.engine.runner import TaskContext
from orchestration.engine.states import TaskStatus, check_run_transition, check_task_transition
from orchestration.engine.store import MemoryEvent, MemoryStore, RunSnapshot
from orchestration.replay import comparison
from orchestration.replay.ledger import Ledger, Stimuli


class NotRecorded(ProviderError):
    """The replay needed a model turn the ledger does not hold (it never calls a provider)."""


class _RecordedFailure(ToolTimeout):
    """A recorded tool error, raised again with its exact message (passes through contracts)."""


@dataclass(slots=True)
class Request:
    """The replay's twin of an approval request."""

    id: str
    task: str
    call_key: str
    reason: str
    status: str = "pending"
    arguments: Any = None
    note: str = ""
    output: Any = None  # a person's response (human tasks, questions)


@dataclass(slots=True)
class State:
    run_id: str
    ledger: Ledger
    store: ReplayStore
    current_key: str = ""
    requests: dict[str, Request] = field(default_factory=dict)
    newest: dict[tuple[str, str], Request] = field(default_factory=dict)
    extra_steps: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    opened: int = 0

    def open_request(self, *, task: str, call_key: str, reason: str, tool: str,
                     arguments: Any, policy: str | None) -> Request:
        """Open the replay's twin of a request: it takes the id of the original one the
        same task opened next, so the people's recorded decisions apply to it."""
        queue = self.ledger.requests[task]
        original = queue.popleft() if queue else None
        self.opened += 1
        rid = original["request"] if original else f"replay-{self.opened}"
        request = Request(id=rid, task=task, call_key=call_key, reason=reason,
                          arguments=arguments)
        self.requests[rid] = request
        self.newest[(call_key, reason)] = request
        self.store.record(self.run_id, "approval.requested", {
            "request": rid, "task": task, "reason": reason, "tool": tool,
            "arguments": arguments, "arguments_digest": digest(arguments), "policy": policy})
        return request

    def latest(self, key: str, reason: str) -> Request | None:
        """The newest request about call ``key`` for ``reason``."""
        return self.newest.get((key, reason))

    def model_steps(self, task: str) -> int:
        return self.store.model_calls[task]


class ReplayStore(MemoryStore):
    """The in-memory store of one run, writing the same events as the Django store does, and
    counting the compared ones as it writes them (for Stimuli), the model turns of each task
    and each task's events (its journal)."""

    def __init__(self) -> None:
        super().__init__()
        self.state: State | None = None
        self.stimuli: Stimuli | None = None
        self.model_calls: dict[str, int] = defaultdict(int)
        self.task_events: dict[str, list[MemoryEvent]] = defaultdict(list)  # one run's

    def journal(self, run_id: str, key: str) -> Any:
        """What the task's calls recorded so far, from its own events (not the whole run's)."""
        with self._lock:
            return Journal.fold((e.kind, e.data) for e in self.task_events[key])

    def record(self, run_id: str, kind: str, data: dict[str, Any], *,
               actor: str = "system", lease: str = "") -> None:
        with self._lock:
            super().record(run_id, kind, data, actor=actor, lease=lease)
            task = data.get("task")
            if task:
                self.task_events[task].append(self.runs[run_id].events[-1])
            if kind == "model.called":
                self.model_calls[data.get("task", "")] += 1
            if self.stimuli is not None:
                stream = comparison.stream_of(kind, data)
                if stream is not None:
                    self.stimuli.recorded(stream)

    @contextmanager
    def locked(self, run_id: str) -> Iterator[RunSnapshot]:
        """The run's snapshot as of now, like the engine's store gives it, but sharing the plan
        and the task snapshots with the store (the scheduler writes to a task only the status
        the store has just given it): deep-copying them made every scheduling step cost as much
        as the run is long."""
        with self._lock:
            snapshot = self.runs[run_id].snapshot
            yield replace(snapshot, tasks=dict(snapshot.tasks))

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


class RecordedModel(Model):
    """Answers each step with the turn the ledger recorded for it; never calls a provider."""

    def __init__(self, ledger: Ledger, task: str) -> None:
        self.ledger, self.task = ledger, task
        self.provider, self.name = ledger.models.get(task, ("replay", "replay"))

    def complete(self, request: ModelRequest) -> ModelResponse:
        step = sum(1 for m in request.messages if m.role == "assistant") + 1
        recorded = self.ledger.turns.get((self.task, step))
        if recorded is None:
            raise NotRecorded(f"replay: the ledger holds no model turn for task {self.task} "
                              f"step {step}; a replay never calls a model")
        return ModelResponse.from_dict(recorded[1])


class RecordedAuditor(Model):
    """The auditor of a task's answers, answering with the audits the ledger recorded, in
    order (the n-th audit of a task is the one whose conversation holds n-1 earlier ones)."""

    def __init__(self, ledger: Ledger, task: str) -> None:
        self.ledger, self.task = ledger, task
        self.provider = self.name = "replay"

    def complete(self, request: ModelRequest) -> ModelResponse:
        index = sum(1 for m in request.messages if m.role == "assistant")
        audits = self.ledger.audits.get(self.task, [])
        if index >= len(audits):
            raise NotRecorded(f"replay: the ledger holds no audit {index + 1} of task "
                              f"{self.task}; a replay never calls a model")
        return ModelResponse.from_dict(audits[index])


def _recorded_fn(state: State) -> Any:
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


def recorded_contract(base: ToolContract, state: State, **changes: Any) -> ToolContract:
    """``base``'s contract, its implementation answering from the ledger."""
    fields = {"name": base.name, "input_schema": base.input_schema,
              "output_schema": base.output_schema, "idempotent": base.idempotent,
              "description": base.description, "cost_per_call": base.cost_per_call, **changes}
    return ToolContract(fn=_recorded_fn(state), timeout_s=None, **fields)


class ReplayGovernor:
    """Approval gates from the policies in force and the recorded decisions; budget and quota
    refusals where the original attempt was refused (their counters are not replayed)."""

    def __init__(self, state: State, ctx: TaskContext, policies: Any,
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
        if tool.name == rules.ASK_HUMAN:  # the same rule as the live governor's
            asked = self.state.latest(key, Reason.QUESTION)
            if asked is None:
                asked = self.state.open_request(task=self.task, call_key=key,
                                                reason=Reason.QUESTION, tool=tool.name,
                                                arguments=dict(arguments), policy=None)
                return Gate("wait", message=asked.id)
            return rules.gate_from_question(asked.status, arguments, asked.output, asked.note,
                                            asked.id)
        request = self.state.latest(key, Reason.SENSITIVE_ACTION)
        if request is not None:
            return rules.gate_from_request(request.status, request.arguments, request.note,
                                           request.id)
        policy = self.policies(tool.name, self.risk.get(tool.name, ""), dict(arguments))
        if policy is None:
            return ALLOW
        request = self.state.open_request(task=self.task, call_key=key,
                                          reason=Reason.SENSITIVE_ACTION, tool=tool.name,
                                          arguments=dict(arguments), policy=policy)
        return Gate("wait", message=request.id)

    def begin_model_call(self, worst: Usage) -> str:
        return self.stopped() or self.reserve(worst)

    def ahead_of_tool(self, tool: str, key: str, worst: Usage) -> Any:
        return None  # answered from the ledger, call by call

    def ahead_of_model(self, worst: Usage) -> Any:
        return None

    def release_ahead(self) -> None:
        return None

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
        return rules.outcome_from_request(request.status if request is not None else None)

    def qc_decision(self, key: str) -> tuple[str, str]:
        request = (self.state.latest(key, Reason.QC_MISMATCH)
                   or self.state.latest(key, Reason.LOW_CONFIDENCE))
        if request is None:
            return rules.qc_from_request(None, "")
        return rules.qc_from_request(request.status, request.note)


def policies_as_of(moment: datetime) -> Any:
    """A policy matcher over the policy versions that were current at ``moment``: the
    strictest match by the live matcher's rule (approvals/rules.py), named as in the ledger."""
    versions: dict[int, PolicyVersion] = {}
    for version in PolicyVersion.objects.filter(created_at__lte=moment).select_related(
            "policy").order_by("number"):
        versions[version.policy_id] = version
    live = set(Policy.objects.values_list("pk", flat=True))
    chosen = [v for pk, v in versions.items() if pk in live]

    def match(tool: str, risk_class: str, arguments: Any) -> str | None:
        winner = policy_rules.strictest_match(chosen, tool, risk_class, arguments)
        return str(winner) if winner is not None else None

    return match
