"""The run loop: schedule ready tasks within the hydration limit, execute them, checkpoint.

``advance`` and ``execute`` are the two units of work. Whatever drives them (a Celery worker,
the standalone thread pool, the local driver in tests) calls ``advance`` after a run is created
and after every task finishes, and ``execute`` for every task that ``advance`` released.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema

from jsonkit import schema_problems
from orchestration.engine import delegation
from orchestration.engine.contracts import ToolContract, ToolRegistry
from orchestration.engine.errors import EngineError
from orchestration.engine.gate import StoreLog, ToolGate
from orchestration.engine.governance import Governor, Ungoverned
from orchestration.engine.plan import AUDIT, RUN_CHECK_KEY, TaskSpec
from orchestration.engine.redaction import redact
from orchestration.engine.refs import resolve
from orchestration.engine.states import (
    RUN_TERMINAL,
    TASK_ACTIVE,
    TASK_TERMINAL,
    RunStatus,
    TaskStatus,
)
from orchestration.engine.store import RunSnapshot, RunStore, TaskSnapshot
from orchestration.engine.tracing import task_outcome, task_span


@dataclass(slots=True)
class TaskContext:
    run_id: str
    spec: TaskSpec
    attempt: int
    run_input: Mapping[str, Any]
    dep_outputs: Mapping[str, Any]
    # The store, for executors that checkpoint before a side effect (tool.intent) and read
    # back what an earlier attempt recorded; None where nothing is durable.
    store: RunStore | None = None
    # This worker's lease on the task: checkpoints are refused once another worker took over.
    lease: str = ""

    def idempotency_key(self, call_index: int = 0) -> str:
        return f"{self.run_id}:{self.spec.key}:{call_index}"


@dataclass(slots=True)
class Outcome:
    """What an executor produced: an output or an error, and the ledger events of the step."""

    output: Any = None
    error: str = ""
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status: str = TaskStatus.SUCCEEDED
    # For a waiting outcome: why people are needed (reason code, detail, the paused call).
    escalation: Mapping[str, Any] | None = None


class Executor(Protocol):
    def __call__(self, ctx: TaskContext) -> Outcome: ...


def stopped_outcome(reason: str, *, key: str, tool: str = "", arguments: Any = None) -> Outcome:
    """The outcome of a task that cannot go on: ``reason`` starts with its code. A cancelled
    run ends the task; anything else parks it for people (an escalation request opens where
    the code is one people decide, e.g. ``unknown_outcome``; ``awaiting_approval`` has its
    request already, ``paused`` waits for its kill switch to be released)."""
    code = reason.split(":", 1)[0]
    if code == "cancelled":
        return Outcome(status=TaskStatus.CANCELLED, error=reason)
    return Outcome(status=TaskStatus.WAITING, error=reason,
                   escalation={"reason": code, "detail": reason, "call_key": key, "tool": tool,
                               "arguments": arguments if arguments is not None else {}})


# Builds the gate a plan-level task's call goes through: the acting identity (an agent loop
# has its own; a process runs its deterministic steps as its service identity), its grants,
# the governor and the step log. The engine's own default lets everything through.
GateFactory = Callable[[TaskContext], ToolGate]


def run_contract_task(ctx: TaskContext, gate: ToolGate) -> Outcome:
    """A ``tool`` or ``function`` task: resolve its arguments, then one call through the gate
    (the same gate an agent's tool calls pass)."""
    spec = ctx.spec
    key = ctx.idempotency_key(0)
    try:
        args = resolve(dict(spec.args), run_input=ctx.run_input, outputs=ctx.dep_outputs)
    except EngineError as exc:
        return Outcome(status=TaskStatus.FAILED, error=str(exc))
    verdict = gate.call(key, spec.executor_ref, args)
    if verdict.pause:
        return stopped_outcome(verdict.pause, key=key, tool=spec.executor_ref,
                               arguments=redact(args, gate.secrets))
    if verdict.is_error:
        return Outcome(status=TaskStatus.FAILED, error=verdict.error)
    return Outcome(output=verdict.result)


class ContractExecutor:
    """Runs ``tool`` and ``function`` tasks from a registry through the gate, with
    ``governor`` (ungoverned by default: the engine's own tests and benchmarks)."""

    def __init__(self, registry: ToolRegistry, governor: Governor | None = None) -> None:
        self.registry = registry
        self.governor = governor or Ungoverned()

    def _contract(self, name: str) -> ToolContract | None:
        return self.registry.get(name) if name in self.registry else None

    def __call__(self, ctx: TaskContext) -> Outcome:
        if ctx.store is None:
            raise EngineError("tool and function tasks need a store to record their calls")
        log = StoreLog(ctx.store, ctx.run_id, ctx.spec.key, ctx.lease)
        gate = ToolGate(contracts=self._contract, log=log, journal=log.journal(),
                        governor=self.governor, granted=lambda name: True, task=ctx.spec.key,
                        actor="system", steps=1)
        return run_contract_task(ctx, gate)


def default_executors(registry: ToolRegistry) -> dict[str, Executor]:
    contract = ContractExecutor(registry)
    return {"tool": contract, "function": contract}


@dataclass(slots=True)
class AdvanceResult:
    released: list[str]  # queued for any worker
    status: str
    # Released tasks the caller claimed in the same unit of work, to run itself.
    claimed: list[TaskSnapshot] = field(default_factory=list)


def advance(store: RunStore, run_id: str, *, take: int = 0) -> AdvanceResult:
    """One scheduling step under the run's lock. Returns the task keys to dispatch; with
    ``take``, up to that many of them are claimed for the caller in the same step."""
    with store.locked(run_id) as run:
        return _schedule(store, run, take)


def finish(store: RunStore, run_id: str, key: str, outcome: Outcome, *, lease: str = "",
           take: int = 0) -> AdvanceResult:
    """Record a task's outcome and schedule what follows it, as one step under the run's lock:
    a finished task releases its ready successors in the same unit of work, and with ``take``
    the caller claims one to run next without a round trip through the broker.

    Raises LeaseLost when the task was taken over meanwhile: the outcome is not recorded."""
    with store.locked(run_id) as run:
        store.finish_task(run_id, key, outcome.status, output=outcome.output,
                          error=outcome.error, events=outcome.events,
                          escalation=outcome.escalation, lease=lease)
        task = run.tasks[key]
        task.status, task.output, task.error = outcome.status, outcome.output, outcome.error
        return _schedule(store, run, take)


def _schedule(store: RunStore, run: RunSnapshot, take: int) -> AdvanceResult:
    run_id = run.run_id
    status = RunStatus(run.status)
    if status in RUN_TERMINAL:
        return AdvanceResult([], status)
    if run.cancel_requested:
        _cancel(store, run)
        return AdvanceResult([], RunStatus.CANCELLED)
    if run.plan.planning:
        return AdvanceResult([], status)  # no plan accepted yet: the planner's (planning.py)
    if status in (RunStatus.PENDING, RunStatus.QUEUED):
        if status == RunStatus.PENDING:
            store.set_run_status(run_id, RunStatus.QUEUED)
        store.set_run_status(run_id, RunStatus.RUNNING)
        status = RunStatus.RUNNING
    # Callers whose delegated tasks have all ended go back to the queue (dispatched below).
    woken = delegation.woken(run.plan, run.tasks) if status in (
        RunStatus.RUNNING, RunStatus.WAITING, RunStatus.VERIFYING) else []
    for key in woken:
        store.requeue_task(run_id, key, reason=delegation.WOKEN)
        run.tasks[key].status = TaskStatus.QUEUED
    statuses = run.statuses()
    if status == RunStatus.WAITING:
        # A person's decision put work back in the queue (or took it over): carry on.
        if any(s in TASK_ACTIVE for s in statuses.values()) or not any(
                s == TaskStatus.WAITING for s in statuses.values()):
            store.set_run_status(run_id, RunStatus.RUNNING, reason="resumed")
            status = RunStatus.RUNNING
        else:
            return AdvanceResult([], status)
    if status not in (RunStatus.RUNNING, RunStatus.VERIFYING):
        return AdvanceResult([], status)

    # A delegated task's failure is its caller's to handle (the handoff call's error).
    owned = delegation.owned(run.plan)
    failed = [k for k, s in statuses.items() if s == TaskStatus.FAILED and k not in owned]
    if failed and not any(s in TASK_ACTIVE for s in statuses.values()):
        errors = "; ".join(f"{k}: {run.tasks[k].error}" for k in failed)
        for key, s in statuses.items():
            if s == TaskStatus.PENDING:
                store.finish_task(run_id, key, TaskStatus.CANCELLED,
                                  error="an upstream task failed")
        store.set_run_status(run_id, RunStatus.FAILED, error=errors)
        return AdvanceResult([], RunStatus.FAILED)
    if failed:
        return AdvanceResult([], status)  # let active tasks land before failing the run

    if all(s == TaskStatus.SUCCEEDED or (k in owned and s in TASK_TERMINAL)
           for k, s in statuses.items()):
        outputs = {k: t.output for k, t in run.tasks.items()}
        if run.plan.result:
            result = resolve(dict(run.plan.result), run_input=run.input, outputs=outputs,
                             strict=False)
        else:
            result = outputs
        broken = result_problem(run.plan.result_schema, result)
        if broken:
            store.set_run_status(run_id, RunStatus.FAILED, result=result, error=broken)
            return AdvanceResult([], RunStatus.FAILED)
        store.set_run_status(run_id, RunStatus.SUCCEEDED, result=result)
        return AdvanceResult([], RunStatus.SUCCEEDED)

    active = sum(1 for s in statuses.values() if s in TASK_ACTIVE)
    slots = max(0, run.hydration_limit - active)
    released = run.plan.ready(statuses)[:slots]
    # A store may release and claim in one write (the tasks this caller runs itself).
    release_and_claim = getattr(store, "release_and_claim", None)
    claimed: list[TaskSnapshot] = []
    for key in released:
        if len(claimed) < take and release_and_claim is not None:
            claimed.append(release_and_claim(run_id, key))
            run.tasks[key].status = TaskStatus.RUNNING
            continue
        store.release_task(run_id, key)
        run.tasks[key].status = TaskStatus.QUEUED
    if not released and not active:
        waiting = [k for k, s in statuses.items() if s == TaskStatus.WAITING]
        if waiting:
            reasons = "; ".join(f"{k}: {run.tasks[k].error}" for k in waiting)
            store.set_run_status(run_id, RunStatus.WAITING, reason=reasons)
            return AdvanceResult([], RunStatus.WAITING)
    for key in released[len(claimed):take]:
        claim = store.claim_task(run_id, key)
        if claim is not None:
            run.tasks[key].status = TaskStatus.RUNNING
            claimed.append(claim)
    if status == RunStatus.RUNNING and _verifying(run):
        store.set_run_status(run_id, RunStatus.VERIFYING, reason="every task is done; the "
                                                                "run's check is under way")
        status = RunStatus.VERIFYING
    mine = {c.key for c in claimed}
    return AdvanceResult([*woken, *(k for k in released if k not in mine)], status, claimed)


def _verifying(run: RunSnapshot) -> bool:
    """Whether all that is left of the run is its own check (the plan's ``run_check``)."""
    if RUN_CHECK_KEY not in run.tasks:
        return False  # most plans have none: no walk over the tasks on every step
    specs = run.plan.by_key()
    left = [k for k, t in run.tasks.items() if t.status != TaskStatus.SUCCEEDED]
    return bool(left) and all(specs[k].executor_type == AUDIT and t.status in TASK_ACTIVE
                              for k, t in ((k, run.tasks[k]) for k in left))


def result_problem(schema: Mapping[str, Any], result: Any) -> str:
    """Why a run's result breaks the process's result contract ("" when it keeps it)."""
    if not schema:
        return ""
    problems = schema_problems(jsonschema.Draft202012Validator(dict(schema)), result, limit=1)
    if not problems:
        return ""
    return f"result_contract: the result breaks the process's result schema at " \
           f"{problems[0].at()}: {problems[0].message}"


def _cancel(store: RunStore, run: Any) -> None:
    for key, task in run.tasks.items():
        if task.status in (TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.WAITING):
            store.finish_task(run.run_id, key, TaskStatus.CANCELLED, error="run cancelled")
    store.set_run_status(run.run_id, RunStatus.CANCELLED, reason="cancel requested")


POISON_CRASHES = 3


def run_claimed(store: RunStore, run_id: str, claim: TaskSnapshot,
                executors: Mapping[str, Executor], *,
                poison_after: int = POISON_CRASHES, process: str = "") -> Outcome:
    """Run a task this worker holds. A task whose workers keep dying is not run again: after
    ``poison_after`` lost workers it is parked for a person (``poison_task``)."""
    if poison_after and claim.crashes >= poison_after:
        reason = (f"poison_task: {claim.key} was running on {claim.crashes} workers that were "
                  f"lost before it finished; it is not retried again until a person decides")
        return Outcome(status=TaskStatus.WAITING, error=reason, escalation={
            "reason": "poison_task", "detail": reason,
            "call_key": f"{run_id}:{claim.key}:poison:{claim.attempts}"})
    spec, run_input, dep_outputs = store.task_inputs(run_id, claim.key)
    ctx = TaskContext(run_id=run_id, spec=spec, attempt=claim.attempts,
                      run_input=run_input, dep_outputs=dep_outputs, store=store,
                      lease=claim.lease)
    executor = executors.get(spec.executor_type)
    if executor is None:
        return Outcome(status=TaskStatus.FAILED,
                       error=f"no executor for tasks of type {spec.executor_type!r}")
    # The task's span is a child of the run's trace (engine/tracing.py), in whichever worker.
    with task_span(run_id, claim.key, executor_type=spec.executor_type,
                   executor_ref=spec.executor_ref, attempt=claim.attempts,
                   process=process) as span:
        outcome = executor(ctx)
        task_outcome(span, outcome.status, outcome.error, outcome.escalation)
    return outcome


def execute(store: RunStore, run_id: str, key: str, executors: Mapping[str, Executor]) -> bool:
    """Run one released task. Returns False when it was not ours to run (double delivery)."""
    claimed = store.claim_task(run_id, key)
    if claimed is None:
        return False
    outcome = run_claimed(store, run_id, claimed, executors)
    store.finish_task(run_id, key, outcome.status, output=outcome.output, error=outcome.error,
                      events=outcome.events, escalation=outcome.escalation, lease=claimed.lease)
    return True


def recover(store: RunStore, run_id: str, stale_keys: list[str]) -> None:
    """Tasks a dead worker left running go back to the queue; the caller decides staleness."""
    for key in stale_keys:
        store.requeue_task(run_id, key, reason="worker lost before the task finished")
