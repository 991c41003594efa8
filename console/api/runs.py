"""The API's operations on processes and runs: start, list, read, list events, cancel, fork,
and replay checks."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest
from ninja import Query, Router, Schema, Status
from pydantic import Field

from audit.models import Event
from console.access import (
    can_cancel,
    can_replay,
    can_start,
    get_run_for_user,
    startable_processes,
)
from console.api.common import ErrorOut, IdempotencyHeader, ServerErrorOut, once, refused
from console.selectors import run_out
from console.selectors.run_list import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    FilterError,
    RunFilter,
    run_list,
)
from orchestration import replay_jobs, services
from orchestration.models import Process

router = Router(tags=["runs"])


class ProcessOut(Schema):
    slug: str
    name: str
    pattern: str
    version: int


class Usage(Schema):
    tokens_in: int
    tokens_out: int
    cost: str = Field(description="decimal currency amount, as a string to keep it exact")
    steps: int
    tool_calls: int


class WaitingOn(Schema):
    kind: str
    task: str
    reason: str
    id: str | None = None


class TaskOut(Schema):
    key: str
    status: str
    executor: str
    attempts: int


class PlanOut(Schema):
    version: int = Field(description="the run's plan version (0: its process version's plan)")
    plan: dict[str, Any]


class RunOut(Schema):
    id: uuid.UUID
    process: str
    version: int
    status: str
    input: dict[str, Any]
    usage: Usage
    result: Any = None
    error: str
    waiting_on: list[WaitingOn]
    tasks: list[TaskOut]
    created_at: datetime
    finished_at: datetime | None = None
    phase: str = Field(default="production",
                       description="planning | plan_review | production | verifying | done")
    plan: PlanOut | None = None


class RunIn(Schema):
    process: str = Field(min_length=1, max_length=50)
    input: dict[str, Any] = Field(default_factory=dict)


class EventOut(Schema):
    seq: int
    kind: str
    at: datetime
    actor: str
    data: Any
    hash: str
    prev_hash: str


class EventsOut(Schema):
    events: list[EventOut]


@router.get("/processes", response=list[ProcessOut], summary="Processes you may start")
def list_processes(request: HttpRequest) -> list[dict[str, Any]]:
    return [
        {"slug": p.slug, "name": p.name, "pattern": p.pattern, "version": p.current_version.number}
        for p in startable_processes(request.user)
    ]


@router.post("/runs", response={201: RunOut, 400: ErrorOut, 403: ErrorOut, 409: ErrorOut,
                              422: ErrorOut, 503: ServerErrorOut},
          summary="Start a run of a process")
def create_run(request: HttpRequest, payload: RunIn,
               idempotency_key: str | None = IdempotencyHeader) -> Any:
    bad = refused(payload)
    if bad is not None:
        return bad

    def action() -> Status[Any]:
        process = Process.objects.select_related("current_version").filter(
            slug=payload.process).first()
        if process is None or process.current_version is None:
            return Status(400, {"error": f"unknown process {payload.process!r}"})
        if not can_start(request.user, process):
            return Status(403, {"error": f"you may not start runs of {process.slug!r}"})
        try:
            run = services.run_create(process=process, input=payload.input, user=request.user)
        except services.ServiceError as exc:
            return Status(400, {"error": str(exc)})
        return Status(201, run_out(run))

    return once(request, idempotency_key, RunOut, action)


class RunSummaryOut(Schema):
    id: uuid.UUID
    process: str
    version: int
    status: str
    started_by: str | None
    input: dict[str, Any]
    cost: str = Field(description="decimal currency amount, as a string to keep it exact")
    error: str
    created_at: datetime
    finished_at: datetime | None = None


class RunListOut(Schema):
    runs: list[RunSummaryOut]
    count: int = Field(description="runs matching the filters (all pages)")
    counts: dict[str, int] = Field(description="runs matching the filters other than status, "
                                               "by status")
    next: str | None = Field(description="cursor of the next page; null on the last")


class RunListQuery(Schema):
    status: list[str] = Field(default_factory=list, description="one or more run statuses")
    process: str = Field("", max_length=50, description="process slug")
    starter: str = Field("", max_length=150, description="username of who started the run")
    since: date | None = Field(None, description="started on or after this day")
    until: date | None = Field(None, description="started on or before this day")
    q: str = Field("", max_length=200, description="text in the run's input (an order id...)")
    order: str = Field("newest", description="newest or oldest first")
    cursor: str = Field("", max_length=200, description="the previous page's next")
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)


def summary_out(run: Any) -> dict[str, Any]:
    return {"id": run.pk, "process": run.process_version.process.slug,
            "version": run.process_version.number, "status": run.status,
            "started_by": run.created_by.get_username() if run.created_by else None,
            "input": run.input if isinstance(run.input, dict) else {}, "cost": str(run.cost),
            "error": run.error, "created_at": run.created_at, "finished_at": run.finished_at}


@router.get("/runs", response={200: RunListOut, 400: ErrorOut},
            summary="Runs you may see, filtered, newest first, a page at a time")
def list_runs(request: HttpRequest, filters: Query[RunListQuery]) -> Any:
    try:
        page = run_list(request.user, RunFilter(
            status=tuple(filters.status), process=filters.process, starter=filters.starter,
            since=filters.since, until=filters.until, q=filters.q, order=filters.order,
            cursor=filters.cursor, limit=filters.limit))
    except FilterError as exc:
        return Status(400, {"error": str(exc)})
    return {"runs": [summary_out(r) for r in page.runs], "count": page.count,
            "counts": page.counts, "next": page.next_cursor}


@router.get("/runs/{run_id}", response=RunOut, summary="A run's state, usage and result")
def get_run(request: HttpRequest, run_id: str) -> dict[str, Any]:
    return run_out(get_run_for_user(request.user, run_id))


@router.get("/runs/{run_id}/events", response=EventsOut, summary="A run's ledger events")
def run_events(request: HttpRequest, run_id: str, after: int = 0,
               limit: int = 500) -> dict[str, Any]:
    run = get_run_for_user(request.user, run_id)
    limit = max(1, min(limit, 1000))
    events = Event.objects.filter(chain=run.pk, seq__gt=max(after, 0)).order_by("seq")[:limit]
    return {"events": list(events.values("seq", "kind", "at", "actor", "data", "hash",
                                         "prev_hash"))}


@router.post("/runs/{run_id}/cancel", response={200: RunOut, 403: ErrorOut, 409: ErrorOut},
          summary="Cancel a run")
def cancel_run(request: HttpRequest, run_id: str) -> Any:
    run = get_run_for_user(request.user, run_id)
    if not can_cancel(request.user, run):
        return Status(403, {"error": "you may not cancel this run"})
    try:
        run = services.run_cancel(run=run, user=request.user)
    except services.RunNotCancellable as exc:
        return Status(409, {"error": str(exc)})
    return Status(200, run_out(run))


class ForkIn(Schema):
    step: int = Field(ge=1, description="task position (1-based, plan order) to run from")


@router.post("/runs/{run_id}/fork", response={201: RunOut, 400: ErrorOut, 403: ErrorOut},
          summary="Start a new run from a step of this one, reusing the results before it")
def fork_run(request: HttpRequest, run_id: str, payload: ForkIn) -> Any:
    run = get_run_for_user(request.user, run_id)
    if not can_start(request.user, run.process_version.process):
        return Status(403, {"error": f"you may not start runs of "
                                     f"{run.process_version.process.slug!r}"})
    try:
        fork = services.run_fork(run=run, step=payload.step, user=request.user)
    except services.ServiceError as exc:
        return Status(400, {"error": str(exc)})
    return Status(201, run_out(fork))


class ReplayCheckOut(Schema):
    id: uuid.UUID
    run: uuid.UUID
    status: str = Field(description="queued | running | matched | diverged | failed")
    requested_by: str | None
    compared: int = Field(description="recorded events compared")
    summary: str = Field(description="the verdict, once there is one")
    divergence: str = Field(description="the first divergence, if the replay diverged")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


def replay_check_out(check: Any) -> dict[str, Any]:
    return {"id": check.pk, "run": check.run_id, "status": check.status,
            "requested_by": check.requested_by.get_username() if check.requested_by else None,
            "compared": check.compared, "summary": check.summary,
            "divergence": check.divergence, "created_at": check.created_at,
            "started_at": check.started_at, "finished_at": check.finished_at}


@router.post("/runs/{run_id}/replay", response={202: ReplayCheckOut, 403: ErrorOut},
          summary="Replay a run from its ledger in a worker (a check already under way for "
                  "the run is returned instead of starting another)")
def replay_run(request: HttpRequest, run_id: str) -> Any:
    run = get_run_for_user(request.user, run_id)
    if not can_replay(request.user, run):
        return Status(403, {"error": "you may not start a replay check of this run"})
    check, _created = replay_jobs.request_check(run, request.user)
    return Status(202, replay_check_out(check))


@router.get("/runs/{run_id}/replay/{check_id}", response=ReplayCheckOut,
         summary="A replay check and its verdict")
def get_replay_check(request: HttpRequest, run_id: str, check_id: str) -> dict[str, Any]:
    run = get_run_for_user(request.user, run_id)
    try:
        check = run.replay_checks.select_related("requested_by").get(pk=check_id)
    except (DjangoValidationError, ValueError, run.replay_checks.model.DoesNotExist):
        raise Http404("no such replay check") from None
    return replay_check_out(check)
