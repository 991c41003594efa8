"""The store interface the engine checkpoints through, and an in-memory implementation.

Every write method is atomic on its own and appends its ledger event in the same unit of work.
``locked`` gives exclusive access to one run for the duration of a scheduling step.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from hashchain import GENESIS, canonical_json, chain_hash
from orchestration.engine.delegation import DELEGATED, Child, child_key, children, depth
from orchestration.engine.plan import Plan, TaskSpec
from orchestration.engine.states import TaskStatus, check_run_transition, check_task_transition


@dataclass(slots=True)
class TaskSnapshot:
    key: str
    status: str
    attempts: int = 0
    output: Any = None
    error: str = ""
    # For a claim: the fencing token of this worker's lease, and how many workers the task
    # was lost on before (a takeover after a lease expired counts one).
    lease: str = ""
    crashes: int = 0


@dataclass(slots=True)
class RunSnapshot:
    run_id: str
    status: str
    plan: Plan
    input: Mapping[str, Any]
    hydration_limit: int
    tasks: dict[str, TaskSnapshot]
    cancel_requested: bool = False

    def statuses(self) -> dict[str, str]:
        return {k: t.status for k, t in self.tasks.items()}


class RunStore(Protocol):
    def locked(self, run_id: str) -> Any:  # a context manager yielding a RunSnapshot
        ...

    def set_run_status(
        self, run_id: str, status: str, *, result: Any = None, error: str = "", reason: str = ""
    ) -> None: ...

    def release_task(self, run_id: str, key: str) -> None: ...

    def claim_task(self, run_id: str, key: str) -> TaskSnapshot | None:
        """queued → running, atomically; None when another worker already has it."""
        ...

    def task_inputs(
        self, run_id: str, key: str
    ) -> tuple[TaskSpec, Mapping[str, Any], dict[str, Any]]:
        """The task's spec, the run input and the outputs of the task's dependencies."""
        ...

    def finish_task(
        self,
        run_id: str,
        key: str,
        status: str,
        *,
        output: Any = None,
        error: str = "",
        events: list[tuple[str, dict[str, Any]]] = ...,
        escalation: Mapping[str, Any] | None = None,
        lease: str = "",
    ) -> None:
        """Raises LeaseLost when ``lease`` is given and the task no longer holds it."""
        ...

    def requeue_task(self, run_id: str, key: str, *, reason: str) -> None: ...

    def record(self, run_id: str, kind: str, data: dict[str, Any], *,
               actor: str = "system", lease: str = "") -> None:
        """Raises LeaseLost when ``lease`` is given and the task no longer holds it."""
        ...


@dataclass(slots=True)
class MemoryEvent:
    run_id: str
    seq: int
    kind: str
    actor: str
    data: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass
class _MemRun:
    snapshot: RunSnapshot
    result: Any = None
    error: str = ""
    events: list[MemoryEvent] = field(default_factory=list)
    usage_steps: int = 0
    usage_tool_calls: int = 0
    usage_tokens: int = 0


class MemoryStore:
    """A thread-safe in-process store for the engine's own tests and benchmarks."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.runs: dict[str, _MemRun] = {}

    def create_run(
        self, run_id: str, plan: Plan, run_input: Mapping[str, Any], hydration_limit: int = 3
    ) -> None:
        snap = RunSnapshot(
            run_id=run_id,
            status="pending",
            plan=plan,
            input=dict(run_input),
            hydration_limit=hydration_limit,
            tasks={t.key: TaskSnapshot(key=t.key, status="pending") for t in plan.tasks},
        )
        with self._lock:
            self.runs[run_id] = _MemRun(snapshot=snap)
            self.record(run_id, "run.created", {"input": dict(run_input)})

    @contextmanager
    def locked(self, run_id: str) -> Iterator[RunSnapshot]:
        with self._lock:
            yield copy.deepcopy(self.runs[run_id].snapshot)

    def record(self, run_id: str, kind: str, data: dict[str, Any], *,
               actor: str = "system", lease: str = "") -> None:
        with self._lock:
            events = self.runs[run_id].events
            prev = events[-1].hash if events else GENESIS
            seq = len(events) + 1
            body = canonical_json({"run": run_id, "seq": seq, "kind": kind, "actor": actor,
                                   "data": data})
            events.append(MemoryEvent(run_id, seq, kind, actor, copy.deepcopy(data), prev,
                                      chain_hash(prev, body)))

    def set_run_status(
        self, run_id: str, status: str, *, result: Any = None, error: str = "", reason: str = ""
    ) -> None:
        with self._lock:
            run = self.runs[run_id]
            old = run.snapshot.status
            check_run_transition(old, status)
            run.snapshot.status = status
            if result is not None:
                run.result = result
            if error:
                run.error = error
            data: dict[str, Any] = {"from": old, "to": status}
            if reason:
                data["reason"] = reason
            if error:
                data["error"] = error
            self.record(run_id, "run.state", data)

    def _task(self, run_id: str, key: str) -> TaskSnapshot:
        return self.runs[run_id].snapshot.tasks[key]

    def release_task(self, run_id: str, key: str) -> None:
        with self._lock:
            task = self._task(run_id, key)
            check_task_transition(task.status, TaskStatus.QUEUED)
            task.status = TaskStatus.QUEUED
            self.record(run_id, "task.queued", {"task": key})

    def claim_task(self, run_id: str, key: str) -> TaskSnapshot | None:
        with self._lock:
            task = self._task(run_id, key)
            if task.status != TaskStatus.QUEUED:
                return None
            task.status = TaskStatus.RUNNING
            task.attempts += 1
            self.record(run_id, "task.started", {"task": key, "attempt": task.attempts})
            return copy.deepcopy(task)

    def task_inputs(
        self, run_id: str, key: str
    ) -> tuple[TaskSpec, Mapping[str, Any], dict[str, Any]]:
        with self._lock:
            snap = self.runs[run_id].snapshot
            spec = snap.plan.by_key()[key]
            return spec, copy.deepcopy(snap.input), {
                dep: copy.deepcopy(snap.tasks[dep].output) for dep in spec.depends_on
            }

    def finish_task(
        self,
        run_id: str,
        key: str,
        status: str,
        *,
        output: Any = None,
        error: str = "",
        events: list[tuple[str, dict[str, Any]]] | None = None,
        escalation: Mapping[str, Any] | None = None,
        lease: str = "",
    ) -> None:
        with self._lock:
            task = self._task(run_id, key)
            if escalation:
                self.record(run_id, "task.escalated", {"task": key, **escalation})
            check_task_transition(task.status, status)
            for kind, data in events or ():
                self.record(run_id, kind, data)
            task.status = status
            task.output = copy.deepcopy(output)
            task.error = error
            data = {"task": key}
            if status == TaskStatus.SUCCEEDED:
                data["output"] = output
            if error:
                data["error"] = error
            self.record(run_id, f"task.{status}", data)

    def requeue_task(self, run_id: str, key: str, *, reason: str) -> None:
        with self._lock:
            task = self._task(run_id, key)
            check_task_transition(task.status, TaskStatus.QUEUED)
            task.status = TaskStatus.QUEUED
            self.record(run_id, "task.requeued", {"task": key, "reason": reason})

    def delegations(self, run_id: str, parent: str) -> tuple[Plan, dict[str, Any]]:
        with self._lock:
            snap = self.runs[run_id].snapshot
            made = {}
            for spec in children(snap.plan, parent):
                task = snap.tasks[spec.key]
                made[spec.call_key] = Child(spec.key, task.status, copy.deepcopy(task.output),
                                            task.error)
            return snap.plan, made

    def delegate(self, run_id: str, parent: str, child: TaskSpec,
                 budget: Mapping[str, Any], *, lease: str = "") -> TaskSpec:
        """Add a delegated task (this store keeps no budgets: ``budget`` is recorded only)."""
        with self._lock:
            snap = self.runs[run_id].snapshot
            for spec in children(snap.plan, parent):
                if spec.call_key == child.call_key:
                    return spec
            child = replace(child, key=child_key(parent, set(snap.plan.by_key())))
            snap.plan = snap.plan.with_task(child)
            snap.tasks[child.key] = TaskSnapshot(key=child.key, status=TaskStatus.PENDING)
            self.record(run_id, DELEGATED, {
                "task": parent, "child": child.key, "agent": child.executor_ref,
                "call": child.call_key, "depth": depth(snap.plan, child.key),
                "budget": dict(budget)})
            return child

    def record_step(self, run_id: str, kind: str, data: dict[str, Any], *, usage: Any,
                    reserved: Any = None, lease: str = "",
                    transcript: list[dict[str, Any]] | None = None,
                    ahead: Any = None) -> None:
        """Transcripts are not kept in memory: nothing here reads them back. Budgets are not
        either, so checks run ahead (``ahead``) are left to be asked as usual."""
        with self._lock:
            self.record(run_id, kind, data, actor=data.get("actor", "system"))
            run = self.runs[run_id]
            run.usage_steps += usage.steps
            run.usage_tool_calls += usage.tool_calls
            run.usage_tokens += usage.tokens_in + usage.tokens_out

    def journal(self, run_id: str, key: str) -> Any:
        from orchestration.engine.gate import Journal

        with self._lock:
            return Journal.fold((e.kind, e.data) for e in self.runs[run_id].events
                                if e.data.get("task") == key)

    # helpers for tests
    def result(self, run_id: str) -> Any:
        return self.runs[run_id].result

    def events(self, run_id: str) -> list[MemoryEvent]:
        return list(self.runs[run_id].events)
