"""The Django answers to the engine's governance questions.

Budgets stack run → task → agent loop. A reservation is one conditional UPDATE per level, in
one transaction: the WHERE clause re-checks the cap against used + reserved + the new worst case
on the locked row, so two concurrent calls can never both pass a check only one of them fits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from functools import cache
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest, Reason
from orchestration.engine.governance import ALLOW, Gate, Usage
from orchestration.models import Run, Task, Tool, ToolUsage

log = logging.getLogger("switchboard.governance")


class _Refused(Exception):
    pass


def _fits_run(worst: Usage) -> Q:
    return (
        (Q(budget_tokens__isnull=True) |
         Q(budget_tokens__gte=F("tokens_in") + F("tokens_out") + F("reserved_tokens")
           + worst.tokens))
        & (Q(budget_cost__isnull=True) |
           Q(budget_cost__gte=F("cost") + F("reserved_cost") + worst.cost))
        & (Q(budget_steps__isnull=True) |
           Q(budget_steps__gte=F("steps") + F("reserved_steps") + worst.steps))
    )


def _fits_task(worst: Usage) -> Q:
    return (
        (Q(budget_tokens__isnull=True) |
         Q(budget_tokens__gte=F("used_tokens") + F("reserved_tokens") + worst.tokens))
        & (Q(budget_cost__isnull=True) |
           Q(budget_cost__gte=F("used_cost") + F("reserved_cost") + worst.cost))
    )


def reserve(run_id: str, task_key: str, worst: Usage) -> str:
    try:
        with transaction.atomic():
            run_ok = Run.objects.filter(pk=run_id).filter(_fits_run(worst)).update(
                reserved_tokens=F("reserved_tokens") + worst.tokens,
                reserved_cost=F("reserved_cost") + worst.cost,
                reserved_steps=F("reserved_steps") + worst.steps,
            )
            if not run_ok:
                raise _Refused(_why_run(run_id, worst))
            task_ok = Task.objects.filter(run_id=run_id, key=task_key).filter(
                _fits_task(worst)).update(
                reserved_tokens=F("reserved_tokens") + worst.tokens,
                reserved_cost=F("reserved_cost") + worst.cost,
            )
            if not task_ok:
                raise _Refused(_why_task(run_id, task_key, worst))
    except _Refused as refused:
        return str(refused)
    run = Run.objects.only("budget_wall_s", "created_at").get(pk=run_id)
    if run.budget_wall_s and timezone.now() > run.created_at + timedelta(
            seconds=run.budget_wall_s):
        release(run_id, task_key, worst)
        return f"budget_exhausted: the run's wall-time budget of {run.budget_wall_s} s is spent"
    return ""


def release(run_id: str, task_key: str, reserved: Usage) -> None:
    with transaction.atomic():
        settle(run_id, task_key, reserved, Usage())


def settle(run_id: str, task_key: str, reserved: Usage | None, actual: Usage) -> None:
    """Swap a reservation for the real usage (call inside the step's transaction)."""
    reserved = reserved or Usage()
    Run.objects.filter(pk=run_id).update(
        reserved_tokens=F("reserved_tokens") - reserved.tokens,
        reserved_cost=F("reserved_cost") - reserved.cost,
        reserved_steps=F("reserved_steps") - reserved.steps,
        steps=F("steps") + actual.steps,
        tool_calls=F("tool_calls") + actual.tool_calls,
        tokens_in=F("tokens_in") + actual.tokens_in,
        tokens_out=F("tokens_out") + actual.tokens_out,
        cost=F("cost") + actual.cost,
        updated_at=timezone.now(),
    )
    Task.objects.filter(run_id=run_id, key=task_key).update(
        reserved_tokens=F("reserved_tokens") - reserved.tokens,
        reserved_cost=F("reserved_cost") - reserved.cost,
        used_tokens=F("used_tokens") + actual.tokens,
        used_cost=F("used_cost") + actual.cost,
    )


def _why_run(run_id: str, worst: Usage) -> str:
    run = Run.objects.get(pk=run_id)
    if run.budget_tokens is not None and (
            run.tokens_in + run.tokens_out + run.reserved_tokens + worst.tokens
            > run.budget_tokens):
        return (f"budget_exhausted: run tokens {run.tokens_in + run.tokens_out} used + "
                f"{run.reserved_tokens} reserved + {worst.tokens} needed > cap {run.budget_tokens}")
    if run.budget_cost is not None and run.cost + run.reserved_cost + worst.cost > run.budget_cost:
        return (f"budget_exhausted: run cost {run.cost} used + {run.reserved_cost} reserved + "
                f"{worst.cost} needed > cap {run.budget_cost}")
    return (f"budget_exhausted: run steps {run.steps} used + {run.reserved_steps} reserved + "
            f"{worst.steps} needed > cap {run.budget_steps}")


def _why_task(run_id: str, key: str, worst: Usage) -> str:
    task = Task.objects.get(run_id=run_id, key=key)
    if task.budget_tokens is not None and (
            task.used_tokens + task.reserved_tokens + worst.tokens > task.budget_tokens):
        return (f"budget_exhausted: task {key} tokens {task.used_tokens} used + "
                f"{worst.tokens} needed > cap {task.budget_tokens}")
    return (f"budget_exhausted: task {key} cost {task.used_cost} used + {worst.cost} needed > "
            f"cap {task.budget_cost}")


@cache
def _limiter() -> Any:
    from limits import storage, strategies

    uri = settings.REDIS_URL or "memory://"
    return strategies.MovingWindowRateLimiter(storage.storage_from_string(uri))


def _window_item(per: int, seconds: int) -> Any:
    from limits import RateLimitItemPerSecond

    return RateLimitItemPerSecond(per, seconds)


def _rate_item(text: str) -> Any:
    from limits import parse

    return parse(text)


class DjangoGovernor:
    def __init__(self, *, run: Run, task_key: str, actor: str) -> None:
        self.run = run
        self.run_id = str(run.pk)
        self.task_key = task_key
        self.actor = actor
        self._tools = {t.slug: t for t in Tool.objects.all()}

    # budgets --------------------------------------------------------------------------
    def reserve(self, worst: Usage) -> str:
        return reserve(self.run_id, self.task_key, worst)

    def release(self, reserved: Usage) -> None:
        release(self.run_id, self.task_key, reserved)

    # approvals ------------------------------------------------------------------------
    def _latest(self, key: str, reasons: list[str]) -> ApprovalRequest | None:
        return (ApprovalRequest.objects.filter(run_id=self.run_id, call_key=key,
                                               reason__in=reasons)
                .order_by("-created_at").first())

    def gate(self, tool: Any, arguments: Mapping[str, Any], key: str) -> Gate:
        request = self._latest(key, [Reason.SENSITIVE_ACTION])
        if request is not None:
            status = request.status
            if status in (ApprovalRequest.Status.APPROVED, ApprovalRequest.Status.EDITED):
                return Gate("allow", arguments=request.arguments)
            if status == ApprovalRequest.Status.PENDING:
                return Gate("wait", message=str(request.pk))
            note = (request.resolution or {}).get("note") or f"request {status}"
            return Gate("deny", message=note)
        row = self._tools.get(tool.name)
        version = approvals.policy_match(tool=tool.name, risk_class=row.risk_class if row else "",
                                         arguments=dict(arguments))
        if version is None:
            return ALLOW
        with transaction.atomic():
            request = approvals.request_open(
                run_id=self.run_id, task_key=self.task_key, call_key=key, tool=tool.name,
                arguments=dict(arguments), reason=Reason.SENSITIVE_ACTION,
                detail=f"policy {version.policy.slug} v{version.number} matched",
                policy_version=version, requested_by=self.actor,
                run_started_by=self.run.created_by,
                context=self._context(tool),
            )
        return Gate("wait", message=str(request.pk))

    def _context(self, tool: Any) -> dict[str, Any]:
        return {"input_schema": dict(tool.input_schema), "process":
                self.run.process_version.process.slug, "run_input": self.run.input,
                "task": self.task_key}

    def outcome_decision(self, key: str) -> str:
        request = self._latest(key, [Reason.UNKNOWN_OUTCOME])
        if request is None:
            return ""
        if request.status in (ApprovalRequest.Status.APPROVED, ApprovalRequest.Status.EDITED):
            return "rerun"
        if request.status == ApprovalRequest.Status.PENDING:
            return ""
        return "reject"

    # quotas and rate limits -------------------------------------------------------------
    def admit(self, tool: Any, key: str) -> str:
        row = self._tools.get(tool.name)
        if row is None:
            return ""
        overridden = self._latest(key, [Reason.QUOTA_EXHAUSTED])
        if overridden is not None and overridden.status in (
                ApprovalRequest.Status.APPROVED, ApprovalRequest.Status.EDITED):
            return ""
        if row.quota_per_run is not None:
            usage, _ = ToolUsage.objects.get_or_create(run_id=self.run_id, tool=row.slug)
            claimed = ToolUsage.objects.filter(
                pk=usage.pk, calls__lt=row.quota_per_run + F("allowance")
            ).update(calls=F("calls") + 1)
            if not claimed:
                return (f"quota_exhausted: {row.slug} may be called {row.quota_per_run} times "
                        "per run")
        if row.quota_per_window is not None:
            item = _window_item(row.quota_per_window, row.quota_window_s)
            if not _limiter().hit(item, "quota", row.slug):
                return (f"quota_exhausted: {row.slug} may be called {row.quota_per_window} "
                        f"times per {row.quota_window_s} s across all runs")
        if row.rate_limit:
            item = _rate_item(row.rate_limit)
            deadline = timezone.now() + timedelta(seconds=5)
            while not _limiter().hit(item, "rate", row.slug):
                if timezone.now() > deadline:
                    return f"quota_exhausted: {row.slug} is rate limited to {row.rate_limit}"
                import time

                time.sleep(0.05)
        return ""


def open_escalation(*, run_id: str, task_key: str, escalation: Mapping[str, Any],
                    actor: str) -> ApprovalRequest | None:
    """Called in the transaction that parks a task: a person must decide what happens next."""
    reason = escalation.get("reason", "")
    if reason == "awaiting_approval" or reason not in Reason.values:
        return None
    run = Run.objects.select_related("created_by").get(pk=run_id)
    return approvals.request_open(
        run_id=run_id, task_key=task_key, call_key=escalation.get("call_key", ""),
        tool=escalation.get("tool", ""), arguments=escalation.get("arguments") or {},
        reason=reason, detail=escalation.get("detail", ""), requested_by=actor,
        run_started_by=run.created_by, context={"task": task_key},
    )


def money(value: Any) -> Decimal:
    return Decimal(str(value))
