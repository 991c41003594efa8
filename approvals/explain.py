"""What a reviewer is told about a request besides the request itself: why its policy matched
(recorded when the request is opened, so a later policy version or edit cannot rewrite it) and
how many of the required approvals are in, from whom and when."""

from __future__ import annotations

from typing import Any

from approvals import conditions
from approvals.models import ApprovalRequest, Decision, PolicyVersion
from hashchain import canonical_json


def match_record(version: PolicyVersion, arguments: Any) -> dict[str, Any]:
    """What made ``version`` match a call: its tool and risk class, and each condition with the
    value the call had there (JSON, kept in the request's context)."""
    checked = []
    for condition in version.conditions or []:
        found, value = conditions.argument(condition, arguments)
        checked.append({"condition": condition, "found": found, "value": value})
    return {"policy": version.policy.slug, "version": version.number, "tool": version.tool,
            "risk_class": version.risk_class, "conditions": checked}


def match_reason(request: ApprovalRequest) -> dict[str, Any] | None:
    """Why the request's policy matched, for people: ``label`` ("refund-over-1000 v1") and
    ``clauses`` ("amount > 1000 (the call has 5000)"); None when no policy matched (an
    escalation). A request opened before the match was recorded is explained from its policy
    version (immutable) and its current arguments."""
    record = (request.context or {}).get("policy_match")
    if not isinstance(record, dict):
        if request.policy_version_id is None:
            return None
        record = match_record(request.policy_version, request.arguments)  # type: ignore[arg-type]
    clauses = [f"tool is {record['tool']}" if record.get("tool") else "any tool"]
    if record.get("risk_class"):
        clauses.append(f"risk class is {record['risk_class']}")
    for item in record.get("conditions") or []:
        condition = item.get("condition")
        try:
            parsed = conditions.parse(condition)
        except conditions.ConditionInvalid:
            clauses.append(f"unreadable condition {canonical_json(condition)} "
                           "(counts as holding)")
            continue
        has = (f"the call has {canonical_json(item.get('value'))}" if item.get("found")
               else "not in the call")
        clauses.append(f"{'.'.join(parsed.path)} {parsed.op} "
                       f"{canonical_json(parsed.value)} ({has})")
    return {"label": f"{record.get('policy')} v{record.get('version')}",
            "policy": record.get("policy"), "version": record.get("version"),
            "clauses": clauses}


def counted_approvals(decisions: list[Decision], bound: str) -> list[Decision]:
    """The decisions that count towards a request's required approvals: approvals (plain or
    with edits) of the arguments as they are now, one per person. An approval given before an
    edit changed the arguments does not count for the edited ones."""
    seen: set[Any] = set()
    counted = []
    for d in decisions:
        if (d.kind in (Decision.Kind.APPROVE, Decision.Kind.EDIT) and d.arguments_digest == bound
                and d.decider_id not in seen):
            seen.add(d.decider_id)
            counted.append(d)
    return counted


def approval_progress(request: ApprovalRequest,
                      decisions: list[Decision] | None = None) -> dict[str, Any]:
    """M of N: how many of the required approvals are in, who gave them and when, and the
    approvals that no longer count (given for arguments an edit has since changed)."""
    if decisions is None:
        decisions = list(request.decisions.select_related("decider"))
    counted = counted_approvals(decisions, request.arguments_digest)
    stale = [d for d in decisions if d.kind in (Decision.Kind.APPROVE, Decision.Kind.EDIT)
             and d not in counted]
    return {"count": len(counted), "required": request.required_approvals,
            "missing": max(request.required_approvals - len(counted), 0),
            "approvals": counted, "stale": stale}
