"""Run and task state machines: every transition is checked here and nowhere else."""

from __future__ import annotations

from enum import StrEnum

from orchestration.engine.errors import TransitionError


class RunStatus(StrEnum):
    PENDING = "pending"
    PLANNING = "planning"
    AWAITING_PLAN_APPROVAL = "awaiting_plan_approval"
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    VERIFYING = "verifying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ESCALATED = "escalated"
    CANCELLED = "cancelled"


class TaskStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


RUN_TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
TASK_TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
TASK_ACTIVE = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})

_RUN_NEXT: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PENDING: frozenset({RunStatus.PLANNING, RunStatus.QUEUED, RunStatus.CANCELLED}),
    RunStatus.PLANNING: frozenset(
        {RunStatus.AWAITING_PLAN_APPROVAL, RunStatus.QUEUED, RunStatus.FAILED, RunStatus.CANCELLED}
    ),
    # A reviewer's rejection sends the run back to its planner (a new plan version).
    RunStatus.AWAITING_PLAN_APPROVAL: frozenset(
        {RunStatus.QUEUED, RunStatus.PLANNING, RunStatus.FAILED, RunStatus.CANCELLED}
    ),
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.WAITING,
            RunStatus.VERIFYING,
            RunStatus.SUCCEEDED,
            RunStatus.FAILED,
            RunStatus.ESCALATED,
            RunStatus.CANCELLED,
        }
    ),
    RunStatus.WAITING: frozenset(
        {RunStatus.RUNNING, RunStatus.FAILED, RunStatus.ESCALATED, RunStatus.CANCELLED}
    ),
    RunStatus.VERIFYING: frozenset(
        {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.RUNNING, RunStatus.WAITING,
         RunStatus.ESCALATED, RunStatus.CANCELLED}
    ),
    RunStatus.ESCALATED: frozenset({RunStatus.RUNNING, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}

_TASK_NEXT: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.QUEUED, TaskStatus.CANCELLED}),
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.WAITING, TaskStatus.QUEUED,
         TaskStatus.CANCELLED}
    ),
    TaskStatus.WAITING: frozenset({TaskStatus.QUEUED, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


def check_run_transition(current: str, new: str) -> RunStatus:
    cur, nxt = RunStatus(current), RunStatus(new)
    if nxt not in _RUN_NEXT[cur]:
        raise TransitionError(f"a run cannot go from {cur.value} to {nxt.value}")
    return nxt


def check_task_transition(current: str, new: str) -> TaskStatus:
    cur, nxt = TaskStatus(current), TaskStatus(new)
    if nxt not in _TASK_NEXT[cur]:
        raise TransitionError(f"a task cannot go from {cur.value} to {nxt.value}")
    return nxt
