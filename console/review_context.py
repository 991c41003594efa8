"""What the review pages show with each request besides the request itself: a few fields of
the run's input, what the agent said in the model turn that made the call, why its policy
matched, M-of-N progress, what an edit changed, and, once decided, what the decision did (the
confirmation a decision from the queue answers with)."""

from __future__ import annotations

import json
from typing import Any

from django.db.models import Q

from approvals import explain, responses
from approvals import services as approvals
from approvals.models import ApprovalRequest, Decision, Reason
from audit.models import Event
from orchestration.models import Run

Status = ApprovalRequest.Status
# How much of the agent's message and of each input field the pages show.
SAID_LIMIT = 2000
FIELD_LIMIT = 80


def _shorten(value: Any, limit: int = FIELD_LIMIT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def input_summary(data: Any, *, fields: int = 4) -> dict[str, Any]:
    """A few key fields of a run's input, each shortened: ``items`` as (key, text) and how many
    fields are left out. Plain text for the template, which escapes it."""
    if not isinstance(data, dict):
        return {"items": [("input", _shorten(data))] if data not in (None, "") else [],
                "more": 0}
    # Plain values first, then nested ones, each by name: the same fields whichever database
    # kept the object (PostgreSQL's jsonb reorders keys).
    keys = sorted(data, key=lambda k: (isinstance(data[k], (dict, list)), str(k)))[:fields]
    return {"items": [(_shorten(k, 40), _shorten(data[k])) for k in keys],
            "more": max(len(data) - fields, 0)}


def _turn_of(approval: ApprovalRequest) -> tuple[str, int] | None:
    """(task, step) of the model turn that made the call, from its call key
    ``<run>:<task>:<step>:<index>``; None for a key of another shape (budgets, checks)."""
    prefix = f"{approval.run_id}:"
    if not approval.call_key.startswith(prefix):
        return None
    parts = approval.call_key[len(prefix):].rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    task, step, index = parts
    if not (step.isascii() and step.isdigit() and index.isascii() and index.isdigit()):
        return None
    return task, int(step)


def agent_messages(rows: list[ApprovalRequest]) -> dict[Any, str]:
    """The assistant text of the turn that made each request's call, by request id: read from
    the run's ``model.called`` event for that task and step (one query for all rows)."""
    turns = {a.pk: (a.run_id, *turn) for a in rows if (turn := _turn_of(a)) is not None}
    if not turns:
        return {}
    query = Q()
    for run_id, task, step in set(turns.values()):
        query |= Q(chain=run_id, data__task=task, data__step=step)
    said: dict[tuple[Any, str, int], str] = {}
    for chain, data in (Event.objects.filter(query, kind="model.called").order_by("seq")
                        .values_list("chain", "data")):
        response = data.get("response") if isinstance(data, dict) else None
        text = response.get("text") if isinstance(response, dict) else None
        if isinstance(text, str):
            said[(chain, data.get("task"), data.get("step"))] = text
    return {pk: _shorten(said[turn], SAID_LIMIT) for pk, turn in turns.items()
            if said.get(turn)}


def _run_inputs(rows: list[ApprovalRequest]) -> dict[Any, Any]:
    """Each request's run input: the copy the request keeps in its context, else the run's."""
    found = {a.run_id: a.context["run_input"] for a in rows
             if isinstance(a.context, dict) and "run_input" in a.context}
    missing = {a.run_id for a in rows} - set(found)
    if missing:
        found.update(Run.objects.filter(pk__in=missing).values_list("pk", "input"))
    return found


def change_rows(before: Any, after: Any) -> list[dict[str, Any]]:
    """What an edit changed, field by field, each marked ``changed``, ``added`` or ``removed``
    (approvals.arguments_changes shows a missing side as None, like a null value)."""
    def has(node: Any, field: str) -> bool:
        if not field:
            return True
        for part in field.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    rows = []
    for change in approvals.arguments_changes(before, after):
        kind = ("added" if not has(before, change["field"]) else
                "removed" if not has(after, change["field"]) else "changed")
        rows.append({**change, "kind": kind})
    return rows


def annotate(rows: list[ApprovalRequest], user: Any) -> None:
    """Give each request what the queue and the request page show besides the request itself
    (``run_input``, ``agent_said``, ``match``, ``progress``, ``edit_changes``, ``mine``: this
    person's own decision); decisions are prefetched or read here, with their deciders."""
    said = agent_messages(rows)
    inputs = _run_inputs(rows)
    for approval in rows:
        decisions = list(approval.decisions.all())
        original = approvals.original_arguments(approval, decisions)
        approval.edit_changes = change_rows(original, approval.arguments)  # type: ignore[attr-defined]
        approval.run_input = input_summary(inputs.get(approval.run_id))  # type: ignore[attr-defined]
        approval.agent_said = said.get(approval.pk, "")  # type: ignore[attr-defined]
        approval.match = explain.match_reason(approval)  # type: ignore[attr-defined]
        approval.progress = explain.approval_progress(  # type: ignore[attr-defined]
            approval, decisions)
        approval.mine = next(  # type: ignore[attr-defined]
            (d for d in decisions if d.decider_id == user.pk), None)


def _call_label(approval: ApprovalRequest) -> str:
    """"issue_refund (amount 250, order_id ORD-1042)": the call in a few words."""
    if approval.reason in responses.RESPONDABLE:
        return approval.get_reason_display()
    name = approval.tool or approval.get_reason_display()
    summary = input_summary(approval.arguments, fields=3)
    if not summary["items"]:
        return name
    shown = ", ".join(f"{k} {v}" for k, v in summary["items"])
    return f"{name} ({shown}{', …' if summary['more'] else ''})"


def _more(missing: int) -> str:
    return "one more" if missing == 1 else f"{missing} more"


def confirmation(approval: ApprovalRequest, kind: str, *, user: Any = None) -> str:
    """What a decision did, in words: for the row it was made from, the message after a plain
    POST, and the queue's list of recent decisions. ``kind`` is the person's decision; the
    request's status says what became of the request."""
    what = _call_label(approval)
    run = f"run {str(approval.run_id)[:8]}"
    status = approval.status
    if kind in (Decision.Kind.APPROVE, Decision.Kind.EDIT):
        verb = "Approved" if kind == Decision.Kind.APPROVE else "Approved with edits"
        if status == Status.PENDING:
            progress = explain.approval_progress(approval)
            return (f"{verb} {what} for {run}: {progress['count']} of {progress['required']} "
                    f"approvals recorded; waiting for {_more(progress['missing'])}")
        if status in (Status.APPROVED, Status.EDITED):
            return f"{verb} {what} for {run}: the run goes on"
        return f"{verb} {what} for {run}; the request was since {approval.get_status_display()}"
    if kind == Decision.Kind.REJECT:
        if approval.reason in (Reason.SENSITIVE_ACTION, Reason.QUESTION):
            return f"Rejected {what} for {run}: the agent is told, and the call is not made"
        if approval.reason in (Reason.QC_MISMATCH, Reason.LOW_CONFIDENCE):
            return f"Sent {what} back for {run}: the agent reworks the answer"
        if approval.reason in (Reason.PLAN_REVIEW, Reason.PLAN_INVALID):
            return f"Rejected the plan of {run}: the planner plans again, told your note"
        return f"Rejected {what} for {run}: the task fails"
    if kind == Decision.Kind.RAISE_BUDGET:
        return f"Raised the budget of {run}: the run goes on"
    if kind == Decision.Kind.STOP:
        return f"Stopped {run}"
    if kind == Decision.Kind.RESPOND:
        return f"Answered {what} for {run}: the run goes on"
    return f"Decision recorded for {what} on {run}"
