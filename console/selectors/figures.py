"""Aggregate figures: the dashboard's, agents' scorecards and grants, tool usage, cost
breakdowns and escalation reasons.

Every figure comes from aggregate queries over whole tables (a fixed number of queries per page,
whatever the number of agents, tools or runs)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import Permission
from django.db.models import (
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    IntegerField,
    Max,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.fields.json import KT
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest, Reason
from audit.models import Event
from console import charts
from console.access import visible_runs
from console.selectors.waiting import people_waited_on, runs_waiting_on
from orchestration.engine.states import RUN_TERMINAL, TASK_TERMINAL, RunStatus, TaskStatus
from orchestration.models import Agent, Run, Task, Tool

WINDOW_DAYS = 14


def _ratio(part: int | Decimal | None, whole: int | Decimal | None) -> float | None:
    return float(part or 0) / float(whole) if whole else None


def _per(total: Decimal | None, count: int) -> Decimal | None:
    return (total or Decimal(0)) / count if count else None


@dataclass
class Scorecard:
    """One agent's record: tasks it executed, their outcome, escalations, model steps, cost."""

    runs: int = 0
    tasks: int = 0
    finished: int = 0
    succeeded: int = 0
    escalations: int = 0
    steps: int = 0
    cost: Decimal = Decimal(0)
    last_used: datetime | None = None

    @property
    def success_rate(self) -> float | None:
        return _ratio(self.succeeded, self.finished)

    @property
    def escalation_rate(self) -> float | None:
        return _ratio(self.escalations, self.tasks)

    @property
    def steps_per_task(self) -> float | None:
        return _ratio(self.steps, self.tasks)

    @property
    def cost_per_completed(self) -> Decimal | None:
        return _per(self.cost, self.succeeded)


def agent_scorecards(slugs: Iterable[str]) -> dict[str, Scorecard]:
    """Scorecards for these agents in three queries (tasks, escalations, model calls)."""
    slugs = list(slugs)
    cards = {slug: Scorecard() for slug in slugs}
    finished = [s.value for s in TASK_TERMINAL]
    tasks = (Task.objects.filter(executor_type="agent", executor_ref__in=slugs)
             .values("executor_ref").order_by()
             .annotate(runs=Count("run_id", distinct=True), tasks=Count("id"),
                       finished=Count("id", filter=Q(status__in=finished)),
                       succeeded=Count("id", filter=Q(status=TaskStatus.SUCCEEDED)),
                       cost=Sum("used_cost"),
                       last_used=Max(Coalesce("finished_at", "started_at"))))
    for row in tasks:
        card = cards[row["executor_ref"]]
        card.runs, card.tasks = row["runs"], row["tasks"]
        card.finished, card.succeeded = row["finished"], row["succeeded"]
        card.cost, card.last_used = row["cost"] or Decimal(0), row["last_used"]
    actors = {f"agent:{slug}": slug for slug in slugs}
    for actor, n in (ApprovalRequest.objects.filter(requested_by__in=list(actors))
                     .values("requested_by").order_by().annotate(n=Count("id"))
                     .values_list("requested_by", "n")):
        cards[actors[actor]].escalations = n
    for actor, n in (Event.objects.filter(kind="model.called", actor__in=list(actors))
                     .values("actor").order_by().annotate(n=Count("id"))
                     .values_list("actor", "n")):
        cards[actors[actor]].steps = n
    return cards


def agent_grants(agents: list[Agent]) -> dict[str, list[Tool]]:
    """Tools each agent's user holds ``invoke_tool`` on, object by object, in two queries."""
    from guardian.models import UserObjectPermission

    perm = Permission.objects.get(content_type__app_label="orchestration",
                                  codename="invoke_tool")
    by_user = {agent.user_id: agent.slug for agent in agents}
    rows = list(UserObjectPermission.objects.filter(permission=perm, user_id__in=by_user)
                .values_list("user_id", "object_pk"))
    tools = {str(t.pk): t for t in Tool.objects.filter(pk__in={pk for _, pk in rows})}
    grants: dict[str, list[Tool]] = {agent.slug: [] for agent in agents}
    for user_id, pk in rows:
        if pk in tools:
            grants[by_user[user_id]].append(tools[pk])
    for granted in grants.values():
        granted.sort(key=lambda t: t.slug)
    return grants


def tool_usage(now: datetime) -> dict[str, dict[str, int]]:
    """Calls per tool from the ledger's ``tool.called`` events: today and in total."""
    today = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = (Event.objects.filter(kind="tool.called").values(tool=KT("data__tool")).order_by()
            .annotate(total=Count("id"), today=Count("id", filter=Q(at__gte=today))))
    return {row["tool"]: {"total": row["total"], "today": row["today"]} for row in rows}


def _review_wait(**match: Any) -> Subquery:
    """Seconds-valued duration people took to decide this row's approval requests."""
    waited = ExpressionWrapper(F("decided_at") - F("created_at"), output_field=DurationField())
    return Subquery(ApprovalRequest.objects.filter(decided_at__isnull=False, **match)
                    .values("run_id").order_by().annotate(w=Sum(waited)).values("w")[:1],
                    output_field=DurationField())


def _days(today: date) -> list[date]:
    return [today - timedelta(days=n) for n in range(WINDOW_DAYS - 1, -1, -1)]


@dataclass
class CostRow:
    key: str
    day: date
    finished: int
    completed: int
    cost: Decimal
    review_wait: timedelta

    @property
    def cost_per_completed(self) -> Decimal | None:
        return _per(self.cost, self.completed)


@dataclass
class Breakdown:
    title: str
    rows: list[CostRow]
    chart: charts.LineChart


def _breakdown(title: str, rows: Iterable[dict[str, Any]], days: list[date]) -> Breakdown:
    found = [CostRow(key=r["name"], day=r["day"], finished=r["finished"],
                     completed=r["completed"], cost=r["cost"] or Decimal(0),
                     review_wait=r["review_wait"] or timedelta(0)) for r in rows]
    found.sort(key=lambda r: (r.key, r.day))
    cell = {(r.key, r.day): r.cost_per_completed for r in found}
    keys = sorted({r.key for r in found})
    series = {k: [cell.get((k, d)) for d in days] for k in keys}
    return Breakdown(title=title, rows=found,
                     chart=charts.line_chart([d.isoformat() for d in days], series))


def cost_breakdowns(now: datetime) -> list[Breakdown]:
    """Cost per completed run by process and by pattern, and per completed task by agent, per
    day. The cost is everything spent on the work that finished that day: failed attempts,
    retries and rework included; the review wait is the time its approval requests waited."""
    today = timezone.localdate(now)
    days = _days(today)
    since = timezone.make_aware(datetime.combine(days[0], datetime.min.time()))
    ended = [s.value for s in RUN_TERMINAL]
    runs = (Run.objects.filter(status__in=ended, finished_at__gte=since)
            .annotate(day=TruncDate("finished_at"), wait=_review_wait(run_id=OuterRef("pk"))))
    run_figures = {"finished": Count("id"),
                   "completed": Count("id", filter=Q(status=RunStatus.SUCCEEDED)),
                   "cost": Sum("cost"), "review_wait": Sum("wait")}
    by_process = (runs.values("day", name=F("process_version__process__slug")).order_by()
                  .annotate(**run_figures))
    by_pattern = (runs.values("day", name=F("process_version__process__pattern")).order_by()
                  .annotate(**run_figures))
    tasks = (Task.objects.filter(executor_type="agent", finished_at__gte=since,
                                 status__in=[s.value for s in TASK_TERMINAL])
             .annotate(day=TruncDate("finished_at"),
                       wait=_review_wait(run_id=OuterRef("run_id"), task_key=OuterRef("key"))))
    by_agent = (tasks.values("day", name=F("executor_ref")).order_by()
                .annotate(finished=Count("id"),
                          completed=Count("id", filter=Q(status=TaskStatus.SUCCEEDED)),
                          cost=Sum("used_cost"), review_wait=Sum("wait")))
    return [_breakdown("Cost per completed run, by process", by_process, days),
            _breakdown("Cost per completed run, by pattern", by_pattern, days),
            _breakdown("Cost per completed task, by agent", by_agent, days)]


def escalation_reasons(now: datetime) -> list[tuple[str, int]]:
    since = now - timedelta(days=WINDOW_DAYS)
    labels = dict(Reason.choices)
    rows = (ApprovalRequest.objects.filter(created_at__gte=since).values("reason").order_by()
            .annotate(n=Count("id")).order_by("-n", "reason"))
    return [(str(labels.get(r["reason"], r["reason"])), r["n"]) for r in rows]


@dataclass
class DashboardFigures:
    active: int
    waiting: int
    pending_for_me: int
    spend_today: Decimal
    budget_today: Decimal
    uncapped_today: int
    capped_spend_today: Decimal  # what the runs with a cost cap spent, against budget_today
    finished: int
    succeeded: int
    failed: int
    finished_cost: Decimal
    # Waiting runs, each with the approval requests it waits on (soonest deadline first).
    waiting_on: list[tuple[Run, list[ApprovalRequest]]]

    @property
    def success_rate(self) -> float | None:
        return _ratio(self.succeeded, self.succeeded + self.failed)

    @property
    def cost_per_completed(self) -> Decimal | None:
        return _per(self.finished_cost, self.succeeded)

    @property
    def budget_used(self) -> float | None:
        return _ratio(self.capped_spend_today, self.budget_today)

    @property
    def uncapped_spend_today(self) -> Decimal:
        return self.spend_today - self.capped_spend_today


# Runs waiting on people (a decision, a plan review): not counted as active.
WAITS = (RunStatus.WAITING.value, RunStatus.AWAITING_PLAN_APPROVAL.value)
# Runs working: neither finished nor waiting on people. Named value by value (not "none of the
# others") so that both counts read the status index alone, never every run.
WORKING = tuple(s.value for s in RunStatus if s not in RUN_TERMINAL and s.value not in WAITS)
ENDED = tuple(sorted(s.value for s in RUN_TERMINAL))
# What the dashboard's rows of runs (recent, waiting on people) never show: JSON documents that
# would only be decoded and thrown away, row after row.
UNSHOWN = ("input", "result", "plan", "error", "process_version__plan",
           "process_version__input_schema", "process_version__budgets")


def recent_runs(user: Any, count: int = 50) -> QuerySet[Run]:
    """The dashboard's table: the newest runs this person may see."""
    return visible_runs(user).defer(*UNSHOWN).order_by("-created_at")[:count]


def dashboard_figures(user: Any, *, now: datetime | None = None) -> DashboardFigures:
    """What the dashboard shows above the runs table, over the runs this person may see.

    Active runs are the ones working (not finished, not waiting on people); waiting ones are
    counted apart. Spend today is the cost of runs created today: the runs with a cost cap are
    set against the sum of their caps, the runs without one are counted apart. Success rate and
    cost per completed run cover runs that finished in the last 14 days; cancelled runs count
    in neither rate but their cost counts.

    Three aggregates, each over only the runs it concerns and each read from an index alone
    (migration orchestration 0014): the unfinished runs by status, the runs created today, the
    runs finished in the window by outcome."""
    now = now or timezone.now()
    today = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    since = now - timedelta(days=WINDOW_DAYS)
    runs = visible_runs(user).order_by()
    live = dict(runs.filter(status__in=[*WORKING, *WAITS]).values("status")
                .annotate(n=Count("status")).values_list("status", "n"))
    spent = runs.filter(created_at__gte=today).aggregate(
        spend_today=Sum("cost"), budget_today=Sum("budget_cost"),
        capped_spend_today=Sum("cost", filter=Q(budget_cost__isnull=False)),
        uncapped_today=Count("created_at", filter=Q(budget_cost__isnull=True)),
    )
    # One row (grouped by a constant: by nothing), read through a cursor (.iterator()):
    # PostgreSQL never plans one with parallel workers, which cost more to start and gather
    # than they save on this one index scan (85,000 runs: 13 to 18 ms alone, 21 to 31 ms with
    # two workers on a two-core server).
    done = next(runs.filter(status__in=ENDED, finished_at__gte=since)
                .values(window=Value(1, output_field=IntegerField()))
                .annotate(finished=Count("status"),
                          succeeded=Count("status", filter=Q(status=RunStatus.SUCCEEDED)),
                          failed=Count("status", filter=Q(status=RunStatus.FAILED)),
                          finished_cost=Sum("cost")).iterator(), {})
    agg = {"finished": 0, "succeeded": 0, "failed": 0, "finished_cost": None, **done, **spent,
           "active": sum(live.get(s, 0) for s in WORKING),
           "waiting": sum(live.get(s, 0) for s in WAITS)}
    waiting_runs = list(runs.filter(status__in=WAITS).defer(*UNSHOWN)
                        .order_by("-updated_at")[:20])
    waits = runs_waiting_on(waiting_runs)
    return DashboardFigures(
        active=agg["active"], waiting=agg["waiting"],
        pending_for_me=approvals.pending_for(user).count(),
        spend_today=agg["spend_today"] or Decimal(0),
        budget_today=agg["budget_today"] or Decimal(0),
        uncapped_today=agg["uncapped_today"], finished=agg["finished"],
        capped_spend_today=agg["capped_spend_today"] or Decimal(0),
        succeeded=agg["succeeded"], failed=agg["failed"],
        finished_cost=agg["finished_cost"] or Decimal(0),
        waiting_on=[(run, people_waited_on(waits[run.pk])) for run in waiting_runs],
    )

