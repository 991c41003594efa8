"""The agents, tools and analytics screens (and retiring an agent); their figures come from
console.selectors."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from console import charts
from console.access import is_admin, is_console_user
from console.selectors import (
    WINDOW_DAYS,
    agent_grants,
    agent_scorecards,
    cost_breakdowns,
    escalation_reasons,
    tool_usage,
)
from orchestration import grants
from orchestration.models import Agent, Task, Tool

View = Callable[..., HttpResponse]


# --- access -----------------------------------------------------------------------------------


def console_role_required(view: View) -> View:
    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not is_console_user(request.user):
            return HttpResponseForbidden("This page is for console operators, reviewers and "
                                         "admins.")
        return view(request, *args, **kwargs)

    return wrapper


# --- views ------------------------------------------------------------------------------------


def _agents() -> QuerySet[Agent]:
    return Agent.objects.select_related("user").order_by("status", "slug")


@console_role_required
def agent_list(request: HttpRequest) -> HttpResponse:
    agents = list(_agents())
    cards = agent_scorecards(a.slug for a in agents)
    grants = agent_grants(agents)
    rows = [(agent, cards[agent.slug], grants[agent.slug]) for agent in agents]
    return render(request, "console/agents.html", {"rows": rows})


@console_role_required
def agent_detail(request: HttpRequest, slug: str) -> HttpResponse:
    from guardian.shortcuts import get_objects_for_user

    agent = get_object_or_404(_agents(), slug=slug)
    grants = get_objects_for_user(agent.user, "orchestration.invoke_tool", Tool,
                                  with_superuser=False).order_by("slug")
    return render(request, "console/agent_detail.html", {
        "agent": agent,
        "card": agent_scorecards([agent.slug])[agent.slug],
        "grants": list(grants),
        "may_retire": is_admin(request.user) and agent.status == Agent.Status.ACTIVE,
        "recent_tasks": list(Task.objects.filter(executor_type="agent", executor_ref=agent.slug)
                             .select_related("run").order_by("-started_at")[:20]),
    })


@login_required
@require_POST
def agent_retire(request: HttpRequest, slug: str) -> HttpResponse:
    if not is_admin(request.user):
        return HttpResponseForbidden("Only admins may retire an agent.")
    agent = get_object_or_404(_agents(), slug=slug)
    if agent.status == Agent.Status.RETIRED:
        messages.info(request, f"{agent.slug} was already retired.")
        return redirect("agent_detail", slug=agent.slug)
    outcome = grants.agent_retire(agent=agent, by=request.user)
    messages.success(request, f"{agent.slug} is retired: {outcome['escalated']} waiting "
                              f"task(s) escalated, {outcome['requeued']} queued task(s) parked.")
    return redirect("agent_detail", slug=agent.slug)


@console_role_required
def tool_list(request: HttpRequest) -> HttpResponse:
    """One table row per tool (contract, limits, calls, the agents granted it); description and
    schemas open on demand under it."""
    usage = tool_usage(timezone.now())
    granted: dict[str, list[Agent]] = {}
    agents = list(_agents())
    by_agent = agent_grants(agents)
    for agent in agents:
        for tool in by_agent[agent.slug]:
            granted.setdefault(tool.slug, []).append(agent)
    tools = [(tool, usage.get(tool.slug, {"total": 0, "today": 0}), granted.get(tool.slug, []),
              json.dumps(tool.input_schema, indent=2, sort_keys=True, ensure_ascii=False),
              json.dumps(tool.output_schema, indent=2, sort_keys=True, ensure_ascii=False))
             for tool in Tool.objects.order_by("slug")]
    return render(request, "console/tools.html", {"tools": tools})


@console_role_required
def analytics(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    reasons = escalation_reasons(now)
    return render(request, "console/analytics.html", {
        "breakdowns": cost_breakdowns(now),
        "reasons": reasons,
        "reasons_chart": charts.bar_chart(reasons),
        "window_days": WINDOW_DAYS,
    })
