"""What a run is waiting on: the one rule, from a run's status, its tasks and its pending
approval requests to a list of waits. Pure (no database, no framework): the console's API,
run page, dashboard and live pushes all read their "waiting on" from here.

The rule:

* a finished run (succeeded, failed, cancelled) waits on nothing;
* every pending approval request is a wait on people (``approval``), listed with its task in
  plan order (a request whose task is not among the tasks given comes last, in the order the
  requests were given);
* a waiting task with no pending request is a wait of its own (``task``), its error saying
  why, e.g. ``paused: ...`` while a kill switch holds it;
* queued, running and finished tasks wait on nothing.

Each wait also has a ``cause``: ``kill_switch``, ``budget`` (a budget, step or quota
exhausted), ``approval`` (any other decision people make) or ``task`` (anything else)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from orchestration.engine.states import RUN_TERMINAL, TaskStatus

# Kinds: what the wait is on (the API's ``waiting_on[].kind``).
APPROVAL = "approval"
TASK = "task"

# Causes: why.
KILL_SWITCH = "kill_switch"
BUDGET = "budget"
OTHER = "task"

# Error code of a task a kill switch holds (orchestration.models.PAUSED).
PAUSED = "paused"
BUDGET_CODES = frozenset({"budget_exhausted", "step_budget_exhausted", "quota_exhausted"})


class TaskRow(Protocol):
    key: str
    status: str
    error: str


class RequestRow(Protocol):
    pk: Any
    task_key: str
    reason: str
    required_approvals: int


@dataclass(frozen=True)
class WaitingItem:
    kind: str
    task: str
    reason: str
    cause: str
    id: str | None = None
    # Approvals the request needs (multi-approver policies ask for more than one).
    required_approvals: int | None = None
    # The pending request row this wait came from, as given (None for a task's own wait).
    request: Any = None


def _code(text: str) -> str:
    return text.split(":", 1)[0].strip()


def cause_of(code: str) -> str:
    """The cause of a wait from its reason code (a request's reason, a task error's code)."""
    if code == PAUSED:
        return KILL_SWITCH
    if code in BUDGET_CODES:
        return BUDGET
    return OTHER


def _approval(request: RequestRow) -> WaitingItem:
    cause = cause_of(request.reason)
    return WaitingItem(kind=APPROVAL, task=request.task_key, reason=request.reason,
                       cause=APPROVAL if cause == OTHER else cause, id=str(request.pk),
                       required_approvals=request.required_approvals, request=request)


def waiting_on(run_status: str, tasks: Iterable[TaskRow],
               requests: Iterable[RequestRow]) -> list[WaitingItem]:
    """The run's waits, tasks in plan order (``tasks`` as given). ``requests`` are the run's
    pending approval requests."""
    if run_status in RUN_TERMINAL:
        return []
    by_task: dict[str, list[RequestRow]] = {}
    for request in requests:
        by_task.setdefault(request.task_key, []).append(request)
    items: list[WaitingItem] = []
    for task in tasks:
        pending = by_task.pop(task.key, [])
        if pending:
            items.extend(_approval(r) for r in pending)
        elif task.status == TaskStatus.WAITING:
            items.append(WaitingItem(kind=TASK, task=task.key, reason=task.error or "waiting",
                                     cause=cause_of(_code(task.error or ""))))
    for pending in by_task.values():
        items.extend(_approval(r) for r in pending)
    return items


def requests_of(items: Iterable[WaitingItem]) -> list[Any]:
    """The request rows behind the waits on people, in the order the waits are listed."""
    return [item.request for item in items if item.request is not None]
