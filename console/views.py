"""The dashboard and run pages, and the run actions: start, cancel, replay, fork, retry."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from audit import hygiene
from console import start_form
from console.access import (
    can_cancel,
    can_replay,
    can_start,
    get_run_for_user,
    startable_processes,
)
from console.selectors import dashboard_figures, first_unfinished, recent_runs, run_page
from orchestration import services
from orchestration.engine.states import RunStatus
from orchestration.models import Process


def _start_card(process: Process | None, *, example: bool = False) -> dict[str, Any]:
    """The start card for ``process``: its generated form, empty or showing its example, and
    the JSON editor beside it."""
    if process is None:
        return {}
    schema = process.current_version.input_schema if process.current_version else {}
    fields = start_form.fields_for(schema)
    sample = start_form.example_of(schema)
    if example and sample is not None:
        start_form.fill(fields, sample)
    return {"process": process, "fields": fields, "has_example": sample is not None,
            "json_text": json.dumps(sample, indent=1, ensure_ascii=False)
            if example and sample is not None else "{}",
            "json_open": not fields, "json_error": "", "errors": []}


def _dashboard(request: HttpRequest, start: dict[str, Any] | None = None,
               status: int = 200) -> HttpResponse:
    """The dashboard; ``start`` is the start card's state after a refused start."""
    processes = list(startable_processes(request.user))
    if start is None:
        wanted = request.GET.get("process", "")
        chosen = next((p for p in processes if p.slug == wanted), processes[0] if processes
                      else None)
        start = _start_card(chosen, example=request.GET.get("example") == "1")
    return render(request, "console/dashboard.html", {
        "processes": processes,
        "runs": recent_runs(request.user),
        "figures": dashboard_figures(request.user),
        "start": start,
    }, status=status)


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return _dashboard(request)


def _startable(request: HttpRequest, slug: str) -> Process | HttpResponse:
    """The process named ``slug`` if this person may start it, else the response to send."""
    if "\x00" in slug:
        # No slug holds one, and PostgreSQL would fail on it in the lookup below.
        raise Http404("no such process")
    process = get_object_or_404(Process.objects.select_related("current_version"), slug=slug)
    if not can_start(request.user, process):
        return HttpResponse("You may not start runs of this process.", status=403)
    return process


@login_required
def run_start_form(request: HttpRequest) -> HttpResponse:
    """The start card's form for a process (what the process select swaps in; the first one
    this person may start when none is named), empty or with the process's example filled in.
    Without htmx, the dashboard showing it."""
    slug = request.GET.get("process")
    example = request.GET.get("example") == "1"
    if slug is None:
        process: Process | HttpResponse | None = startable_processes(request.user).first()
        if process is None:
            raise Http404("no process to start")
    else:
        process = _startable(request, slug)
    if isinstance(process, HttpResponse):
        return process
    if not getattr(request, "htmx", False):
        query = urlencode({"process": process.slug, **({"example": "1"} if example else {})})
        return HttpResponseRedirect(f"{reverse('dashboard')}?{query}#start")
    return render(request, "console/dashboard.html#start_form",
                  {"start": _start_card(process, example=example)})


def _start_from_json(request: HttpRequest, process: Process, start: dict[str, Any]) -> Any:
    """Start a run from the JSON editor; the run, or the start card's state with the error."""
    raw = request.POST.get("input", "").strip() or "{}"
    start.update(json_text=raw, json_open=True)
    try:
        # Strict: NaN, Infinity, a NUL, a lone surrogate or deep nesting is refused here, with
        # where it is, rather than failing in the database (or the parser's recursion).
        data: Any = hygiene.loads(raw, "input")
    except json.JSONDecodeError as exc:
        start["json_error"] = (f"Input is not valid JSON: {exc.msg} (line {exc.lineno}, "
                               f"column {exc.colno}).")
    except hygiene.Refused as exc:
        start["json_error"] = f"Input refused: {exc}."
    else:
        try:
            return services.run_create(process=process, input=data, user=request.user)
        except services.ServiceError as exc:
            start["json_error"] = str(exc)
    return start


def _start_from_fields(request: HttpRequest, process: Process, start: dict[str, Any]) -> Any:
    """Start a run from the generated form; the run, or the start card's state with each
    error next to its field and what was typed kept."""
    schema = process.current_version.input_schema if process.current_version else {}
    data, start["errors"] = start_form.read(schema, start["fields"], request.POST)
    if data is None:
        return start
    start["json_text"] = json.dumps(data, indent=1, ensure_ascii=False)
    try:
        # The service checks the input against the schema again, and owns the decision.
        return services.run_create(process=process, input=data, user=request.user)
    except services.ServiceError as exc:
        start["errors"] = [str(exc)]
    return start


@login_required
@require_POST
def run_start(request: HttpRequest) -> HttpResponse:
    """Start a run from the generated form, or (with an ``input`` field) from the JSON editor.

    Started: redirect to the run's page. Refused: the dashboard itself, figures and all,
    with 400 and the form as it was posted, each error beside its field. Not a redirect: what
    was typed (a contract's text, say) would have to travel through the session or the URL to
    survive one, and a reload here re-posts input that is refused again, creating nothing."""
    process = _startable(request, request.POST.get("process", ""))
    if isinstance(process, HttpResponse):
        return process
    start = _start_card(process)
    if "input" in request.POST:
        outcome = _start_from_json(request, process, start)
    else:
        outcome = _start_from_fields(request, process, start)
    if isinstance(outcome, dict):
        return _dashboard(request, outcome, status=400)
    return redirect("run_detail", run_id=outcome.pk)


def _run_context(request: HttpRequest, run_id: Any) -> dict[str, Any]:
    return run_page(request.user, run_id)


@login_required
def run_detail(request: HttpRequest, run_id: Any) -> HttpResponse:
    context = _run_context(request, run_id)
    template = "console/run_detail.html"
    if getattr(request, "htmx", False):
        template += "#live"
    else:
        context.update(_replay_checks(request, context["run"]))
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


def _replay_checks(request: HttpRequest, run: Any) -> dict[str, Any]:
    checks = list(run.replay_checks.select_related("requested_by")[:20])
    return {"replay_checks": checks, "may_replay": can_replay(request.user, run),
            "replay_pending": any(c.pending for c in checks)}


@login_required
@require_http_methods(["GET", "POST"])
def run_replay(request: HttpRequest, run_id: Any) -> HttpResponse:
    """POST: queue a replay of the run from its ledger (a worker does it), then 303 to the run
    page at that check's row, which shows it until its verdict is in; reloading that page asks
    for nothing again. A check already under way is not doubled. GET (a bookmark, or a reload
    of this address from history) queues nothing: it goes to the run page's replay checks."""
    from orchestration import replay_jobs

    run = get_run_for_user(request.user, run_id)
    page = reverse("run_detail", args=[run.pk])
    if request.method != "POST":
        return HttpResponseRedirect(page + "#replay", status=303)
    if not can_replay(request.user, run):
        return HttpResponse("You may not start a replay check of this run.", status=403)
    check, created = replay_jobs.request_check(run, request.user)
    if created:
        messages.success(request, "Replay check queued.")
    else:
        messages.info(request, "A replay check of this run is already under way.")
    return HttpResponseRedirect(f"{page}#replay-check-{check.pk}", status=303)


@login_required
def run_replay_checks(request: HttpRequest, run_id: Any) -> HttpResponse:
    """The run page's replay checks (what it polls while one is under way)."""
    run = get_run_for_user(request.user, run_id)
    return render(request, "console/run_detail.html#replay_checks",
                  {"run": run, **_replay_checks(request, run)})


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
    step = first_unfinished(tasks) or 1
    return _fork(request, run, step, f"Retrying from task {step} ({tasks[step - 1].key}).")
