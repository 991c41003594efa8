"""Delegation between agents: the autonomous front end hands work to specialists.

A plan task may name ``delegates: [<agent slug>, ...]``: its agent is then offered one handoff
tool per delegate (``delegate_to_<slug>``). A handoff call does not run anything in the
caller's task. It adds a task to the run's plan, executed by the callee agent under its own
identity and grants, with a budget carved from the caller's; the caller waits (``delegated``,
not counted against the hydration limit) until every task it delegated has ended, and its
next execution receives the callee's handoff envelope (TOML) as the call's result, or the
callee's failure as the call's error. The plan's ``delegation`` limits how deep delegation
may nest (``max_depth``, default 1: a delegated task cannot delegate again) and how many tasks
one task may delegate (``max_fan_out``, default 3); a call beyond them is refused with the
reason, and the agent is told.

Pure (no Django): the live agent task (orchestration/agents.py) and replay
(orchestration/replay/driver.py) both delegate through ``Delegator`` on their own store, so
replay re-derives the same tasks, refusals and results from the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema

from hashchain import canonical_json
from jsonkit import schema_problems
from orchestration.engine.gate import Journal, StepLog, Verdict
from orchestration.engine.governance import Governor, Usage
from orchestration.engine.handoff import HandoffError, envelope_for_output
from orchestration.engine.llm import ToolSpec
from orchestration.engine.plan import Plan, TaskSpec
from orchestration.engine.redaction import redact
from orchestration.engine.states import TASK_TERMINAL, TaskStatus

PREFIX = "delegate_to_"
# The error code of a caller waiting on its delegated tasks.
WAITING = "delegated"
# The reason a caller is requeued with once they have all ended.
WOKEN = "its delegated tasks ended"
REFUSED = "delegation.refused"
DELEGATED = "task.delegated"
DEFAULT_DEPTH = 1
DEFAULT_FAN_OUT = 3
MAX_KEY = 63
# The most tokens a handoff call may ask for (a model's number must fit the budget column).
MAX_TOKENS = 100_000_000

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["task"],
    "additionalProperties": False,
    "properties": {
        "task": {"type": "string", "minLength": 1, "maxLength": 4000,
                 "description": "What the delegate is to do, in full: it sees nothing else "
                                "of your conversation."},
        "context": {"type": "string", "maxLength": 8000,
                    "description": "Facts the delegate needs (what you found so far)."},
        "acceptance": {"type": "array", "maxItems": 10,
                       "items": {"type": "string", "minLength": 1, "maxLength": 500},
                       "description": "Criteria the delegate's answer must meet."},
        "tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS,
                   "description": "Tokens to give the delegate from your own budget."},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(INPUT_SCHEMA)


@dataclass(frozen=True, slots=True)
class Limits:
    max_depth: int = DEFAULT_DEPTH
    max_fan_out: int = DEFAULT_FAN_OUT
    # The budget a delegated task gets when the call asks for none (None: half of what the
    # caller has left when it has a cap, else no cap of its own).
    tokens: int | None = None
    cost: str | None = None

    @classmethod
    def of(cls, plan: Plan) -> Limits:
        d = plan.delegation or {}
        budget = d.get("budget") or {}
        return cls(max_depth=int(d.get("max_depth", DEFAULT_DEPTH)),
                   max_fan_out=int(d.get("max_fan_out", DEFAULT_FAN_OUT)),
                   tokens=budget.get("tokens"),
                   cost=str(budget["cost"]) if budget.get("cost") is not None else None)


def tool_name(slug: str) -> str:
    return f"{PREFIX}{slug}"


def callee(name: str) -> str | None:
    """The agent a handoff tool's name delegates to; None for any other tool."""
    return name[len(PREFIX):] if name.startswith(PREFIX) and len(name) > len(PREFIX) else None


def depth(plan: Plan, key: str) -> int:
    """How deep a task is delegated: 0 for a task of the plan itself."""
    specs, level, seen = plan.by_key(), 0, set()
    spec = specs.get(key)
    while spec is not None and spec.delegated_by and spec.key not in seen:
        seen.add(spec.key)
        level += 1
        spec = specs.get(spec.delegated_by)
    return level


def children(plan: Plan, key: str) -> list[TaskSpec]:
    """The tasks ``key`` delegated, in the order it delegated them."""
    return [t for t in plan.tasks if t.delegated_by == key]


def offered(plan: Plan, spec: TaskSpec) -> list[ToolSpec]:
    """The handoff tools the task's agent is offered: one per delegate, while it may still
    delegate (not at the depth limit)."""
    if not spec.delegates or depth(plan, spec.key) >= Limits.of(plan).max_depth:
        return []
    return [ToolSpec(tool_name(slug), f"Delegate a piece of work to the agent {slug!r}. It "
                     "runs as its own task with its own tools and a share of your budget, "
                     "and its handoff envelope comes back as this call's result.",
                     INPUT_SCHEMA) for slug in spec.delegates]


def refusal(plan: Plan, parent: TaskSpec, slug: str, arguments: Any) -> str:
    """Why this handoff call may not delegate ("" when it may)."""
    if slug not in parent.delegates:
        allowed = ", ".join(parent.delegates) or "no agent"
        return (f"delegation refused: task {parent.key!r} may not delegate to {slug!r} (it "
                f"may delegate to {allowed})")
    problems = schema_problems(_VALIDATOR, arguments, limit=1)
    if problems:
        return (f"delegation refused: the arguments are invalid at {problems[0].at()}: "
                f"{problems[0].message}")
    limits = Limits.of(plan)
    level = depth(plan, parent.key)
    if level + 1 > limits.max_depth:
        return (f"delegation refused: the depth limit is {limits.max_depth} and task "
                f"{parent.key!r} is itself delegated {level} deep")
    made = len(children(plan, parent.key))
    if made >= limits.max_fan_out:
        return (f"delegation refused: the fan-out limit is {limits.max_fan_out} tasks per "
                f"task and {parent.key!r} has delegated {made} already")
    return ""


def child_key(parent: str, taken: set[str]) -> str:
    """A key for the next task ``parent`` delegates: ``<parent>_d<n>``, unique in the plan."""
    n = 1
    while True:
        suffix = f"_d{n}"
        key = parent[:MAX_KEY - len(suffix)] + suffix
        if key not in taken:
            return key
        n += 1


def child_spec(plan: Plan, parent: TaskSpec, slug: str, arguments: Mapping[str, Any],
               call_key: str) -> TaskSpec:
    """The task a handoff call adds to the plan (its budget is the store's to carve)."""
    text = str(arguments["task"])
    spec = text
    if arguments.get("context"):
        spec += f"\n\nContext from {parent.key}:\n{arguments['context']}"
    first = " ".join(text.split())
    title = first if len(first) <= 80 else first[:79] + "…"
    return TaskSpec(key=child_key(parent.key, set(plan.by_key())), executor_type="agent",
                    executor_ref=slug, title=f"{slug}: {title}", spec=spec,
                    acceptance=tuple(arguments.get("acceptance", ())),
                    delegates=tuple(d for d in parent.delegates if d != slug),
                    delegated_by=parent.key, call_key=call_key)


def requested(arguments: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """The budget a handoff call asks for: its ``tokens``, else the process's default."""
    out: dict[str, Any] = {}
    tokens = arguments.get("tokens", limits.tokens)
    if tokens is not None:
        out["tokens"] = int(tokens)
    if limits.cost is not None:
        out["cost"] = limits.cost
    return out


def woken(plan: Plan, tasks: Mapping[str, Any]) -> list[str]:
    """Callers waiting on delegated tasks that have all ended: they go back to the queue.
    ``tasks`` are the run's task snapshots (status and error) by key."""
    waiting = [k for k, t in tasks.items() if t.status == TaskStatus.WAITING
               and (t.error or "").startswith(WAITING + ":")]
    if not waiting:
        return []
    return [k for k in waiting
            if all(tasks[c.key].status in TASK_TERMINAL for c in children(plan, k)
                   if c.key in tasks)]


def owned(plan: Plan) -> set[str]:
    """Delegated tasks: their failure is their caller's to handle, not the run's."""
    return {t.key for t in plan.tasks if t.delegated_by}


@dataclass(frozen=True, slots=True)
class Child:
    key: str
    status: str
    output: Any = None
    error: str = ""


class DelegationStore(Protocol):
    def delegations(self, run_id: str, parent: str) -> tuple[Plan, dict[str, Child]]:
        """The run's current plan and the tasks ``parent`` delegated, by call key."""
        ...

    def delegate(self, run_id: str, parent: str, child: TaskSpec,
                 budget: Mapping[str, Any], *, lease: str = "") -> TaskSpec:
        """Add ``child`` to the run (its plan, its task, its budget carved from the
        caller's), under the run's lock; a call that delegated already gets its task back.
        Returns the task as added. Raises LeaseLost when ``lease`` is given and the caller
        no longer holds it (another worker took the caller over)."""
        ...


@dataclass(slots=True)
class Delegator:
    """Handoff calls of one agent task."""

    store: DelegationStore
    run_id: str
    spec: TaskSpec
    plan: Plan
    log: StepLog
    journal: Journal
    governor: Governor
    actor: str
    secrets: Sequence[str] = ()
    # The caller's lease: a worker that lost it must not delegate (or carve a budget).
    lease: str = ""

    def offered(self) -> list[ToolSpec]:
        return offered(self.plan, self.spec)

    def call(self, key: str, name: str, arguments: Any) -> Verdict:
        recorded = self.journal.results.get(key)
        if recorded is not None:
            if "error" in recorded:
                return Verdict(recorded["error"], True)
            return Verdict(canonical_json(recorded["result"]), False, recorded["result"],
                           arguments=recorded.get("arguments"))
        stop = self.governor.stopped(tool=name, key=key)
        if stop:
            return Verdict(pause=stop)
        slug = callee(name) or ""
        base = {"task": self.spec.key, "actor": self.actor, "tool": name,
                "idempotency_key": key, "arguments": redact(arguments, self.secrets)}
        plan, made = self.store.delegations(self.run_id, self.spec.key)
        child = made.get(key)
        if child is None:
            why = refusal(plan, self.spec, slug, arguments)
            if why:
                self.log.record(REFUSED, {**base, "error": why}, usage=Usage())
                return Verdict(why, True)
            spec = self.store.delegate(
                self.run_id, self.spec.key, child_spec(plan, self.spec, slug, arguments, key),
                requested(arguments, Limits.of(plan)), lease=self.lease)
            return Verdict(pause=f"{WAITING}: waiting on {spec.key} ({slug})")
        if child.status not in TASK_TERMINAL:
            return Verdict(pause=f"{WAITING}: waiting on {child.key} ({slug})")
        if child.status != TaskStatus.SUCCEEDED:
            error = (f"the delegated task {child.key} ({slug}) "
                     f"{'failed' if child.status == TaskStatus.FAILED else 'was cancelled'}: "
                     f"{child.error or 'no reason given'}")
            self.log.record("tool.failed", {**base, "error": error}, usage=Usage())
            return Verdict(error, True)
        try:
            envelope = envelope_for_output(child.key, child.output)
        except HandoffError as exc:
            error = f"the delegated task {child.key} ({slug}) handed back {exc}"
            self.log.record("tool.failed", {**base, "error": error}, usage=Usage())
            return Verdict(error, True)
        result = {"task": child.key, "agent": slug, "summary": envelope.summary,
                  "key_facts": envelope.key_facts, "envelope": envelope.to_toml()}
        self.log.record("tool.called", {**base, "result": result, "latency_ms": 0},
                        usage=Usage(tool_calls=1))
        return Verdict(canonical_json(result), False, result, arguments=base["arguments"])
