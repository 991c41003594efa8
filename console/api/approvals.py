"""The API's operations on approval requests: list what you may decide, read one, decide."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest
from ninja import Router, Schema, Status
from pydantic import Field

from approvals import services as approval_services
from approvals.models import ApprovalRequest
from console.access import get_run_for_user
from console.api.common import ErrorOut, IdempotencyHeader, ServerErrorOut, once, refused
from console.selectors import approval_out

router = Router(tags=["approvals"])


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
    brief: dict[str, Any] | None = Field(
        default=None, description="a task for a person or an agent's question: what the person "
        "needs (title, spec, acceptance, output_schema, run_input, inputs; or the question)")
    response: Any = Field(default=None, description="the output a person responded with")


class DecisionIn(Schema):
    decision: str = Field(description="approve | reject | edit | raise_budget | stop | respond")
    arguments: dict[str, Any] | None = None
    output: dict[str, Any] | None = Field(
        default=None, description="respond: the answer to a task for a person (matching its "
        'output schema) or to an agent\'s question ({"answer": "..."})')
    arguments_digest: str | None = Field(
        default=None, description="the digest you saw; the decision is refused if it changed")
    note: str = Field(default="", max_length=2000)
    budget: dict[str, Any] | None = None


@router.get("/approvals", response=list[ApprovalOut], summary="Approval requests you may decide")
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


def visible_request(user: Any, request_id: str) -> ApprovalRequest:
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


@router.get("/approvals/{request_id}", response=ApprovalOut, summary="One approval request")
def get_approval(request: HttpRequest, request_id: str) -> dict[str, Any]:
    return approval_out(visible_request(request.user, request_id))


@router.post("/approvals/{request_id}/decision",
          response={200: ApprovalOut, 400: ErrorOut, 403: ErrorOut, 404: ErrorOut,
                    409: ErrorOut, 422: ErrorOut, 503: ServerErrorOut},
          summary="Decide an approval request")
def decide_approval(request: HttpRequest, request_id: str, payload: DecisionIn,
                    idempotency_key: str | None = IdempotencyHeader) -> Any:
    bad = refused(payload)
    if bad is not None:
        return bad

    def action() -> Status[Any]:
        visible_request(request.user, request_id)
        try:
            approval = approval_services.request_decide(
                request_id=request_id, user=request.user, decision=payload.decision,
                arguments=payload.arguments, note=payload.note, budget=payload.budget,
                expected_digest=payload.arguments_digest, output=payload.output)
        except approval_services.ApprovalError as exc:
            return Status(exc.status, {"error": str(exc)})
        return Status(200, approval_out(approval))

    return once(request, idempotency_key, ApprovalOut, action)
