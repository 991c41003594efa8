"""Open, decide, expire and cancel approval requests. Every change is a ledger event written in
the same transaction, naming the person; resolutions are announced after commit."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import jsonschema
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, Group
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import transaction
from django.utils import timezone

from approvals import current, responses, rules
from approvals.explain import counted_approvals, match_record
from approvals.models import (
    BUDGET_REASONS,
    ApprovalRequest,
    Decision,
    Policy,
    PolicyVersion,
    Reason,
)
from approvals.signals import approval_opened, approval_resolved
from audit import config, hygiene, ledger
from audit.ledger import actor_of
from audit.models import Event
from hashchain import canonical_json
from jsonkit import schema_problems

DEFAULT_ESCALATION_GROUP = "reviewer"
DEFAULT_DEADLINE = timedelta(hours=24)
Status = ApprovalRequest.Status


class ApprovalError(Exception):
    """Refused with a message fit for the person; ``status`` is the HTTP code it maps to."""

    status = 400


class NotAllowed(ApprovalError):
    status = 403


class Conflict(ApprovalError):
    status = 409


class NotFound(ApprovalError):
    status = 404


def digest(arguments: Any) -> str:
    return hashlib.sha256(canonical_json(arguments).encode()).hexdigest()


def policy_match(*, tool: str, risk_class: str, arguments: Any,
                 fingerprint: Any = ...) -> PolicyVersion | None:
    """The strictest current policy that matches this call, or None (approvals/rules.py).
    ``fingerprint``: which versions are in force, as the caller just read it
    (approvals/current.py)."""
    return current.match(tool=tool, risk_class=risk_class, arguments=arguments,
                         known=fingerprint)


def policy_publish(*, policy: Policy, acting_user: AbstractBaseUser | None = None,
                   **fields: Any) -> PolicyVersion:
    with transaction.atomic():
        previous = (PolicyVersion.objects.filter(pk=policy.current_version_id).first()
                    if policy.current_version_id else None)
        last = policy.versions.order_by("-number").values_list("number", flat=True).first()
        version = PolicyVersion(policy=policy, number=(last or 0) + 1, **fields)
        try:
            # The model's own checks (conditions, required approvals): the admin form runs the
            # same ones, so what it accepts is published and what it refuses never is.
            version.full_clean()
        except ValidationError as exc:
            raise ApprovalError("; ".join(f"{field}: {' '.join(messages)}" for field, messages
                                          in exc.message_dict.items())) from None
        version.save()
        Policy.objects.filter(pk=policy.pk).update(current_version=version)
        policy.current_version = version
        _config_event(policy, previous, version, acting_user)
    return version


_POLICY_FIELDS = ("number", "tool", "risk_class", "conditions", "decider_group",
                  "required_approvals", "deadline_minutes", "on_expiry", "escalation_group")


def _config_event(policy: Policy, previous: PolicyVersion | None, version: PolicyVersion,
                  acting_user: AbstractBaseUser | None) -> None:
    """``config.policy.publish`` on the configuration chain, in the publishing transaction:
    the fields that changed from the previous version (all of them for the first)."""
    def values(v: PolicyVersion | None) -> dict[str, Any]:
        if v is None:
            return {}
        return {f: (str(getattr(v, f)) if f.endswith("group") and getattr(v, f) is not None
                    else getattr(v, f)) for f in _POLICY_FIELDS}

    config.record("policy.publish", model="approvals.policy", object=policy.slug,
                  old=values(previous), new=values(version), by=acting_user)


def request_open(
    *,
    run_id: uuid.UUID | str,
    task_key: str,
    reason: str,
    requested_by: str,
    call_key: str = "",
    tool: str = "",
    arguments: Any = None,
    detail: str = "",
    policy_version: PolicyVersion | None = None,
    run_started_by: AbstractBaseUser | None = None,
    context: dict[str, Any] | None = None,
    group_name: str = "",
) -> ApprovalRequest:
    """Open a request (call inside the transaction of the state change that needs it). Without
    a policy it goes to the group named ``group_name`` (a human task's), else to the default
    escalation group."""
    if reason not in Reason.values:
        raise ApprovalError(f"unknown escalation reason {reason!r}")
    arguments = {} if arguments is None else arguments
    if policy_version is not None:
        group = policy_version.decider_group
        required = policy_version.required_approvals
        deadline = timezone.now() + timedelta(minutes=policy_version.deadline_minutes)
    else:
        group, _ = Group.objects.get_or_create(name=group_name or DEFAULT_ESCALATION_GROUP)
        required = 1
        deadline = timezone.now() + DEFAULT_DEADLINE
    context = dict(context or {})
    if policy_version is not None:
        # Why the policy matched, with the values the call had: the reviewer reads it, and a
        # later edit (or a new policy version) must not change what the agent's call met.
        context["policy_match"] = match_record(policy_version, arguments)
    with transaction.atomic():
        request = ApprovalRequest.objects.create(
            run_id=run_id, task_key=task_key, call_key=call_key, tool=tool,
            arguments=arguments, arguments_digest=digest(arguments), reason=reason,
            detail=detail, policy_version=policy_version, decider_group=group,
            required_approvals=required, requested_by=requested_by,
            run_started_by=run_started_by, context=context, deadline=deadline,
        )
        ledger.append(uuid.UUID(str(run_id)), "approval.requested", {
            "request": str(request.pk), "task": task_key, "reason": reason, "tool": tool,
            "arguments": arguments, "arguments_digest": request.arguments_digest,
            "policy": str(policy_version) if policy_version else None,
            "group": group.name, "required_approvals": required,
            "deadline": deadline.isoformat(), "detail": detail,
        }, actor=requested_by)
        approval_opened.send(sender=ApprovalRequest, request=request)
    return request


# What a reviewer may submit as an edit of a request opened for another reason than a proposed
# action (e.g. a plan under review): registered by the app that opens such requests, which
# approvals does not import. A check returns "" or what is wrong with the edited value.
_edit_checks: dict[str, Callable[[ApprovalRequest, Any], str]] = {}


def register_edit_check(reason: str, check: Callable[[ApprovalRequest, Any], str]) -> None:
    _edit_checks[reason] = check


def can_decide(user: AbstractBaseUser, request: ApprovalRequest) -> str:
    """Empty when this person may decide the request; otherwise why not."""
    if not user.is_authenticated or not user.is_active:
        return "you must be signed in to decide"
    try:
        _ = user.agent_identity  # type: ignore[attr-defined]
    except (ObjectDoesNotExist, AttributeError):
        pass
    else:
        return "an agent identity can never decide an approval"
    if not user.groups.filter(pk=request.decider_group_id).exists():  # type: ignore[attr-defined]
        return f"only members of {request.decider_group.name!r} may decide this request"
    if request.run_started_by_id is not None and request.run_started_by_id == user.pk:
        return "you started this run, so you cannot decide its approvals"
    return ""


# The setting that caps each budget a raise may add (console/settings.py).
_RAISE_CEILINGS = {"tokens": "SWITCHBOARD_MAX_BUDGET_RAISE_TOKENS",
                   "steps": "SWITCHBOARD_MAX_BUDGET_RAISE_STEPS",
                   "tool_calls": "SWITCHBOARD_MAX_BUDGET_RAISE_STEPS",
                   "wall_s": "SWITCHBOARD_MAX_BUDGET_RAISE_WALL_S",
                   "cost": "SWITCHBOARD_MAX_BUDGET_RAISE_COST"}
# The budget cost columns keep 6 decimal places: a finer amount would be rounded silently.
_COST_QUANTUM = Decimal("0.000001")


def _parse_budget(budget: Any) -> dict[str, Any]:
    """A raise the run can apply: finite, positive, at most the configured ceiling. Refused
    here, before anything is written; applied later it could only crash the resume."""
    if not isinstance(budget, dict) or not budget:
        raise ApprovalError('raise_budget needs "budget": {"tokens": n, "cost": "x", "steps": n}')
    clean: dict[str, Any] = {}
    for key, value in budget.items():
        if key not in _RAISE_CEILINGS:
            raise ApprovalError(f"unknown budget {key!r}")
        ceiling = int(getattr(settings, _RAISE_CEILINGS[key]))
        if key != "cost":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ApprovalError(f"budget {key} must be a positive integer")
            if value > ceiling:
                raise ApprovalError(f"budget {key} may be raised by at most {ceiling} at once")
            clean[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
            raise ApprovalError("budget cost must be a decimal amount")
        try:
            amount = Decimal(str(value))
        except InvalidOperation:
            raise ApprovalError("budget cost must be a decimal amount") from None
        # NaN and Infinity parse as Decimals; NaN cannot even be compared with 0.
        if not amount.is_finite():
            raise ApprovalError("budget cost must be a finite amount, not NaN or Infinity")
        if amount <= 0:
            raise ApprovalError("budget cost must be positive")
        if amount > ceiling:
            raise ApprovalError(f"budget cost may be raised by at most {ceiling} at once")
        if amount != amount.quantize(_COST_QUANTUM):
            raise ApprovalError("budget cost may have at most 6 decimal places")
        clean[key] = str(amount)
    return clean


def request_decide(
    *,
    request_id: uuid.UUID | str,
    user: AbstractBaseUser,
    decision: str,
    arguments: Any = None,
    note: str = "",
    budget: Any = None,
    expected_digest: str | None = None,
    output: Any = None,
) -> ApprovalRequest:
    """Record one person's decision; resolve the request once it is decided. ``respond``
    answers a task for a person or an agent's question with ``output``."""
    if decision not in Decision.Kind.values:
        raise ApprovalError(f"decision must be one of {', '.join(Decision.Kind.values)}")
    try:
        # What a person typed goes into rows and the ledger: refuse what neither can hold.
        hygiene.check(arguments, "arguments")
        hygiene.check(budget, "budget")
        hygiene.check(note, "note")
        hygiene.check(output, "output")
    except hygiene.Refused as exc:
        raise ApprovalError(str(exc)) from None
    with transaction.atomic():
        try:
            request = ApprovalRequest.objects.select_for_update(of=("self",)).select_related(
                "decider_group").get(pk=request_id)
        except (ApprovalRequest.DoesNotExist, ValidationError, ValueError):
            raise NotFound("no such approval request") from None
        why_not = can_decide(user, request)
        if why_not:
            raise NotAllowed(why_not)
        if request.status == Status.CANCELLED:
            raise Conflict("the run was stopped; this request can no longer be decided")
        if request.status != Status.PENDING:
            raise Conflict(f"this request is already {request.get_status_display()}")
        if request.deadline <= timezone.now():
            raise Conflict("this request expired at " + request.deadline.isoformat())
        if expected_digest is not None and expected_digest != request.arguments_digest:
            raise Conflict("the arguments changed since you saw them (digest mismatch); "
                           "reload and decide again")
        if request.decisions.filter(decider=user).exists():
            raise Conflict("you have already decided this request")

        bound = request.arguments_digest
        new_arguments = None
        upgrade: PolicyVersion | None = None
        clean_budget: dict[str, Any] = {}
        if decision == Decision.Kind.EDIT and request.reason in _edit_checks:
            if not isinstance(arguments, dict):
                raise ApprovalError('edit needs "arguments": an object')
            problem = _edit_checks[request.reason](request, arguments)
            if problem:
                raise ApprovalError(f"the edit is refused, nothing was changed: {problem}")
            new_arguments = arguments
            bound = digest(arguments)
        elif decision == Decision.Kind.EDIT:
            if request.reason != Reason.SENSITIVE_ACTION:
                raise ApprovalError("only a proposed action's arguments can be edited")
            if not isinstance(arguments, dict):
                raise ApprovalError('edit needs "arguments": an object')
            schema = request.context.get("input_schema") or {"type": "object"}
            problems = schema_problems(jsonschema.Draft202012Validator(schema), arguments,
                                       limit=1)
            if problems:
                raise ApprovalError(f"edited arguments break the tool's schema: {problems[0]}")
            new_arguments = arguments
            bound = digest(arguments)
            # Edited arguments are a new request: they may fall under a stricter policy than the
            # one that matched the agent's call (a refund edited from 500 to 99999).
            upgrade = _stricter_policy(request, arguments)
            if upgrade is not None:
                group = _upgraded_group(request, upgrade)
                members = user.groups.filter(pk=group.pk)  # type: ignore[attr-defined]
                if group.pk != request.decider_group_id and not members.exists():
                    # The editor would count as one of the new policy's approvers.
                    raise NotAllowed(f"these arguments fall under policy {upgrade}, which only "
                                     f"members of {group.name!r} may decide; reject with a note "
                                     "instead")
        elif decision == Decision.Kind.RAISE_BUDGET:
            if request.reason not in BUDGET_REASONS:
                raise ApprovalError(f"raising the budget does not help a request for "
                                    f"{request.get_reason_display()}; approve, reject or stop "
                                    "the run")
            clean_budget = _parse_budget(budget)
        _check_response(request, decision, output)

        Decision.objects.create(request=request, decider=user, kind=decision,
                                arguments_digest=bound, arguments=new_arguments, note=note,
                                budget=clean_budget)
        recorded = {"request": str(request.pk), "decision": decision, "arguments_digest": bound,
                    "arguments": new_arguments, "note": note, "budget": clean_budget}
        if decision == Decision.Kind.RESPOND:
            recorded["output"] = output
        ledger.append(request.run_id, "approval.decision", recorded, actor=actor_of(user))

        if new_arguments is not None:
            if upgrade is not None:
                _upgrade(request, upgrade, before=request.arguments, after=new_arguments,
                         bound=bound, actor=actor_of(user))
            request.arguments = new_arguments
            request.arguments_digest = bound
        resolution: dict[str, Any] | None = None
        if decision in (Decision.Kind.APPROVE, Decision.Kind.EDIT):
            approvals = len(counted_approvals(list(request.decisions.all()),
                                              request.arguments_digest))
            if approvals >= request.required_approvals:
                request.status = Status.EDITED if decision == Decision.Kind.EDIT else (
                    Status.APPROVED)
                resolution = {"action": "proceed", "arguments": request.arguments}
        elif decision == Decision.Kind.REJECT:
            request.status = Status.REJECTED
            resolution = {"action": "reject", "note": note or "rejected by a reviewer"}
        elif decision == Decision.Kind.RAISE_BUDGET:
            request.status = Status.BUDGET_RAISED
            resolution = {"action": "raise_budget", "budget": clean_budget}
        elif decision == Decision.Kind.STOP:
            request.status = Status.STOPPED
            resolution = {"action": "stop", "note": note}
        elif decision == Decision.Kind.RESPOND:
            request.status = Status.RESPONDED
            resolution = {"action": "respond", "output": output}
        if resolution is not None:
            _resolve(request, resolution, actor=actor_of(user))
        else:
            request.save(update_fields=["arguments", "arguments_digest"])
    return request


def _check_response(request: ApprovalRequest, decision: str, output: Any) -> None:
    """A task for a person or an agent's question is answered (respond), rejected or stopped;
    only they are answered, and only with an output their schema accepts."""
    respondable = request.reason in responses.RESPONDABLE
    if decision == Decision.Kind.RESPOND:
        if not respondable:
            raise ApprovalError("only a task for a person or an agent's question can be "
                                "responded to")
        if output is None:
            raise ApprovalError('respond needs "output": an object')
        found = responses.problems(responses.schema_for(request.reason, request.context),
                                   output)
        if found:
            raise ApprovalError(f"the output does not match what the task asks for: "
                                f"{responses.describe(found)}")
    elif respondable and decision not in (Decision.Kind.REJECT, Decision.Kind.STOP):
        raise ApprovalError(f"this request ({request.get_reason_display()}) is answered "
                            "with respond, or rejected, or its run stopped")


def _risk_class(request: ApprovalRequest) -> str:
    """The risk class the call was matched with. The gate records it in the request's context;
    a request opened before it did falls back to its policy's class (blank there means the class
    did not matter to the match)."""
    value = (request.context or {}).get("risk_class")
    if value is None and request.policy_version_id is not None:
        value = request.policy_version.risk_class  # type: ignore[union-attr]
    return str(value or "")


def _stricter_policy(request: ApprovalRequest, arguments: Any) -> PolicyVersion | None:
    """The policy version edited arguments must be upgraded to, or None to keep the request's.

    Strictness is the number of approvals: a different version that needs more wins; on a tie,
    or when the edit needs fewer approvals or none, the request keeps its current (already
    stricter or equal) requirements, so editing can never lower the bar."""
    version = policy_match(tool=request.tool, risk_class=_risk_class(request),
                           arguments=arguments)
    if not rules.is_upgrade(version, same_version=version is not None
                            and version.pk == request.policy_version_id,
                            current_required=request.required_approvals):
        return None
    return version


def _upgraded_group(request: ApprovalRequest, version: PolicyVersion) -> Group:
    """Who decides after an upgrade: the new policy's group, unless the request already went to
    the second tier, where it stays (the second tier may decide anything of the first)."""
    if request.tier > 1:
        return request.decider_group
    return version.decider_group


def _upgrade(request: ApprovalRequest, version: PolicyVersion, *, before: Any, after: Any,
             bound: str, actor: str) -> None:
    """Put the request under ``version`` (inside the deciding transaction, the request row
    locked) and record why on the run's chain."""
    old = {"policy": str(request.policy_version) if request.policy_version_id else None,
           "required_approvals": request.required_approvals,
           "group": request.decider_group.name, "deadline": request.deadline.isoformat()}
    request.policy_version = version
    request.required_approvals = version.required_approvals
    group = _upgraded_group(request, version)
    request.decider_group = group
    if request.tier == 1:
        # The new policy's clock starts when its requirement does: the further approvers it
        # asks for need its full deadline to be found.
        request.deadline = timezone.now() + timedelta(minutes=version.deadline_minutes)
    request.context = {**(request.context or {}), "policy_match": match_record(version, after)}
    request.save(update_fields=["policy_version", "required_approvals", "decider_group",
                                "deadline", "context"])
    ledger.append(request.run_id, "approval.upgraded", {
        "request": str(request.pk), "task": request.task_key, "arguments_digest": bound,
        "old": old,
        "new": {"policy": str(version), "required_approvals": version.required_approvals,
                "group": group.name, "deadline": request.deadline.isoformat()},
        "why": f"the edited arguments match policy {version}, which needs "
               f"{version.required_approvals} approvals",
        "changes": arguments_changes(before, after),
    }, actor=actor)


_MISSING = object()


def arguments_changes(before: Any, after: Any, *, prefix: str = "") -> list[dict[str, Any]]:
    """Field by field what an edit changed, nested objects as dotted paths (the way a policy
    condition names them). A field that was added or removed shows None on its missing side."""
    if isinstance(before, dict) and isinstance(after, dict):
        changes: list[dict[str, Any]] = []
        for key in sorted(set(before) | set(after), key=str):
            old, new = before.get(key, _MISSING), after.get(key, _MISSING)
            path = f"{prefix}{key}"
            if isinstance(old, dict) and isinstance(new, dict):
                changes.extend(arguments_changes(old, new, prefix=path + "."))
            elif old is _MISSING or new is _MISSING or canonical_json(old) != canonical_json(new):
                changes.append({"field": path, "from": None if old is _MISSING else old,
                                "to": None if new is _MISSING else new})
        return changes
    if canonical_json(before) == canonical_json(after):
        return []
    return [{"field": prefix.rstrip(".") or "", "from": before, "to": after}]


def original_arguments(request: ApprovalRequest, decisions: list[Decision] | None = None) -> Any:
    """The arguments the request was opened with, before any reviewer's edit.

    Read from the request's ``approval.requested`` ledger event, and only when someone edited
    (otherwise they are the current ones): the ledger is where the original survives."""
    if decisions is None:
        edited = request.decisions.filter(kind=Decision.Kind.EDIT).exists()
    else:
        edited = any(d.kind == Decision.Kind.EDIT for d in decisions)
    if not edited:
        return request.arguments
    opened = Event.objects.filter(chain=request.run_id, kind="approval.requested",
                                  data__request=str(request.pk)).values_list(
                                      "data", flat=True).first()
    if not opened or "arguments" not in opened:
        return request.arguments
    return opened["arguments"]


def _resolve(request: ApprovalRequest, resolution: dict[str, Any], *, actor: str) -> None:
    request.resolution = resolution
    request.decided_at = timezone.now()
    request.save(update_fields=["status", "resolution", "decided_at", "arguments",
                                "arguments_digest"])
    ledger.append(request.run_id, "approval.resolved", {
        "request": str(request.pk), "status": request.status, "resolution": resolution,
    }, actor=actor)
    # Sent inside the deciding transaction: a receiver's outbox message (orchestration resumes
    # the task) commits with the decision or not at all.
    approval_resolved.send(sender=ApprovalRequest, request=request)


def requests_expire(*, now: Any = None) -> int:
    """The deadline sweep: reject, or hand to the second tier, whatever is overdue."""
    now = now or timezone.now()
    done = 0
    overdue = ApprovalRequest.objects.filter(status=Status.PENDING, deadline__lte=now)
    for pk in overdue.values_list("pk", flat=True):
        with transaction.atomic():
            request = ApprovalRequest.objects.select_for_update(of=("self",)).select_related(
                "policy_version").get(pk=pk)
            if request.status != Status.PENDING or request.deadline > now:
                continue
            version = request.policy_version
            if (version is not None and version.on_expiry == PolicyVersion.OnExpiry.ESCALATE
                    and version.escalation_group_id and request.tier == 1):
                request.tier = 2
                request.decider_group_id = version.escalation_group_id
                request.deadline = now + timedelta(minutes=version.deadline_minutes)
                request.save(update_fields=["tier", "decider_group", "deadline"])
                ledger.append(request.run_id, "approval.escalated", {
                    "request": str(request.pk), "tier": 2,
                    "group": version.escalation_group.name,
                    "deadline": request.deadline.isoformat(),
                }, actor="system")
                approval_opened.send(sender=ApprovalRequest, request=request)
            else:
                request.status = Status.EXPIRED
                _resolve(request, {"action": "reject",
                                   "note": "no decision before the deadline"}, actor="system")
            done += 1
    return done


def requests_cancel_for_run(run_id: uuid.UUID | str, *, actor: str,
                            lock_only: bool = False) -> int:
    """Cancel a run's pending requests (inside the caller's transaction). ``lock_only`` just
    takes their row locks, for a caller that must hold them before it appends elsewhere."""
    pending = ApprovalRequest.objects.select_for_update().filter(run_id=run_id,
                                                                 status=Status.PENDING)
    if lock_only:
        return len(list(pending.values_list("pk", flat=True)))
    count = 0
    for request in pending:
        request.status = Status.CANCELLED
        request.decided_at = timezone.now()
        request.save(update_fields=["status", "decided_at"])
        ledger.append(request.run_id, "approval.cancelled", {"request": str(request.pk)},
                      actor=actor)
        count += 1
    return count


def pending_for(user: AbstractBaseUser):  # type: ignore[no-untyped-def]
    """Pending requests this person may decide, oldest deadline first."""
    groups = user.groups.all()  # type: ignore[attr-defined]
    qs = ApprovalRequest.objects.filter(status=Status.PENDING, decider_group__in=groups)
    if user.pk is not None:
        qs = qs.exclude(run_started_by=user)
    return qs.select_related("decider_group", "policy_version__policy").order_by("deadline")
