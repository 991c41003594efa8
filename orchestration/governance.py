"""The Django answers to the engine's governance questions.

Budgets stack run → task → agent loop. A reservation is one conditional UPDATE per level, in
one transaction: the WHERE clause re-checks the cap against used + reserved + the new worst case
on the locked row, so two concurrent calls can never both pass a check only one of them fits.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from functools import cache
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest, Reason
from orchestration import metrics, rules
from orchestration.engine.governance import ALLOW, Gate, Usage
from orchestration.models import Agent, KillSwitch, Run, Task, Tool, ToolUsage

log = logging.getLogger("switchboard.governance")


class _Refused(Exception):
    pass


# The hot path of every model and tool call: plain SQL, built once. The ORM's F() arithmetic
# costs about a millisecond of Python per statement; these run in tens of microseconds.
_RESERVE_RUN = """
UPDATE orchestration_run
   SET reserved_tokens = reserved_tokens + %(tokens)s,
       reserved_cost = reserved_cost + %(cost)s,
       reserved_steps = reserved_steps + %(steps)s
 WHERE id = %(run)s
   AND (budget_tokens IS NULL
        OR budget_tokens >= tokens_in + tokens_out + reserved_tokens + %(tokens)s)
   AND (budget_cost IS NULL OR budget_cost >= cost + reserved_cost + %(cost)s)
   AND (budget_steps IS NULL OR budget_steps >= steps + reserved_steps + %(steps)s)
"""
_RESERVE_TASK = """
UPDATE orchestration_task
   SET reserved_tokens = reserved_tokens + %(tokens)s,
       reserved_cost = reserved_cost + %(cost)s,
       reserved_steps = reserved_steps + %(steps)s
 WHERE run_id = %(run)s AND "key" = %(key)s
   AND (budget_tokens IS NULL OR budget_tokens >= used_tokens + reserved_tokens + %(tokens)s)
   AND (budget_cost IS NULL OR budget_cost >= used_cost + reserved_cost + %(cost)s)
"""
_SETTLE_RUN = """
UPDATE orchestration_run
   SET reserved_tokens = reserved_tokens - %(r_tokens)s,
       reserved_cost = reserved_cost - %(r_cost)s,
       reserved_steps = reserved_steps - %(r_steps)s,
       steps = steps + %(steps)s,
       tool_calls = tool_calls + %(tool_calls)s,
       tokens_in = tokens_in + %(tokens_in)s,
       tokens_out = tokens_out + %(tokens_out)s,
       cost = cost + %(cost)s,
       updated_at = %(now)s
 WHERE id = %(run)s
"""
_SETTLE_TASK = """
UPDATE orchestration_task
   SET reserved_tokens = reserved_tokens - %(r_tokens)s,
       reserved_cost = reserved_cost - %(r_cost)s,
       reserved_steps = reserved_steps - %(r_steps)s,
       used_tokens = used_tokens + %(tokens)s,
       used_cost = used_cost + %(cost)s
 WHERE run_id = %(run)s AND "key" = %(key)s
"""


def _execute(sql: str, params: dict[str, Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _run_param(run_id: Any) -> Any:
    value = run_id if isinstance(run_id, uuid.UUID) else uuid.UUID(str(run_id))
    return Run._meta.pk.get_db_prep_value(value, connection)


def _money(value: Decimal) -> Any:
    return connection.ops.adapt_decimalfield_value(value, 14, 6)


def _relaxed_commit() -> None:
    """A reservation need not wait for its WAL flush on PostgreSQL.

    Locks and visibility are unchanged, so concurrent reservations still cannot overspend. Only
    a crash of the database server itself could drop a reservation, and then only together with
    everything its call would have recorded: the step that records the call's result commits
    synchronously, which flushes the WAL up to and including this reservation."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def reserve(run_id: str, task_key: str, worst: Usage, *, run: Run | None = None) -> str:
    """Reserve ``worst`` against the run's and the task's budgets; "" or why it was refused.

    ``run``, when given, supplies the wall-time budget and start (neither changes while a task
    runs: a raise happens while it is parked) and saves reading them again."""
    params = {"run": _run_param(run_id), "key": task_key, "tokens": worst.tokens,
              "cost": _money(worst.cost), "steps": worst.steps}
    try:
        with transaction.atomic():
            _relaxed_commit()
            if not _execute(_RESERVE_RUN, params):
                raise _Refused(_why_run(run_id, worst))
            # No task key: a call of the run itself (its planner's), against the run's budgets.
            if task_key and not _execute(_RESERVE_TASK, params):
                raise _Refused(_why_task(run_id, task_key, worst))
    except _Refused as refused:
        metrics.refused(str(refused))
        return str(refused)
    if run is None:
        run = Run.objects.only("budget_wall_s", "created_at").get(pk=run_id)
    if run.budget_wall_s and timezone.now() > run.created_at + timedelta(
            seconds=run.budget_wall_s):
        release(run_id, task_key, worst)
        spent = f"budget_exhausted: the run's wall-time budget of {run.budget_wall_s} s is spent"
        metrics.refused(spent)
        return spent
    return ""


def release(run_id: str, task_key: str, reserved: Usage) -> None:
    with transaction.atomic():
        settle(run_id, task_key, reserved, Usage())


def settle(run_id: str, task_key: str, reserved: Usage | None, actual: Usage) -> None:
    """Swap a reservation for the real usage (call inside the step's transaction)."""
    reserved = reserved or Usage()
    params = {
        "run": _run_param(run_id), "key": task_key,
        "r_tokens": reserved.tokens, "r_cost": _money(reserved.cost), "r_steps": reserved.steps,
        "steps": actual.steps, "tool_calls": actual.tool_calls, "tokens_in": actual.tokens_in,
        "tokens_out": actual.tokens_out, "tokens": actual.tokens, "cost": _money(actual.cost),
        "now": connection.ops.adapt_datetimefield_value(timezone.now()),
    }
    _execute(_SETTLE_RUN, params)
    if task_key:
        _execute(_SETTLE_TASK, params)


def release_held(run_id: str, task_key: str) -> Usage:
    """Give back whatever a lost worker still had reserved for the task (inside the takeover's
    transaction): its calls in flight died with it."""
    with connection.cursor() as cursor:
        cursor.execute(
            'SELECT reserved_tokens, reserved_cost, reserved_steps FROM orchestration_task'
            ' WHERE run_id = %s AND "key" = %s', [_run_param(run_id), task_key])
        row = cursor.fetchone()
    if row is None or not any(row):
        return Usage()
    held = Usage(tokens_in=int(row[0]), cost=Decimal(str(row[1])), steps=int(row[2]))
    settle(run_id, task_key, held, Usage())
    return held


def _why_run(run_id: str, worst: Usage) -> str:
    run = Run.objects.get(pk=run_id)
    if rules.over_cap(run.budget_tokens, run.tokens_in + run.tokens_out, run.reserved_tokens,
                      worst.tokens):
        return (f"budget_exhausted: run tokens {run.tokens_in + run.tokens_out} used + "
                f"{run.reserved_tokens} reserved + {worst.tokens} needed > cap {run.budget_tokens}")
    if rules.over_cap(run.budget_cost, run.cost, run.reserved_cost, worst.cost):
        return (f"budget_exhausted: run cost {run.cost} used + {run.reserved_cost} reserved + "
                f"{worst.cost} needed > cap {run.budget_cost}")
    return (f"budget_exhausted: run steps {run.steps} used + {run.reserved_steps} reserved + "
            f"{worst.steps} needed > cap {run.budget_steps}")


def _why_task(run_id: str, key: str, worst: Usage) -> str:
    task = Task.objects.get(run_id=run_id, key=key)
    if rules.over_cap(task.budget_tokens, task.used_tokens, task.reserved_tokens,
                      worst.tokens):
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


@cache
def _stop_sql() -> str:
    user = get_user_model()._meta
    return f"""
SELECT r.cancel_requested,
       (SELECT k.id
          FROM {KillSwitch._meta.db_table} k
         WHERE k.released_at IS NULL
           AND (k.scope = 'all' OR (k.scope = 'process' AND k.target = %(process)s)
                OR (k.scope = 'agent' AND k.target = %(agent)s)
                OR (k.scope = 'tool' AND k.target = %(tool)s))
         ORDER BY k.engaged_at LIMIT 1),
       (SELECT CASE WHEN a.status = 'active' AND u.{user.get_field("is_active").column}
                    THEN 1 ELSE 0 END
          FROM {Agent._meta.db_table} a JOIN {user.db_table} u
            ON u.{user.pk.column} = a.user_id
         WHERE a.slug = %(agent)s)
  FROM {Run._meta.db_table} r WHERE r.id = %(run)s
"""


class DjangoGovernor:
    def __init__(self, *, run: Run, task_key: str, actor: str, agent: str = "",
                 tools: Mapping[str, Tool] | None = None) -> None:
        self.run = run
        self.run_id = str(run.pk)
        self.task_key = task_key
        self.actor = actor
        self.agent = agent
        self.process = run.process_version.process.slug
        self._tools = tools if tools is not None else {t.slug: t for t in Tool.objects.all()}
        self._requests_key: str | None = None
        self._requests: list[ApprovalRequest] = []

    # stop signals ---------------------------------------------------------------------
    def stopped(self, tool: str | None = None, key: str = "") -> str:
        """One query before every model and tool call: the run cancelled, a kill switch on
        everything, this process, this agent or this tool, or the agent retired."""
        with connection.cursor() as cursor:
            cursor.execute(_stop_sql(), {"run": _run_param(self.run_id), "process": self.process,
                                         "agent": self.agent or None, "tool": tool or None})
            row = cursor.fetchone()
        if row is None:
            return "cancelled: the run no longer exists"
        cancel, switch, agent_active = row
        if cancel:
            return "cancelled: the run was cancelled"
        if switch:
            engaged = KillSwitch.objects.filter(pk=switch).first()  # rare: only when stopping
            if engaged is not None:
                return engaged.pause_reason()
        if self.agent and not agent_active:
            return (f"agent_retired: {self.agent} is retired; a person must decide what "
                    "happens")
        return ""

    # budgets --------------------------------------------------------------------------
    def reserve(self, worst: Usage) -> str:
        return reserve(self.run_id, self.task_key, worst, run=self.run)

    def release(self, reserved: Usage) -> None:
        release(self.run_id, self.task_key, reserved)

    # approvals ------------------------------------------------------------------------
    def _latest(self, key: str, reasons: list[str]) -> ApprovalRequest | None:
        """The newest request about call ``key`` for one of ``reasons``.

        The requests of one call are read once per call (gate, quota and outcome checks all
        ask) and read again after this governor opens one."""
        if self._requests_key != key:
            self._requests = list(ApprovalRequest.objects.filter(
                run_id=self.run_id, call_key=key).order_by("-created_at"))
            self._requests_key = key
        return next((r for r in self._requests if r.reason in reasons), None)

    def gate(self, tool: Any, arguments: Mapping[str, Any], key: str) -> Gate:
        if tool.name == rules.ASK_HUMAN:
            return self._question(tool, arguments, key)
        request = self._latest(key, [Reason.SENSITIVE_ACTION])
        if request is not None:
            return rules.gate_from_request(request.status, request.arguments,
                                           (request.resolution or {}).get("note") or "",
                                           str(request.pk))
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
        self._requests_key = None
        return Gate("wait", message=str(request.pk))

    def _question(self, tool: Any, arguments: Mapping[str, Any], key: str) -> Gate:
        """An agent asks a person (``ask_human``): the call waits on a ``question`` request
        to the reviewers, and goes through with the answer once someone responds."""
        request = self._latest(key, [Reason.QUESTION])
        if request is not None:
            resolution = request.resolution or {}
            return rules.gate_from_question(request.status, arguments, resolution.get("output"),
                                            str(resolution.get("note") or ""), str(request.pk))
        question = str(arguments.get("question", ""))
        with transaction.atomic():
            request = approvals.request_open(
                run_id=self.run_id, task_key=self.task_key, call_key=key, tool=tool.name,
                arguments=dict(arguments), reason=Reason.QUESTION,
                detail=f"{self.agent or self.actor} asks: {question[:200]}",
                requested_by=self.actor, run_started_by=self.run.created_by,
                context={"question": question, "agent": self.agent or self.actor,
                         "task": self.task_key, "run_input": self.run.input,
                         "process": self.process})
        self._requests_key = None
        return Gate("wait", message=str(request.pk))

    def _context(self, tool: Any) -> dict[str, Any]:
        # risk_class: a reviewer's edit is matched against the policies again, with the same
        # class the call was matched with here.
        row = self._tools.get(tool.name)
        return {"input_schema": dict(tool.input_schema), "process":
                self.run.process_version.process.slug, "run_input": self.run.input,
                "task": self.task_key, "risk_class": row.risk_class if row else ""}

    def outcome_decision(self, key: str) -> str:
        request = self._latest(key, [Reason.UNKNOWN_OUTCOME])
        return rules.outcome_from_request(request.status if request is not None else None)

    def qc_decision(self, key: str) -> tuple[str, str]:
        """A person's decision on a task's failed checks (orchestration/rules.py)."""
        request = self._latest(key, [Reason.QC_MISMATCH, Reason.LOW_CONFIDENCE])
        if request is None:
            return rules.qc_from_request(None, "")
        return rules.qc_from_request(request.status, (request.resolution or {}).get("note", ""))

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
    metrics.escalated(reason)
    return approvals.request_open(
        run_id=run_id, task_key=task_key, call_key=escalation.get("call_key", ""),
        tool=escalation.get("tool", ""), arguments=escalation.get("arguments") or {},
        reason=reason, detail=escalation.get("detail", ""), requested_by=actor,
        run_started_by=run.created_by, group_name=escalation.get("group", ""),
        context={"task": task_key, **(escalation.get("context") or {})},
    )
