"""Read models of one run: its page (status, progress, budget gauges, ledger trace, what it
waits on, what this person may do) and the API's shapes of a run and of an approval request."""

from __future__ import annotations

from typing import Any

from approvals import services as approval_services
from approvals.models import ApprovalRequest
from approvals.responses import RESPONDABLE
from audit.models import Event
from console.access import can_cancel, can_start, get_run_for_user
from console.plan_graph import nodes_of, plan_svg
from console.selectors.waiting import people_waited_on, run_waiting_on
from orchestration import planning
from orchestration.engine.states import RUN_TERMINAL, TASK_TERMINAL, RunStatus, TaskStatus
from orchestration.models import Run
from orchestration.plans import plan_of

# Ledger kinds shown as a step of a task's trace, with what each step carries.
_TRACE_KINDS = ("model.", "tool.", "approval.", "budget.", "task.", "sentinel.", "qc.")


def _gauge(label: str, used: Any, cap: Any) -> dict[str, Any]:
    """One budget gauge: used against cap (no cap: no meter, just the figure)."""
    share = float(used) / float(cap) if cap else None
    return {"label": label, "used": used, "cap": cap,
            "share": None if share is None else min(share, 1.0),
            "percent": None if share is None else round(share * 100, 1),
            "level": "" if share is None else ("high" if share >= 0.9 else
                                              "mid" if share >= 0.6 else "low")}


def _trace(events: list[Event], tasks: list[Any]) -> dict[str, Any]:
    """The ledger as a tree: run-level events, then each task with its calls and decisions."""
    by_task: dict[str, list[Event]] = {t.key: [] for t in tasks}
    run_level: list[Event] = []
    for event in events:
        key = event.data.get("task") if isinstance(event.data, dict) else None
        if key in by_task and event.kind.startswith(_TRACE_KINDS):
            by_task[key].append(event)
        else:
            run_level.append(event)
    return {"run": run_level, "tasks": [(t, by_task[t.key]) for t in tasks]}


def checks_by_task(events: list[Event]) -> dict[str, list[dict[str, Any]]]:
    """The checks of each task's answers, one entry per attempt (rework round): the sentinel's
    findings, the audit's criteria and confidence, and why the attempt went back."""
    rounds: dict[str, dict[int, dict[str, Any]]] = {}
    for event in events:
        if not event.kind.startswith(("sentinel.", "qc.", "task.rework")):
            continue
        data = event.data if isinstance(event.data, dict) else {}
        number = int(data.get("round", 0))
        entry = rounds.setdefault(data.get("task", ""), {}).setdefault(
            number, {"attempt": number + 1, "sentinel": "", "findings": [], "criteria": [],
                     "confidence": None, "reworked": False})
        if event.kind == "sentinel.passed":
            entry["sentinel"] = "passed"
        elif event.kind == "sentinel.failed":
            entry["sentinel"] = "failed"
            entry["findings"] = list(data.get("findings", []))
        elif event.kind == "qc.checked":
            entry["criteria"] = list(data.get("criteria", []))
            entry["confidence"] = data.get("confidence")
        elif event.kind == "task.rework":
            entry["reworked"] = True
            entry["findings"] = list(data.get("findings", []))
    return {task: [by_round[n] for n in sorted(by_round)] for task, by_round in rounds.items()}


def first_unfinished(tasks: list[Any]) -> int | None:
    """The plan position (1-based) of the first task that did not succeed."""
    return next((i for i, t in enumerate(tasks, 1) if t.status != TaskStatus.SUCCEEDED), None)


def run_page(user: Any, run_id: Any) -> dict[str, Any]:
    """The run page's context for this person (404 if the run is not theirs to see).

    ``waiting_on`` is the pending approval requests the run waits on, soonest deadline first
    (the page's banner); ``waits`` is every wait, as the API lists it."""
    run = get_run_for_user(user, run_id)
    tasks = list(run.tasks.all())
    events = list(Event.objects.filter(chain=run.pk).order_by("seq"))
    done = sum(1 for t in tasks if t.status in TASK_TERMINAL)
    may_fork = can_start(user, run.process_version.process)
    waits = run_waiting_on(run, tasks)
    return {
        "run": run,
        "tasks": tasks,
        "events": events,
        "trace": _trace(events, tasks),
        "checks": checks_by_task(events),
        "plan_svg": plan_svg(nodes_of(tasks, _delegated(run)), title="Task graph of this run"),
        "progress": {"done": done, "total": len(tasks)},
        "gauges": [
            _gauge("Tokens", run.tokens_in + run.tokens_out, run.budget_tokens),
            _gauge("Cost", run.cost, run.budget_cost),
            _gauge("Steps", run.steps, run.budget_steps),
        ],
        "active": run.status not in RUN_TERMINAL,
        "may_cancel": can_cancel(user, run),
        "may_fork": may_fork,
        "retry_step": first_unfinished(tasks) if (
            may_fork and run.status in (RunStatus.FAILED, RunStatus.CANCELLED)) else None,
        "waits": waits,
        "waiting_on": people_waited_on(waits),
        "plan": plan_view(run, events),
    }


def plan_view(run: Run, events: list[Event]) -> dict[str, Any] | None:
    """A planned run's plan for its page: the current version's tasks, and every version with
    what became of it (None for a run of a fixed plan)."""
    plan = plan_of(run)
    if not run.plan_version and not plan.planning:
        return None
    versions: dict[int, dict[str, Any]] = {}
    for e in events:
        if not e.kind.startswith("plan.") or "version" not in e.data:
            continue
        item = versions.setdefault(int(e.data["version"]), {
            "version": int(e.data["version"]), "source": "", "verdict": "", "errors": [],
            "by": ""})
        if e.kind == "plan.proposed":
            item["source"] = f"planner ({e.data.get('agent', '')})"
        elif e.kind == "plan.edited":
            item["source"] = f"edited by {e.data.get('by', '')}"
        elif e.kind == "plan.validated":
            item["verdict"] = "valid"
        elif e.kind == "plan.rejected":
            item["verdict"], item["errors"] = "invalid", list(e.data.get("errors") or [])
        elif e.kind == "plan.approved":
            item["verdict"], item["by"] = "approved", e.data.get("by", "")
    return {"phase": planning.phase(run), "version": run.plan_version,
            "tasks": [] if plan.planning else [
                {"key": t.key, "title": t.title, "executor": f"{t.executor_type}: "
                 f"{t.executor_ref}", "depends_on": ", ".join(t.depends_on),
                 "cost": t.budget.get("cost", "")} for t in plan.tasks],
            "versions": [versions[v] for v in sorted(versions)]}


def run_out(run: Run) -> dict[str, Any]:
    """A run as the API returns it (RunOut)."""
    tasks = list(run.tasks.all())
    return {
        "id": run.pk,
        "process": run.process_version.process.slug,
        "version": run.process_version.number,
        "status": run.status,
        "input": run.input,
        "usage": {"tokens_in": run.tokens_in, "tokens_out": run.tokens_out,
                  "cost": str(run.cost), "steps": run.steps, "tool_calls": run.tool_calls},
        "result": run.result,
        "error": run.error,
        "waiting_on": [{"kind": w.kind, "task": w.task, "reason": w.reason, "id": w.id}
                       for w in run_waiting_on(run, tasks)],
        "tasks": [{"key": t.key, "status": t.status, "attempts": t.attempts,
                   "executor": f"{t.executor_type}:{t.executor_ref}"} for t in tasks],
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "phase": planning.phase(run),
        "plan": {"version": run.plan_version, "plan": plan_of(run).to_dict()},
    }


def approval_out(request: ApprovalRequest) -> dict[str, Any]:
    """An approval request as the API returns it (ApprovalOut)."""
    decisions = list(request.decisions.select_related("decider"))
    approvals = {d.decider_id for d in decisions if d.kind in ("approve", "edit")
                 and d.arguments_digest == request.arguments_digest}
    # The next approver sees what a reviewer's edit changed, not just the result of it.
    original = approval_services.original_arguments(request, decisions)
    return {
        "id": request.pk, "run": request.run_id, "task": request.task_key, "tool": request.tool,
        "arguments": request.arguments, "arguments_digest": request.arguments_digest,
        "reason": request.reason, "detail": request.detail,
        "policy": str(request.policy_version) if request.policy_version_id else None,
        "status": request.status, "deadline": request.deadline,
        "required_approvals": request.required_approvals, "approvals": len(approvals),
        "tier": request.tier,
        "decisions": [{"by": d.decider.get_username(), "decision": d.kind, "note": d.note,
                       "arguments_digest": d.arguments_digest, "at": d.created_at.isoformat()}
                      for d in decisions],
        "original_arguments": original,
        "changes": approval_services.arguments_changes(original, request.arguments),
        "brief": (request.context or {}) if request.reason in RESPONDABLE else None,
        "response": (request.resolution or {}).get("output"),
    }


def _delegated(run: Any) -> dict[str, str]:
    """Which task delegated each delegated task of the run (its plan says)."""
    if not run.plan_version:
        return {}
    return {t.key: t.delegated_by for t in plan_of(run).tasks if t.delegated_by}
