"""The runs list page: the filters live in the URL (a view can be shared), a bad value is
shown next to the form instead of an error page."""

from __future__ import annotations

from datetime import date
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from console.access import startable_processes
from console.selectors.run_list import (
    DEFAULT_LIMIT,
    STATUSES,
    FilterError,
    RunFilter,
    RunPage,
    run_list,
)
from orchestration.models import Process


def _day(value: str, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise FilterError(f"{name}: not a date (YYYY-MM-DD)") from None


def filter_from(params: Any) -> RunFilter:
    """The filter a query string asks for; FilterError names the field that is wrong."""
    try:
        limit = int(params.get("limit") or DEFAULT_LIMIT)
    except ValueError:
        raise FilterError("limit: not a whole number") from None
    return RunFilter(status=tuple(s for s in params.getlist("status") if s),
                     process=params.get("process", "").strip(),
                     starter=params.get("starter", "").strip(),
                     since=_day(params.get("since", ""), "since"),
                     until=_day(params.get("until", ""), "until"),
                     q=params.get("q", "").strip(), order=params.get("order") or "newest",
                     cursor=params.get("cursor", ""), limit=limit).check()


@login_required
def runs(request: HttpRequest) -> HttpResponse:
    error = ""
    page = RunPage(runs=[], count=0)
    chosen = RunFilter()
    try:
        chosen = filter_from(request.GET)
        page = run_list(request.user, chosen)
    except FilterError as exc:
        error = str(exc)
    kept = [(k, v) for k in request.GET for v in request.GET.getlist(k) if k != "cursor" and v]
    processes = Process.objects.filter(current_version__isnull=False).order_by("slug")
    if not request.user.has_perm("orchestration.view_run"):
        processes = startable_processes(request.user).order_by("slug")
    return render(request, "console/runs.html", {
        "page": page, "filter": chosen, "error": error, "statuses": STATUSES,
        "processes": processes,
        "status_counts": [(s, page.counts.get(s, 0)) for s in STATUSES if page.counts.get(s)],
        "next_query": urlencode([*kept, ("cursor", page.next_cursor)])
        if page.next_cursor else "",
        "first_query": urlencode(kept),
    }, status=400 if error else 200)
