"""The JSON API for integrators: /api/v1/, bearer tokens, an OpenAPI schema."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI, Schema, Status
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer
from pydantic import Field

from audit.models import Event
from console.access import can_cancel, can_start, get_run_for_user, startable_processes
from console.models import ApiToken
from orchestration import services
from orchestration.engine.states import TaskStatus
from orchestration.models import Process, Run


class BearerToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Any:
        user = ApiToken.authenticate(token)
        if user is not None:
            request.user = user
        return user


api = NinjaAPI(
    title="Switchboard API",
    version="1",
    description="Start governed agent runs, read their state, usage and ledger.",
    auth=BearerToken(),
    urls_namespace="api",
    openapi_url="/openapi.json",
    docs_url=None,
)


class ErrorOut(Schema):
    error: str


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    parts = []
    for err in exc.errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "payload"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return api.create_response(request, {"error": "invalid request: " + "; ".join(parts)},
                               status=400)


@api.exception_handler(AuthenticationError)
def _auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    response = api.create_response(
        request, {"error": "authentication required: send Authorization: Bearer <token>"},
        status=401)
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # e.g. a body that is not JSON at all: same error shape as everything else.
    return api.create_response(request, {"error": f"invalid request: {exc}"},
                               status=exc.status_code)


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return api.create_response(request, {"error": str(exc) or "not found"}, status=404)


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


def run_out(run: Run) -> dict[str, Any]:
    tasks = list(run.tasks.all())
    waiting = [
        {"kind": "task", "task": t.key, "reason": t.error or "waiting", "id": None}
        for t in tasks if t.status == TaskStatus.WAITING
    ]
    return {
        "id": run.pk,
        "process": run.process_version.process.slug,
        "version": run.process_version.number,
        "status": run.status,
        "input": run.input,
        "usage": {"tokens_in": run.tokens_in, "tokens_out": run.tokens_out,
                  "cost": str(run.cost), "steps": run.steps, "tool_calls": run.tool_calls},
        "result": run.result,
        "error": run.error,
        "waiting_on": waiting,
        "tasks": [{"key": t.key, "status": t.status, "attempts": t.attempts,
                   "executor": f"{t.executor_type}:{t.executor_ref}"} for t in tasks],
        "created_at": run.created_at,
        "finished_at": run.finished_at,
    }


@api.get("/processes", response=list[ProcessOut], summary="Processes you may start")
def list_processes(request: HttpRequest) -> list[dict[str, Any]]:
    return [
        {"slug": p.slug, "name": p.name, "pattern": p.pattern, "version": p.current_version.number}
        for p in startable_processes(request.user)
    ]


@api.post("/runs", response={201: RunOut, 400: ErrorOut, 403: ErrorOut},
          summary="Start a run of a process")
def create_run(request: HttpRequest, payload: RunIn) -> Any:
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


@api.get("/runs/{run_id}", response=RunOut, summary="A run's state, usage and result")
def get_run(request: HttpRequest, run_id: str) -> dict[str, Any]:
    return run_out(get_run_for_user(request.user, run_id))


@api.get("/runs/{run_id}/events", response=EventsOut, summary="A run's ledger events")
def run_events(request: HttpRequest, run_id: str, after: int = 0,
               limit: int = 500) -> dict[str, Any]:
    run = get_run_for_user(request.user, run_id)
    limit = max(1, min(limit, 1000))
    events = Event.objects.filter(chain=run.pk, seq__gt=max(after, 0)).order_by("seq")[:limit]
    return {"events": list(events.values("seq", "kind", "at", "actor", "data", "hash",
                                         "prev_hash"))}


@api.post("/runs/{run_id}/cancel", response={200: RunOut, 403: ErrorOut, 409: ErrorOut},
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
