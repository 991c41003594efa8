"""The review queue: pending requests for the signed-in reviewer, and their decisions. A task
for a person or an agent's question is answered here with a form generated from the schema of
the answer (console/response_form.py).

Each request is shown with what a reviewer needs to decide it: the run's input, what the agent
said in the turn that made the call, why the policy matched, how many of the required approvals
are in, and what an edit changed (console/review_context.py). A decision made from the queue
with htmx is confirmed in the row it came from (the websocket push that follows is an extra);
identical low-risk requests can be approved together (console/review_bulk.py)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from approvals import responses
from approvals import services as approvals
from approvals.models import BUDGET_REASONS, ApprovalRequest, Decision
from audit import hygiene
from audit.models import Event
from console import response_form
from console.access import get_run_for_user
from console.review_bulk import bulk_approve as bulk_approve  # routed with the other review pages
from console.review_bulk import bulk_groups
from console.review_context import annotate, change_rows, confirmation

# How long the queue keeps confirming a reviewer's own decisions.
RECENT = timedelta(minutes=15)


def _request_for(user: Any, request_id: Any) -> ApprovalRequest:
    try:
        approval = ApprovalRequest.objects.select_related(
            "policy_version__policy", "decider_group").get(pk=request_id)
    except (ApprovalRequest.DoesNotExist, ValidationError, ValueError):
        raise Http404("no such approval request") from None
    if not user.groups.filter(pk=approval.decider_group_id).exists():
        get_run_for_user(user, approval.run_id)  # 404 unless they may see the run
    return approval


# The queue shows the requests with the soonest deadlines first, this many at a time: a page
# with every pending request on it grows with the backlog (500 rows took half a second).
QUEUE_ROWS = 50


def pending_rows(user: Any, limit: int = QUEUE_ROWS) -> list[ApprovalRequest]:
    """The queue's rows with their context (see ``annotate``): approving from the queue must
    not hide what an earlier reviewer's edit changed, nor what the agent asked and why."""
    pending = list(approvals.pending_for(user).prefetch_related("decisions__decider")[:limit])
    annotate(pending, user)
    return pending


def recent_decisions(user: Any) -> list[dict[str, Any]]:
    """This person's decisions of the last minutes with their confirmation, newest first: the
    queue keeps saying what became of them after their rows have gone."""
    since = timezone.now() - RECENT
    recent = (Decision.objects.filter(decider=user, created_at__gte=since)
              .select_related("request").order_by("-created_at")[:10])
    return [{"at": d.created_at, "text": confirmation(d.request, d.kind, user=user)}
            for d in recent]


def queue_context(user: Any) -> dict[str, Any]:
    pending = pending_rows(user)
    total = (len(pending) if len(pending) < QUEUE_ROWS
             else approvals.pending_for(user).count())
    return {"pending": pending, "total": total, "groups": bulk_groups(pending),
            "recent": recent_decisions(user)}


@login_required
def queue(request: HttpRequest) -> HttpResponse:
    template = "console/review_queue.html"
    if getattr(request, "htmx", False):
        template += "#queue"
    return render(request, template, queue_context(request.user))


@login_required
def detail(request: HttpRequest, request_id: Any) -> HttpResponse:
    return _render_detail(request, _request_for(request.user, request_id))


def _render_detail(request: HttpRequest, approval: ApprovalRequest, *, error: str = "",
                   status: int = 200, fields: list[Any] | None = None,
                   preview: list[dict[str, Any]] | None = None) -> HttpResponse:
    """The request, its decisions and trace; after a refused decision, the reviewer's own input
    comes back with the error, so nothing typed is lost."""
    trace = list(Event.objects.filter(chain=approval.run_id, data__task=approval.task_key)
                 .order_by("seq")[:200])
    arguments_json = json.dumps(approval.arguments, indent=2, sort_keys=True)
    decisions = list(approval.decisions.select_related("decider"))
    approval._prefetched_objects_cache = {"decisions": decisions}  # type: ignore[attr-defined]
    annotate([approval], request.user)
    original = approvals.original_arguments(approval, decisions)
    form = {"note": "", "arguments": arguments_json, "tokens": "", "cost": "", "steps": ""}
    if error or preview is not None:
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
        "changes": approval.edit_changes,  # type: ignore[attr-defined]
        "original_json": json.dumps(original, indent=2, sort_keys=True),
        "trace": trace,
        "why_not": approvals.can_decide(request.user, approval),
        "arguments_json": arguments_json,
        # What a reviewer may edit: a proposed action's arguments, a plan under review.
        "editable": approval.reason in ("sensitive_action", "plan_review", "plan_invalid"),
        # Only a spent budget is raised: for any other reason a raise would not help the run.
        "raisable": approval.reason in BUDGET_REASONS,
        "preview": preview,
        "form": form,
        "error": error,
        "respondable": respondable,
        "brief": approval.context if respondable else {},
        # A task's failed or unsure checks: the reviewer accepts the answer or sends it back.
        "checks": approval.context if approval.reason in ("qc_mismatch", "low_confidence")
        else None,
        "fields": fields or [],
    }, status=status)


def _edited_arguments(request: HttpRequest) -> Any:
    try:
        # Strict: NaN, Infinity, a NUL, a lone surrogate or deep nesting is refused with where
        # it is, not met later by the database or the parser's recursion.
        return hygiene.loads(request.POST.get("arguments", ""), "arguments")
    except json.JSONDecodeError as exc:
        raise approvals.ApprovalError(f"edited arguments are not valid JSON: {exc.msg}") \
            from None
    except hygiene.Refused as exc:
        raise approvals.ApprovalError(f"edited arguments refused: {exc}") from None


@login_required
@require_POST
def preview(request: HttpRequest, request_id: Any) -> HttpResponse:
    """What the typed edit would change from the arguments the agent asked for, before it is
    submitted: the preview fragment with htmx, else the page with the form kept."""
    approval = _request_for(request.user, request_id)
    try:
        edited = _edited_arguments(request)
        changes = change_rows(approvals.original_arguments(approval), edited)
        error = ""
    except approvals.ApprovalError as exc:
        changes, error = [], str(exc)
    if getattr(request, "htmx", False):
        return render(request, "console/approval_detail.html#edit-preview",
                      {"preview": changes, "preview_error": error})
    return _render_detail(request, approval, preview=changes, error=error,
                          status=400 if error else 200)


def _from_queue(request: HttpRequest) -> bool:
    return bool(getattr(request, "htmx", False)) and request.POST.get("from") == "queue"


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
            arguments = _edited_arguments(request)
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
        if _from_queue(request):
            # The row says why, in place (static/js/review.js lets htmx swap a refusal).
            return _render_row(request, approval, error=str(exc), status=exc.status)
        return _render_detail(request, approval, error=str(exc), status=exc.status)
    text = confirmation(decided, decision, user=request.user)
    if decision == "edit" and decided.is_pending and decided.policy_version_id:
        # An edit can move the request under a stricter policy: say which.
        text += f" (the edited arguments fall under {decided.policy_version})"
    if _from_queue(request):
        # The htmx response itself confirms, in the row that was decided: the live push of
        # the queue that follows is an extra, and a closed socket loses nothing.
        return render(request, "console/review_queue.html#decided",
                      {"r": decided, "text": text})
    messages.success(request, text)
    return redirect("review_queue")


def _render_row(request: HttpRequest, approval: ApprovalRequest, *, error: str,
                status: int) -> HttpResponse:
    if not approval.is_pending:
        return render(request, "console/review_queue.html#decided",
                      {"r": approval, "text": error, "error": True}, status=status)
    approval = ApprovalRequest.objects.select_related(
        "policy_version__policy", "decider_group").prefetch_related(
        "decisions__decider").get(pk=approval.pk)
    annotate([approval], request.user)
    return render(request, "console/review_queue.html#row",
                  {"r": approval, "row_error": error}, status=status)
