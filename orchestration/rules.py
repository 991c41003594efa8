"""The governance rules production and replay share: gates from requests, reviewers' decisions.

Django-free on purpose: the live governor (orchestration/governance.py), the resume after a
decision (orchestration/services.py) and replay (orchestration/replay/) all call these, so a
rule changed here changes every one of them, and replay can never check a run against a copy of
a rule that has drifted from the one the run was governed by. The strings are the values of
approvals.models.Reason and ApprovalRequest.Status (tests/test_rules_single_source.py checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestration.engine.governance import Gate

# ApprovalRequest.Status values
APPROVED, EDITED, PENDING = "approved", "edited", "pending"
GRANTED = (APPROVED, EDITED)
# approvals.models.Reason values
SENSITIVE_ACTION = "sensitive_action"
STEP_BUDGET_EXHAUSTED = "step_budget_exhausted"
POISON_TASK = "poison_task"
QC_MISMATCH = "qc_mismatch"
LOW_CONFIDENCE = "low_confidence"
# Escalations of a task's checks: a rejection sends the work back with the note.
QC_REASONS = (QC_MISMATCH, LOW_CONFIDENCE)
QUESTION = "question"
RESPONDED = "responded"
# The builtin tool an agent asks a person with (orchestration/builtin_tools.py).
ASK_HUMAN = "ask_human"
# A resolution's action when a person answered a task or a question (approvals' "respond").
RESPOND = "respond"
# The steps a "proceed" on an exhausted step budget adds when the agent is gone.
DEFAULT_STEP_RAISE = 5


# ---- the gate ------------------------------------------------------------------------------


def gate_from_request(status: str, arguments: Any, note: str, request_id: str) -> Gate:
    """The gate for a call that already has a sensitive-action request: approved or edited
    lets it through with the request's (maybe edited) arguments, pending waits for it, anything
    else (rejected, expired, stopped, cancelled) denies it with the reviewer's note."""
    if status in GRANTED:
        return Gate("allow", arguments=arguments)
    if status == PENDING:
        return Gate("wait", message=request_id)
    return Gate("deny", message=note or f"request {status}")


def qc_from_request(status: str | None, note: str) -> tuple[str, str]:
    """A person's decision on a task's failed checks: ("accept", "") lets its answer through,
    ("rework", note) sends it back with the note, ("", "") while undecided (or unasked)."""
    if status in GRANTED:
        return "accept", ""
    if status is None or status == PENDING:
        return "", ""
    return "rework", note


def gate_from_question(status: str, arguments: Mapping[str, Any], output: Any, note: str,
                       request_id: str) -> Gate:
    """The gate for an agent's ``ask_human`` call that already has its question request: a
    response lets the call through with the person's answer in place of any the agent wrote,
    pending waits, anything else denies it with the reviewer's note."""
    if status == RESPONDED:
        answer = output.get("answer", "") if isinstance(output, Mapping) else ""
        return Gate("allow", arguments={**dict(arguments), "answer": str(answer)})
    if status == PENDING:
        return Gate("wait", message=request_id)
    return Gate("deny", message=note or f"request {status}")


def outcome_from_request(status: str | None) -> str:
    """For a call of unknown outcome: "rerun", "reject", or "" while undecided (or unasked)."""
    if status is None or status == PENDING:
        return ""
    return "rerun" if status in GRANTED else "reject"


# ---- a reviewer's resolution and the waiting task ------------------------------------------


@dataclass(frozen=True, slots=True)
class Resume:
    """What a resolved request does to its task.

    ``action``: "cancel" (stop the run), "nothing" (the task no longer waits), "fail" (with
    ``error``) or "requeue" (also after a person's answer; after raising the budget by
    ``budget``, when given; ``reset_crashes`` when a person chose to try a task that kept
    losing its worker again)."""

    action: str
    error: str = ""
    budget: dict[str, Any] | None = None
    reset_crashes: bool = False


def apply_resolution(*, task_waiting: bool, reason: str, resolution: Mapping[str, Any],
                     agent_step_budget: Callable[[], int | None]) -> Resume:
    """What the resolution of a request opened for ``reason`` does to its task.

    ``agent_step_budget`` is asked only when a "proceed" on an exhausted step budget needs it
    (the agent's own step budget, None when the agent is gone)."""
    action = resolution.get("action")
    if action == "stop":
        return Resume("cancel")
    if not task_waiting:
        return Resume("nothing")
    budget: dict[str, Any] | None = None
    if action == "raise_budget":
        budget = dict(resolution.get("budget", {}))
    elif action == "proceed" and reason == STEP_BUDGET_EXHAUSTED:
        steps = agent_step_budget()
        budget = {"steps": steps if steps is not None else DEFAULT_STEP_RAISE}
    elif action == "reject" and reason not in (SENSITIVE_ACTION, QUESTION, *QC_REASONS):
        # (A rejected call or question does not end the task: its agent is told, with the
        # note, when the task runs again; rejected checks send the work back with the note.)
        return Resume("fail", error=f"stopped by a reviewer: {resolution.get('note', '')}")
    elif action == RESPOND:
        # The task runs again and finds the answer under its call key: a human task's
        # executor hands it on, an agent's ask_human call returns it.
        return Resume("requeue")
    return Resume("requeue", budget=budget, reset_crashes=reason == POISON_TASK)


# ---- budgets -------------------------------------------------------------------------------


def over_cap(cap: Any, used: Any, reserved: Any, needed: Any) -> bool:
    """Whether a worst case of ``needed`` does not fit a cap (None = no cap) next to what is
    used and reserved. The reservation's SQL checks the same inequality on the locked row."""
    return cap is not None and used + reserved + needed > cap


# ---- a reviewer's decision on a plan (orchestration/planning.py) -------------------------

# approvals.models.Reason values of the design gate
PLAN_REVIEW = "plan_review"
PLAN_INVALID = "plan_invalid"
PLAN_REASONS = (PLAN_REVIEW, PLAN_INVALID)


@dataclass(frozen=True, slots=True)
class PlanDecision:
    """What a resolved plan request does to its run: "cancel", "accept" the plan under review,
    "edit" (accept ``plan``, the reviewer's, once it validates) or "replan" (the planner plans
    again, told ``note``)."""

    action: str
    plan: Any = None
    note: str = ""


def plan_resolution(*, reason: str, status: str, resolution: Mapping[str, Any]) -> PlanDecision:
    action = resolution.get("action")
    if action == "stop":
        return PlanDecision("cancel")
    if status == EDITED and isinstance(resolution.get("arguments"), Mapping):
        return PlanDecision("edit", plan=dict(resolution["arguments"]))
    if action == "proceed" and reason == PLAN_REVIEW:
        return PlanDecision("accept")
    # A rejection (or an expiry) sends the note back to the planner; "proceed" on a run that
    # has no valid plan lets the planner try again.
    return PlanDecision("replan", note=str(resolution.get("note") or ""))
