"""The run pages: the dashboard, starting a run, a run's detail, and cancelling, replaying,
forking and retrying it."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from approvals.models import ApprovalRequest
from audit import hygiene
from audit.models import Event
from console.access import (
    can_cancel,
    can_start,
    get_run_for_user,
    startable_processes,
    visible_runs,
)
from console.screens import dashboard_figures
from orchestration import services
from orchestration.engine.states import RUN_TERMINAL, TASK_TERMINAL, RunStatus, TaskStatus
from orchestration.models import Process


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    runs = visible_runs(request.user).order_by("-created_at")[:50]
    return render(request, "console/dashboard.html", {
        "processes": startable_processes(request.user),
        "runs": runs,
        "figures": dashboard_figures(request.user),
    })


@login_required
@require_POST
def run_start(request: HttpRequest) -> HttpResponse:
    slug = request.POST.get("process", "")
    if "\x00" in slug:
        # No slug holds one, and PostgreSQL would fail on it in the lookup below.
        raise Http404("no such process")
    process = get_object_or_404(Process.objects.select_related("current_version"), slug=slug)
    if not can_start(request.user, process):
        return HttpResponse("You may not start runs of this process.", status=403)
    raw = request.POST.get("input", "").strip() or "{}"
    error = ""
    try:
        # Strict: NaN, Infinity, a NUL, a lone surrogate or deep nesting is refused here, with
        # where it is, rather than failing in the database (or the parser's recursion).
        data: Any = hygiene.loads(raw, "input")
    except json.JSONDecodeError as exc:
        error = f"Input is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
    except hygiene.Refused as exc:
        error = f"Input refused: {exc}."
    else:
        try:
            run = services.run_create(process=process, input=data, user=request.user)
        except services.ServiceError as exc:
            error = str(exc)
        else:
            return redirect("run_detail", run_id=run.pk)
    response = render(request, "console/dashboard.html", {
        "processes": startable_processes(request.user),
        "runs": visible_runs(request.user).order_by("-created_at")[:50],
        "start_error": error,
        "start_process": process.slug,
        "start_input": raw,
    }, status=400)
    return response


# Ledger kinds shown as a step of a task's trace, with what each step carries.
_TRACE_KINDS = ("model.", "tool.", "approval.", "budget.", "task.")


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


def _run_context(request: HttpRequest, run_id: Any) -> dict[str, Any]:
    run = get_run_for_user(request.user, run_id)
    tasks = list(run.tasks.all())
    events = list(Event.objects.filter(chain=run.pk).order_by("seq"))
    done = sum(1 for t in tasks if t.status in TASK_TERMINAL)
    may_fork = can_start(request.user, run.process_version.process)
    return {
        "run": run,
        "tasks": tasks,
        "events": events,
        "trace": _trace(events, tasks),
        "progress": {"done": done, "total": len(tasks)},
        "gauges": [
            _gauge("Tokens", run.tokens_in + run.tokens_out, run.budget_tokens),
            _gauge("Cost", run.cost, run.budget_cost),
            _gauge("Steps", run.steps, run.budget_steps),
        ],
        "active": run.status not in RUN_TERMINAL,
        "may_cancel": can_cancel(request.user, run),
        "may_fork": may_fork,
        "retry_step": _first_unfinished(tasks) if (
            may_fork and run.status in (RunStatus.FAILED, RunStatus.CANCELLED)) else None,
        "waiting_on": list(ApprovalRequest.objects.filter(
            run_id=run.pk, status=ApprovalRequest.Status.PENDING).select_related(
            "decider_group")),
    }


@login_required
def run_detail(request: HttpRequest, run_id: Any) -> HttpResponse:
    context = _run_context(request, run_id)
    template = "console/run_detail.html"
    if getattr(request, "htmx", False):
        template += "#live"
    return render(request, template, context)


@login_required
@require_POST
def run_cancel(request: HttpRequest, run_id: Any) -> HttpResponse:
    run = get_run_for_user(request.user, run_id)
    if not can_cancel(request.user, run):
        return HttpResponse("You may not cancel this run.", status=403)
    try:
        services.run_cancel(run=run, user=request.user)
    except services.RunNotCancellable as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Run cancelled.")
    return redirect("run_detail", run_id=run.pk)


@login_required
@require_POST
def run_replay(request: HttpRequest, run_id: Any) -> HttpResponse:
    """Replay the run from its ledger and show the verdict on its page."""
    from orchestration.replay import replay

    run = get_run_for_user(request.user, run_id)
    result = replay(run)
    context = _run_context(request, run.pk)
    context["replay"] = result
    return render(request, "console/run_detail.html", context)


def _first_unfinished(tasks: list[Any]) -> int | None:
    """The plan position (1-based) of the first task that did not succeed."""
    return next((i for i, t in enumerate(tasks, 1) if t.status != TaskStatus.SUCCEEDED), None)


def _fork(request: HttpRequest, run: Any, step: int, done: str) -> HttpResponse:
    """Fork ``run`` from task ``step`` and open the new run; on refusal, say why on the old."""
    try:
        fork = services.run_fork(run=run, step=step, user=request.user)
    except services.ServiceError as exc:
        messages.error(request, str(exc))
        return redirect("run_detail", run_id=run.pk)
    messages.success(request, done)
    return redirect("run_detail", run_id=fork.pk)


def _run_to_fork(request: HttpRequest, run_id: Any) -> Any:
    """The run, if this user may see it and start its process; else the response to send."""
    run = get_run_for_user(request.user, run_id)
    if not can_start(request.user, run.process_version.process):
        return None, HttpResponse("You may not start runs of this process.", status=403)
    return run, None


@login_required
@require_POST
def run_fork(request: HttpRequest, run_id: Any) -> HttpResponse:
    run, refused = _run_to_fork(request, run_id)
    if refused:
        return refused
    try:
        step = int(request.POST.get("step", ""))
    except ValueError:
        messages.error(request, "Choose the step to fork from (a task number).")
        return redirect("run_detail", run_id=run.pk)
    return _fork(request, run, step, f"Forked from step {step} of run {run.pk}.")


@login_required
@require_POST
def run_retry(request: HttpRequest, run_id: Any) -> HttpResponse:
    """Run a failed or cancelled run again from its first task that did not succeed: a fork
    that keeps the recorded results of everything before it."""
    run, refused = _run_to_fork(request, run_id)
    if refused:
        return refused
    if run.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
        messages.error(request, f"Only a failed or cancelled run can be retried; this one is "
                                f"{run.status}.")
        return redirect("run_detail", run_id=run.pk)
    tasks = list(run.tasks.all())
    step = _first_unfinished(tasks) or 1
    return _fork(request, run, step, f"Retrying from task {step} ({tasks[step - 1].key}).")
