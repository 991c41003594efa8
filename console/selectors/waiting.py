"""The waiting-on selector: feeds a run's task rows and pending approval requests to the one
rule (orchestration.engine.waiting) and hands back its waits, for one run or a page of runs
in a fixed number of queries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from approvals.models import ApprovalRequest
from orchestration.engine.waiting import WaitingItem, requests_of, waiting_on
from orchestration.models import Run, Task


def _pending(run_ids: list[Any]) -> dict[Any, list[ApprovalRequest]]:
    pending: dict[Any, list[ApprovalRequest]] = {pk: [] for pk in run_ids}
    for request in (ApprovalRequest.objects.filter(run_id__in=run_ids,
                                                   status=ApprovalRequest.Status.PENDING)
                    .select_related("decider_group").order_by("deadline")):
        pending[request.run_id].append(request)
    return pending


def run_waiting_on(run: Run, tasks: Sequence[Task] | None = None) -> list[WaitingItem]:
    """What this run waits on. ``tasks``: its tasks in plan order, if already read."""
    if tasks is None:
        tasks = list(run.tasks.all())
    return waiting_on(run.status, tasks, _pending([run.pk])[run.pk])


def runs_waiting_on(runs: Iterable[Run]) -> dict[Any, list[WaitingItem]]:
    """What each of these runs waits on, in two queries whatever their number."""
    runs = list(runs)
    ids = [run.pk for run in runs]
    tasks: dict[Any, list[Task]] = {pk: [] for pk in ids}
    for task in (Task.objects.filter(run_id__in=ids).only("run_id", "key", "status", "error")
                 .order_by("run_id", "position")):
        tasks[task.run_id].append(task)
    pending = _pending(ids)
    return {run.pk: waiting_on(run.status, tasks[run.pk], pending[run.pk]) for run in runs}


def people_waited_on(items: Iterable[WaitingItem]) -> list[ApprovalRequest]:
    """The pending requests among these waits, soonest deadline first (as pages list them)."""
    return sorted(requests_of(items), key=lambda request: request.deadline)
