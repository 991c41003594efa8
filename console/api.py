"""The JSON API for integrators: /api/v1/, bearer tokens, an OpenAPI schema."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import kombu.exceptions
import redis.exceptions
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from ninja import Header, NinjaAPI, Schema, Status
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer
from pydantic import Field

from approvals import services as approval_services
from approvals.models import ApprovalRequest
from audit import hygiene
from audit.models import Event
from console.access import can_cancel, can_start, get_run_for_user, startable_processes
from console.idempotency import KEY_HEADER, KEY_PATTERN, KEY_TTL, perform_once
from console.middleware import request_id_of
from console.models import ApiToken
from console.selectors import approval_out, run_out
from orchestration import services
from orchestration.models import Process

logger = logging.getLogger("switchboard.api")

# Failures of something the API depends on, not of the request: worth a retry.
UNAVAILABLE = (OperationalError, InterfaceError, kombu.exceptions.OperationalError,
               redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
RETRY_AFTER_SECONDS = 5


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


class ServerErrorOut(Schema):
    error: str
    request_id: str = Field(description="also in the X-Request-ID header and the server log")


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    parts = []
    for err in exc.errors:
        loc = ".".join(str(p) for p in err.get("loc", ())
                       if p not in ("body", "payload", "header", "query"))
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


def _unavailable(request: HttpRequest, exc: Exception) -> HttpResponse:
    request_id = request_id_of(request)
    logger.error("service unavailable in %s %s (request_id=%s)", request.method, request.path,
                 request_id, exc_info=exc)
    response = api.create_response(request, {
        "error": f"service temporarily unavailable; retry later, with the same {KEY_HEADER} "
                 "if you sent one, so the request is not done twice",
        "request_id": request_id}, status=503)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


for _exc_class in UNAVAILABLE:
    api.add_exception_handler(_exc_class, _unavailable)


@api.exception_handler(Exception)
def _server_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    request_id = request_id_of(request)
    logger.exception("unhandled error in %s %s (request_id=%s)", request.method, request.path,
                     request_id)
    # The exception's text may hold internals; the request id leads to it in the log.
    return api.create_response(
        request, {"error": "internal server error; quote the request id when reporting it",
                  "request_id": request_id}, status=500)


IDEMPOTENCY_DOC = (
    f"Optional. Send a unique key (1-200 printable ASCII characters) to make retries safe: for "
    f"{KEY_TTL.total_seconds() / 3600:g} hours, a retry by you with the same key and the same "
    "request returns the first successful response (header Idempotent-Replayed: true) without "
    "acting again; the same key on a different request answers 422. Error responses are not "
    "kept, so a fixed request may reuse the key. A concurrent retry waits for the first one.")
# Shared by the operations that take it, so both document it the same way.
IdempotencyHeader = Header(None, alias=KEY_HEADER, description=IDEMPOTENCY_DOC,
                           pattern=KEY_PATTERN)


def _refused(payload: Schema) -> Status[Any] | None:
    """400 for a body holding a value no row or ledger event can hold (NaN, Infinity, a NUL, a
    lone surrogate, deep nesting): the JSON parser and the schema let those through, and the
    database would fail on them mid-request. Checked field by field, before anything is done."""
    try:
        for name, value in payload.model_dump().items():
            hygiene.check(value, name)
    except hygiene.Refused as exc:
        return Status(400, {"error": f"invalid request: {exc}"})
    return None


def _once(request: HttpRequest, key: str | None, schema: type[Schema],
          action: Callable[[], Status[Any]]) -> Status[Any] | HttpResponse:
    """``action`` under ``key``; its success is rendered here as ninja would render it for
    ``schema``, so that the exact bytes can be stored and replayed."""
    def render(result: Status[Any]) -> HttpResponse:
        return api.create_response(request, schema.model_validate(result.value).model_dump(),
                                   status=result.status_code)

    return perform_once(request, key, action, render=render,
                        content_type=api.get_content_type())


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


@api.get("/processes", response=list[ProcessOut], summary="Processes you may start")
def list_processes(request: HttpRequest) -> list[dict[str, Any]]:
    return [
        {"slug": p.slug, "name": p.name, "pattern": p.pattern, "version": p.current_version.number}
        for p in startable_processes(request.user)
    ]


@api.post("/runs", response={201: RunOut, 400: ErrorOut, 403: ErrorOut, 409: ErrorOut,
                              422: ErrorOut, 503: ServerErrorOut},
          summary="Start a run of a process")
def create_run(request: HttpRequest, payload: RunIn,
               idempotency_key: str | None = IdempotencyHeader) -> Any:
    refused = _refused(payload)
    if refused is not None:
        return refused

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

    return _once(request, idempotency_key, RunOut, action)


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


class ForkIn(Schema):
    step: int = Field(ge=1, description="task position (1-based, plan order) to run from")


@api.post("/runs/{run_id}/fork", response={201: RunOut, 400: ErrorOut, 403: ErrorOut},
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


class ApprovalOut(Schema):
    id: uuid.UUID
    run: uuid.UUID
    task: str
    tool: str
    arguments: Any
    arguments_digest: str
    reason: str
    detail: str
    policy: str | None
    status: str
    deadline: datetime
    required_approvals: int
    approvals: int
    tier: int
    decisions: list[dict[str, Any]]
    original_arguments: Any = Field(
        default=None, description="the arguments the request was opened with, before any edit")
    changes: list[dict[str, Any]] = Field(
        default_factory=list,
        description='what edits changed: [{"field": "amount", "from": 500, "to": 80}]')


class DecisionIn(Schema):
    decision: str = Field(description="approve | reject | edit | raise_budget | stop")
    arguments: dict[str, Any] | None = None
    arguments_digest: str | None = Field(
        default=None, description="the digest you saw; the decision is refused if it changed")
    note: str = Field(default="", max_length=2000)
    budget: dict[str, Any] | None = None


@api.get("/approvals", response=list[ApprovalOut], summary="Approval requests you may decide")
def list_approvals(request: HttpRequest,
                   status: ApprovalRequest.Status = ApprovalRequest.Status.PENDING,
                   ) -> list[dict[str, Any]]:
    # Typed, so an unknown status (a NUL, which PostgreSQL cannot even compare) answers 400.
    if status == ApprovalRequest.Status.PENDING:
        qs = approval_services.pending_for(request.user)
    else:
        qs = ApprovalRequest.objects.filter(
            decider_group__in=request.user.groups.all(), status=status).order_by("-created_at")
    return [approval_out(r) for r in qs.select_related("policy_version__policy")[:500]]


def _visible_request(user: Any, request_id: str) -> ApprovalRequest:
    try:
        approval = ApprovalRequest.objects.select_related("policy_version__policy").get(
            pk=request_id)
    except (ApprovalRequest.DoesNotExist, DjangoValidationError, ValueError):
        raise Http404("no such approval request") from None
    in_group = user.groups.filter(pk=approval.decider_group_id).exists()
    if not in_group:
        try:
            get_run_for_user(user, approval.run_id)
        except Http404:
            raise Http404("no such approval request") from None
    return approval


@api.get("/approvals/{request_id}", response=ApprovalOut, summary="One approval request")
def get_approval(request: HttpRequest, request_id: str) -> dict[str, Any]:
    return approval_out(_visible_request(request.user, request_id))


@api.post("/approvals/{request_id}/decision",
          response={200: ApprovalOut, 400: ErrorOut, 403: ErrorOut, 404: ErrorOut,
                    409: ErrorOut, 422: ErrorOut, 503: ServerErrorOut},
          summary="Decide an approval request")
def decide_approval(request: HttpRequest, request_id: str, payload: DecisionIn,
                    idempotency_key: str | None = IdempotencyHeader) -> Any:
    refused = _refused(payload)
    if refused is not None:
        return refused

    def action() -> Status[Any]:
        _visible_request(request.user, request_id)
        try:
            approval = approval_services.request_decide(
                request_id=request_id, user=request.user, decision=payload.decision,
                arguments=payload.arguments, note=payload.note, budget=payload.budget,
                expected_digest=payload.arguments_digest)
        except approval_services.ApprovalError as exc:
            return Status(exc.status, {"error": str(exc)})
        return Status(200, approval_out(approval))

    return _once(request, idempotency_key, ApprovalOut, action)


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


@api.post("/runs/{run_id}/replay", response={202: ReplayCheckOut, 403: ErrorOut},
          summary="Replay a run from its ledger in a worker (a check already under way for "
                  "the run is returned instead of starting another)")
def replay_run(request: HttpRequest, run_id: str) -> Any:
    from console.access import can_replay
    from orchestration import replay_jobs

    run = get_run_for_user(request.user, run_id)
    if not can_replay(request.user, run):
        return Status(403, {"error": "you may not start a replay check of this run"})
    check, _created = replay_jobs.request_check(run, request.user)
    return Status(202, replay_check_out(check))


@api.get("/runs/{run_id}/replay/{check_id}", response=ReplayCheckOut,
         summary="A replay check and its verdict")
def get_replay_check(request: HttpRequest, run_id: str, check_id: str) -> dict[str, Any]:
    run = get_run_for_user(request.user, run_id)
    try:
        check = run.replay_checks.select_related("requested_by").get(pk=check_id)
    except (DjangoValidationError, ValueError, run.replay_checks.model.DoesNotExist):
        raise Http404("no such replay check") from None
    return replay_check_out(check)
