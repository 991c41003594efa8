"""The review queue: pending requests for the signed-in reviewer, and their decisions. A task
for a person or an agent's question is answered here with a form generated from the schema of
the answer (console/response_form.py)."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from approvals import responses
from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit import hygiene
from audit.models import Event
from console import response_form
from console.access import get_run_for_user


def _request_for(user: Any, request_id: Any) -> ApprovalRequest:
    try:
        approval = ApprovalRequest.objects.select_related(
            "policy_version__policy", "decider_group").get(pk=request_id)
    except (ApprovalRequest.DoesNotExist, ValidationError, ValueError):
        raise Http404("no such approval request") from None
    if not user.groups.filter(pk=approval.decider_group_id).exists():
        get_run_for_user(user, approval.run_id)  # 404 unless they may see the run
    return approval


def pending_rows(user: Any) -> list[ApprovalRequest]:
    """The queue's rows, each with ``edit_changes``: approving from the queue must not hide what
    an earlier reviewer's edit changed (the page and its live refresh both render these)."""
    pending = list(approvals.pending_for(user).prefetch_related("decisions"))
    for approval in pending:
        original = approvals.original_arguments(approval, list(approval.decisions.all()))
        approval.edit_changes = approvals.arguments_changes(  # type: ignore[attr-defined]
            original, approval.arguments)
    return pending


@login_required
def queue(request: HttpRequest) -> HttpResponse:
    pending = pending_rows(request.user)
    template = "console/review_queue.html"
    if getattr(request, "htmx", False):
        template += "#queue"
    return render(request, template, {"pending": pending})


@login_required
def detail(request: HttpRequest, request_id: Any) -> HttpResponse:
    return _render_detail(request, _request_for(request.user, request_id))


def _render_detail(request: HttpRequest, approval: ApprovalRequest, *, error: str = "",
                   status: int = 200, fields: list[Any] | None = None) -> HttpResponse:
    """The request, its decisions and trace; after a refused decision, the reviewer's own input
    comes back with the error, so nothing typed is lost."""
    trace = list(Event.objects.filter(chain=approval.run_id, data__task=approval.task_key)
                 .order_by("seq")[:200])
    arguments_json = json.dumps(approval.arguments, indent=2, sort_keys=True)
    decisions = list(approval.decisions.select_related("decider"))
    original = approvals.original_arguments(approval, decisions)
    form = {"note": "", "arguments": arguments_json, "tokens": "", "cost": "", "steps": ""}
    if error:
        form.update({k: request.POST.get(k, v) for k, v in form.items()})
    respondable = approval.reason in responses.RESPONDABLE
    if respondable and fields is None:
        schema = responses.schema_for(approval.reason, approval.context)
        fields = (response_form.parse(schema, request.POST)[1] if error
                  else response_form.initial(schema))
    return render(request, "console/approval_detail.html", {
        "approval": approval,
        "decisions": decisions,
        # What reviewers' edits changed from the agent's call, field by field; rendered as
        # escaped text like every other value on the page.
        "changes": approvals.arguments_changes(original, approval.arguments),
        "original_json": json.dumps(original, indent=2, sort_keys=True),
        "trace": trace,
        "why_not": approvals.can_decide(request.user, approval),
        "arguments_json": arguments_json,
        # What a reviewer may edit: a proposed action's arguments, a plan under review.
        "editable": approval.reason in ("sensitive_action", "plan_review", "plan_invalid"),
        "form": form,
        "error": error,
        "respondable": respondable,
        "brief": approval.context if respondable else {},
        # A task's failed or unsure checks: the reviewer accepts the answer or sends it back.
        "checks": approval.context if approval.reason in ("qc_mismatch", "low_confidence")
        else None,
        "fields": fields or [],
    }, status=status)


@login_required
@require_POST
def decide(request: HttpRequest, request_id: Any) -> HttpResponse:
    approval = _request_for(request.user, request_id)
    decision = request.POST.get("decision", "")
    arguments = None
    output: Any = None
    budget: dict[str, Any] | None = None
    try:
        if decision == "respond":
            schema = responses.schema_for(approval.reason, approval.context)
            output, fields, general = response_form.parse(schema, request.POST)
            if output is None:
                # Each problem next to its field; what the person typed stays in the form.
                return _render_detail(
                    request, approval, status=400, fields=fields,
                    error="; ".join(general) or "some fields need attention (see below)")
        if decision == "edit":
            try:
                # Strict: NaN, Infinity, a NUL, a lone surrogate or deep nesting is refused
                # with where it is, not met later by the database or the parser's recursion.
                arguments = hygiene.loads(request.POST.get("arguments", ""), "arguments")
            except json.JSONDecodeError as exc:
                raise approvals.ApprovalError(f"edited arguments are not valid JSON: {exc.msg}") \
                    from None
            except hygiene.Refused as exc:
                raise approvals.ApprovalError(f"edited arguments refused: {exc}") from None
        if decision == "raise_budget":
            budget = {}
            for key in ("tokens", "steps"):
                raw = request.POST.get(key, "").strip()
                if raw:
                    # isdigit alone admits "²" and other digits int() refuses.
                    if not (raw.isascii() and raw.isdigit()):
                        raise approvals.ApprovalError(f"{key} must be a whole number")
                    # Far above any ceiling, and int() refuses more than 4,300 digits anyway.
                    if len(raw) > 18:
                        raise approvals.ApprovalError(f"{key} is out of range")
                    budget[key] = int(raw)
            if request.POST.get("cost", "").strip():
                budget["cost"] = request.POST["cost"].strip()
        decided = approvals.request_decide(
            request_id=approval.pk, user=request.user, decision=decision, arguments=arguments,
            note=request.POST.get("note", "")[:2000], budget=budget,
            expected_digest=request.POST.get("arguments_digest") or None, output=output)
    except approvals.ApprovalError as exc:
        approval.refresh_from_db()
        return _render_detail(request, approval, error=str(exc), status=exc.status)
    if decision == "edit" and decided.is_pending:
        # An edit can move the request under a stricter policy: say the run still waits.
        messages.success(request, f"Decision recorded. The edited arguments need "
                                  f"{decided.required_approvals} approvals "
                                  f"({decided.policy_version or 'no policy'}); the run waits "
                                  "for the others.")
    else:
        messages.success(request, "Decision recorded.")
    return redirect("review_queue")
