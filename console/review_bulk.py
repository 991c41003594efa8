"""Approving identical low-risk requests together: the queue groups pending proposed actions
with the same tool and the same arguments, of a low-risk tool; a reviewer sees what would be
approved (the confirmation step), then each selected request is approved through the same
service as a single decision (permissions, separation of duties and M of N all apply per
request) and each result is reported."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from approvals import services as approvals
from approvals.models import ApprovalRequest, Reason
from console.review_context import annotate, confirmation
from orchestration.models import Tool

# Risk classes whose identical requests may be approved together; anything riskier is read and
# approved one by one.
BULK_RISK_CLASSES = frozenset({Tool.Risk.READ})
BULK_LIMIT = 50


def _low_risk(approval: ApprovalRequest, risks: dict[str, str]) -> bool:
    """Whether the call's tool is of a low risk class now (``risks``: the tools' classes) and
    was when the call was matched (the class the gate recorded, when it did)."""
    recorded = (approval.context or {}).get("risk_class")
    return risks.get(approval.tool) in BULK_RISK_CLASSES and (
        recorded is None or recorded in BULK_RISK_CLASSES)


def _bulk_key(approval: ApprovalRequest, risks: dict[str, str]) -> tuple[str, str] | None:
    """(tool, digest) when the request may be approved with identical ones, else None."""
    if (approval.reason != Reason.SENSITIVE_ACTION or getattr(approval, "mine", None)
            or not _low_risk(approval, risks)):
        return None
    return approval.tool, approval.arguments_digest


def bulk_groups(rows: list[ApprovalRequest]) -> list[dict[str, Any]]:
    """Identical low-risk requests (same tool, same arguments) two or more of which wait for
    this person: each group can be approved together after a confirmation step."""
    risks = dict(Tool.objects.filter(slug__in={r.tool for r in rows if r.tool})
                 .values_list("slug", "risk_class"))
    groups: dict[tuple[str, str], list[ApprovalRequest]] = {}
    for approval in rows:
        key = _bulk_key(approval, risks)
        if key is not None:
            groups.setdefault(key, []).append(approval)
    return [{"tool": members[0].tool, "arguments": members[0].arguments,
             "digest": members[0].arguments_digest, "requests": members}
            for members in groups.values() if len(members) >= 2]


class BulkRefused(approvals.ApprovalError):
    """The selection cannot be approved together; nothing was decided."""


def _bulk_selection(user: Any, raw_ids: list[str]) -> list[ApprovalRequest]:
    """The selected requests, if they may be approved together: proposed actions this person
    may decide, all with the same tool and arguments, of a low-risk tool. Whether each one is
    still pending, and everything else a decision needs, is the service's to check."""
    if not raw_ids:
        raise BulkRefused("select at least one request to approve")
    if len(raw_ids) > BULK_LIMIT:
        raise BulkRefused(f"at most {BULK_LIMIT} requests can be approved together")
    try:
        ids = list(dict.fromkeys(uuid.UUID(str(i)) for i in raw_ids))
    except ValueError:
        raise BulkRefused("the selection names something that is not a request") from None
    groups = list(user.groups.values_list("pk", flat=True))
    chosen = {a.pk: a for a in ApprovalRequest.objects.filter(
        pk__in=ids, decider_group__in=groups).select_related(
        "policy_version__policy", "decider_group").prefetch_related("decisions__decider")}
    missing = [str(i) for i in ids if i not in chosen]
    if missing:
        raise BulkRefused(f"no request you may decide has the id {missing[0]}")
    rows = [chosen[i] for i in ids]
    other = next((a for a in rows if a.reason != Reason.SENSITIVE_ACTION), None)
    if other is not None:
        raise BulkRefused(f"only proposed actions are approved together; a request for "
                          f"{other.get_reason_display()} is decided on its own page")
    if len({(a.tool, a.arguments_digest) for a in rows}) > 1:
        raise BulkRefused("only identical requests are approved together: the selected ones "
                          "differ in tool or arguments")
    tool = rows[0].tool
    risk = Tool.objects.filter(slug=tool).values_list("risk_class", flat=True).first()
    if risk not in BULK_RISK_CLASSES:
        raise BulkRefused(f"{tool} is a {risk or 'unknown'}-risk tool: approve its requests "
                          "one by one")
    riskier = next((a for a in rows if not _low_risk(a, {tool: risk})), None)
    if riskier is not None:
        raise BulkRefused(f"the call of run {str(riskier.run_id)[:8]} was matched as "
                          f"{riskier.context.get('risk_class')}-risk: approve it on its own")
    annotate(rows, user)
    return rows


@login_required
@require_POST
def bulk_approve(request: HttpRequest) -> HttpResponse:
    """Approve identical low-risk requests together: the first POST shows what would be
    approved (the confirmation step), the second, with ``confirm``, approves each selected
    request through the same service as a single decision and reports each result."""
    htmx = bool(getattr(request, "htmx", False))
    template = "console/review_bulk.html" + ("#panel" if htmx else "")
    try:
        rows = _bulk_selection(request.user, request.POST.getlist("requests"))
    except BulkRefused as exc:
        return render(request, template, {"error": str(exc)}, status=exc.status)
    digest = request.POST.get("arguments_digest") or rows[0].arguments_digest
    if request.POST.get("confirm") != "yes":
        return render(request, template, {"rows": rows, "digest": digest})
    results = []
    for approval in rows:
        try:
            decided = approvals.request_decide(
                request_id=approval.pk, user=request.user, decision="approve",
                expected_digest=digest, note=request.POST.get("note", "")[:2000])
        except approvals.ApprovalError as exc:
            results.append({"request": approval, "ok": False,
                            "text": f"Not approved for run {str(approval.run_id)[:8]}: {exc}"})
        else:
            results.append({"request": decided, "ok": True,
                            "text": confirmation(decided, "approve", user=request.user)})
    if not htmx:
        for result in results:
            (messages.success if result["ok"] else messages.error)(request, result["text"])
        return redirect("review_queue")
    return render(request, template, {"results": results})
