"""The Django answers to the engine's governance questions: stop signals and grants
(orchestration/precheck.py), budgets (orchestration/budgets.py), approval policies, quotas and
rate limits."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from functools import cache
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest, Reason
from orchestration import metrics, rules
from orchestration.budgets import Ahead, release, reserve, reserve_unless_stopped, run_param
from orchestration.engine.governance import ALLOW, Gate, Usage
from orchestration.models import KillSwitch, Run, Tool, ToolUsage
from orchestration.precheck import grant_checker, grant_params, stop_statement

log = logging.getLogger("switchboard.governance")


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
    def __init__(self, *, run: Run, task_key: str, actor: str, agent: str = "",
                 tools: Mapping[str, Tool] | None = None, grantee: Any = None,
                 lease: str = "") -> None:
        self.run = run
        self.run_id = str(run.pk)
        self.task_key = task_key
        self.actor = actor
        self.agent = agent
        self.process = run.process_version.process.slug
        self._tools = tools if tools is not None else {t.slug: t for t in Tool.objects.all()}
        self._requests_key: str | None = None
        self._requests: list[ApprovalRequest] = []
        # Whose grants ``granted`` answers (an agent's or a process's user), and the answers
        # the last ``stopped`` read with its stop signals: (tool, granted), policy fingerprint.
        self._grantee = grantee
        self._grant = grant_params(grantee) if grantee is not None else {"user": None,
                                                                          "perm": 0, "ct": 0}
        self._holds = grant_checker(grantee, self._grant)
        self._granted_now: tuple[str, bool] | None = None
        self._policies: Any = ...
        # The next call's checks, run in the transaction that recorded the call before it,
        # the task's lease they were run under, and the call ``stopped`` last answered.
        self._ahead: Ahead | None = None
        self._lease = lease
        self._checked: tuple[str | None, str] = (None, "")

    # stop signals and grants ----------------------------------------------------------------
    def _stop_params(self, tool: str | None, key: str) -> dict[str, Any]:
        params = {"run": run_param(self.run_id), "process": self.process,
                  "agent": self.agent or None, "tool": tool or None}
        if tool:
            row_tool = self._tools.get(tool)
            params.update(self._grant, key=key,
                          obj=str(row_tool.pk) if row_tool is not None else "")
        return params

    def stopped(self, tool: str | None = None, key: str = "") -> str:
        """One query before every model and tool call: the run cancelled, a kill switch on
        everything, this process, this agent or this tool, or the agent retired. For a tool
        call the same query reads the grant, whether a request names the call and which
        policies are in force, which the gate's next questions then take from here. A tool
        call whose checks ran ahead (``ahead_of_tool``) is answered from them, once."""
        self._granted_now, self._policies = None, ...
        self._checked = (tool, key)
        ahead = self._ahead
        if (tool and ahead is not None and ahead.ready and not ahead.stop_used
                and ahead.tool == tool and ahead.key == key):
            ahead.stop_used = True
            row = ahead.row
        else:
            with connection.cursor() as cursor:
                cursor.execute(*stop_statement(call=bool(tool)).statement(
                    self._stop_params(tool, key)))
                row = cursor.fetchone()
        if row is not None and tool:
            self._remember(tool, key, granted=bool(row[3]) and tool in self._tools,
                           asked=bool(row[4]), policies=row[5])
        return self._stop_reason(row)

    def begin_model_call(self, worst: Usage) -> str:
        """The stop signals and the reservation of a model call's worst case, in one round
        trip where the database allows, or none when they ran ahead (``ahead_of_model``)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead.ready and ahead.tool is None and ahead.worst == worst:
                why = self._stop_reason(ahead.row)
                if why or ahead.fits is not None:
                    return why or ahead.judged(self.run)
                return self.reserve(worst)  # a kill switch released since: nothing held
            self._let_go(ahead)
        row, refused = reserve_unless_stopped(
            self.run_id, self.task_key, worst, self._stop_params(None, ""), run=self.run)
        why = self._stop_reason(row)
        if why or refused is not None:
            return why or refused or ""
        # A kill switch released between the statement and its reading: nothing was reserved.
        return self.reserve(worst)

    def _stop_reason(self, row: Any) -> str:
        if row is None:
            return "cancelled: the run no longer exists"
        cancel, switch, agent_active = row[:3]
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

    def _remember(self, tool: str, key: str, *, granted: bool, asked: bool,
                  policies: Any) -> None:
        if self._grantee is not None:
            self._granted_now = (tool, granted)
        if key and not asked:  # no request names the call: nothing to read for it
            self._requests_key, self._requests = key, []
        elif key == self._requests_key:
            self._requests_key = None
        self._policies = policies

    def granted(self, name: str) -> bool:
        """Whether the grantee holds ``name``: the answer read with the stop signals just
        before (each is used once), else a query of its own."""
        answer, self._granted_now = self._granted_now, None
        if answer is not None and answer[0] == name:
            return answer[1]
        tool = self._tools.get(name)
        return tool is not None and self._holds(tool)

    # budgets --------------------------------------------------------------------------
    def reserve(self, worst: Usage) -> str:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if (ahead.ready and ahead.stop_used and ahead.fits is not None
                    and (ahead.tool, ahead.key) == self._checked and ahead.worst == worst):
                return ahead.judged(self.run)
            self._let_go(ahead)
        return reserve(self.run_id, self.task_key, worst, run=self.run)

    def ahead_of_tool(self, tool: str, key: str, worst: Usage) -> Ahead:
        self.release_ahead()
        self._ahead = Ahead(self.run_id, self.task_key, worst, self._stop_params(tool, key),
                            tool=tool, key=key, lease=self._lease)
        return self._ahead

    def ahead_of_model(self, worst: Usage) -> Ahead:
        self.release_ahead()
        self._ahead = Ahead(self.run_id, self.task_key, worst, self._stop_params(None, ""),
                            lease=self._lease)
        return self._ahead

    def release_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._let_go(ahead)

    def _let_go(self, ahead: Ahead) -> None:
        """Give back a reservation made ahead for a call that did not come. Should the database
        be away, it stays held and a warning says so: not raised, since the loop may be ending
        because of that very outage."""
        try:
            ahead.release()
        except DatabaseError:
            log.warning("run %s task %s: could not give back a reservation made ahead",
                        self.run_id, self.task_key, exc_info=True)

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
        known, self._policies = self._policies, ...
        version = approvals.policy_match(tool=tool.name, risk_class=row.risk_class if row else "",
                                         arguments=dict(arguments), fingerprint=known)
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
