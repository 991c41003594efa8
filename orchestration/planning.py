"""Planned runs: a planner agent proposes each run's tasks, the plan is validated, and the
process's design gate decides whether a person approves it before its tasks exist.

Planning is run work like any other: a worker's ``advance`` (orchestration/work.py) finds the
run PENDING or PLANNING and calls ``plan_run``. Each planner turn is three steps: a short
transaction under the run's lock reads the conversation back from the ledger; the model is
called with no lock held (its worst case reserved against the run's budgets); a second
transaction under the lock records the turn (``plan.proposed``), settles its usage and applies
the verdict (``plan.validated`` or ``plan.rejected``). A worker that dies after a turn was
recorded resumes from the ledger without calling the model for it again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import Group
from django.db import transaction

from approvals import services as approvals
from approvals.models import ApprovalRequest, Reason
from audit import ledger
from audit.ledger import actor_of
from audit.models import Event
from orchestration import budgets, outbox, retrieval, run_lock, transcripts
from orchestration.engine import planner
from orchestration.engine.errors import PlanError
from orchestration.engine.governance import Usage
from orchestration.engine.llm import ModelRequest, ProviderError
from orchestration.engine.plan import Plan
from orchestration.engine.redaction import redact
from orchestration.engine.states import RunStatus, TaskStatus
from orchestration.engine.transcript import conversation
from orchestration.models import Agent, ModelPrice, Run, Task, Tool
from orchestration.plans import plan_for_id, plan_of
from orchestration.precheck import granted_to
from orchestration.retry import persist
from orchestration.rules import PlanDecision
from orchestration.store import DjangoRunStore
from orchestration.tooling import secrets

log = logging.getLogger("switchboard.planning")


def history(run_id: Any) -> list[tuple[str, dict[str, Any]]]:
    """The run's planning events, oldest first: the planner's conversation and its verdicts."""
    return [(kind, data) for kind, data in Event.objects.filter(
        chain=uuid.UUID(str(run_id)), kind__in=planner.PLAN_EVENTS).order_by("seq")
        .values_list("kind", "data")]


def last_version(events: list[tuple[str, dict[str, Any]]]) -> int:
    return max((int(d.get("version", 0)) for k, d in events
                if k in (planner.PROPOSED, planner.EDITED)), default=0)


# ---- validation ----------------------------------------------------------------------------


def check(data: Any, planning: Mapping[str, Any], *, process_user: Any = None,
          ) -> tuple[Plan | None, list[str], list[str]]:
    """Validate a proposed plan: (the plan or None, errors, the tools it may use). Executors
    must exist (agents by slug, tools by slug, people's groups by name), an agent task may name
    only tools granted to its agent, a tool step only tools granted to the process's service
    identity (``process_user``, its id), and the plan must keep the process's constraints."""
    plan, errors = planner.proposal(data)
    if plan is None:
        return None, errors, []
    tools = {t.slug: t for t in Tool.objects.all()}
    refs = {t.executor_ref for t in plan.tasks if t.executor_type == "agent"}
    refs |= {slug for t in plan.tasks for slug in t.delegates}
    agents = {a.slug: a for a in Agent.objects.filter(slug__in=refs).select_related("user")}
    groups = set(Group.objects.filter(name__in={t.executor_ref for t in plan.tasks})
                 .values_list("name", flat=True))
    used: set[str] = set()
    for task in plan.tasks:
        ref, kind = task.executor_ref, task.executor_type
        if kind == "agent":
            agent = agents.get(ref)
            if agent is None:
                errors.append(f"task {task.key!r}: there is no agent {ref!r}")
                continue
            if agent.status != Agent.Status.ACTIVE:
                errors.append(f"task {task.key!r}: agent {ref!r} is retired")
                continue
            granted = granted_to(agent.user_id, tools)
            names = task.tools if task.tools is not None else [n for n in tools if granted(n)]
            for name in names:
                if not granted(name):
                    errors.append(f"task {task.key!r}: agent {ref!r} is not granted the "
                                  f"tool {name!r}")
            used.update(names)
            for slug in task.delegates:
                callee = agents.get(slug)
                if callee is None or callee.status != Agent.Status.ACTIVE:
                    errors.append(f"task {task.key!r}: there is no active agent {slug!r} to "
                                  "delegate to")
        elif kind in ("tool", "function"):
            if ref not in tools:
                errors.append(f"task {task.key!r}: there is no tool {ref!r}")
            elif process_user is None or not granted_to(process_user, tools)(ref):
                errors.append(f"task {task.key!r}: the process is not granted the tool {ref!r}")
            used.add(ref)
        elif kind == "human" and ref not in groups:
            errors.append(f"task {task.key!r}: there is no group {ref!r} of people")
    errors.extend(retrieval.plan_problems(plan, {slug: a.user_id for slug, a in agents.items()
                                                 if a.status == Agent.Status.ACTIVE}))
    errors.extend(planner.within(plan, planning.get("constraints") or {}))
    return (None if errors else plan), errors, sorted(used)


# What the process says about verifying its runs; a proposed plan runs under it, whatever the
# proposal says (a planner cannot weaken the checks its work is held to).
GOVERNED = ("verification", "run_check", "result_schema", "delegation")


def check_for(run_id: Any, data: Any) -> tuple[Plan | None, list[str], list[str]]:
    """``check`` a plan for this run: its process's constraints and service identity, with the
    process's verification settings, run check and result contract in force."""
    version_id, user_id, process_plan = Run.objects.filter(pk=run_id).values_list(
        "process_version_id", "process_version__process__service_user_id",
        "process_version__plan").get()
    if isinstance(data, Mapping) and isinstance(process_plan, Mapping):
        data = {**{k: v for k, v in data.items() if k not in GOVERNED},
                **{k: process_plan[k] for k in GOVERNED if k in process_plan}}
    return check(data, plan_for_id(version_id).planning, process_user=user_id)


def edit_problem(request: ApprovalRequest, arguments: Any) -> str:
    """approvals' check of a reviewer's edited plan: "" when it would be accepted."""
    if not Run.objects.filter(pk=request.run_id).exists():
        return "the run no longer exists"
    _, errors, _ = check_for(request.run_id, arguments)
    return "; ".join(errors)


# ---- the planner's turns -------------------------------------------------------------------


def plan_run(run_id: str) -> None:
    """Have the run's planner propose plans until one is accepted, goes to people, or the run
    stops; called by a worker, never inside a transaction."""
    store = DjangoRunStore()
    while _turn(store, run_id):
        pass


def _begin(store: DjangoRunStore, run_id: str) -> tuple[Run, list[Any]] | None:
    with transaction.atomic(), run_lock.locked(run_id) as snapshot:
        if snapshot.cancel_requested:
            return None
        if snapshot.status == RunStatus.PENDING and snapshot.plan.planning:
            store.set_run_status(run_id, RunStatus.PLANNING, reason="the planner plans the run")
        elif snapshot.status != RunStatus.PLANNING:
            return None
        run = Run.objects.select_related("process_version").get(pk=run_id)
        return run, history(run_id)


def _turn(store: DjangoRunStore, run_id: str) -> bool:
    """One planner turn; True when the planner should be asked again. Its two steps are
    retried through database errors on their own: the model call between them never is."""
    begun = persist(lambda: _begin(store, run_id), what=f"plan {run_id}")
    if begun is None:
        return False
    run, events = begun
    planning = plan_for_id(run.process_version_id).planning
    agent = Agent.objects.filter(slug=planning.get("agent", "")).first()
    if agent is None or agent.status != Agent.Status.ACTIVE:
        return _fail_turn(store, run_id, len(events),
                          f"the planner agent {planning.get('agent')!r} is missing or retired")
    from orchestration.agents import model_for

    messages = planner.conversation(agent.instructions,
                                    planner.briefing(planning, run.input, _executors()), events)
    price = ModelPrice.objects.filter(provider=agent.provider,
                                      model_name=agent.model_name).first()
    max_out = int((agent.model_params or {}).get("max_tokens", 2048))
    worst_in = sum(len(m.content) for m in messages) // 2 + 1
    worst = Usage(steps=1, tokens_in=worst_in, tokens_out=max_out,
                  cost=price.cost(worst_in, max_out) if price else Decimal("0"))
    refused = budgets.reserve(run_id, "", worst, run=run)
    if refused:
        return _fail_turn(store, run_id, len(events), refused)
    try:
        response = model_for(agent).complete(ModelRequest(
            messages=messages, params={"max_tokens": max_out}, variables={"input": run.input}))
    except ProviderError as exc:
        budgets.release(run_id, "", worst)
        return _fail_turn(store, run_id, len(events), f"the planner failed: {exc}")
    actual = Usage(steps=1, tokens_in=response.tokens_in, tokens_out=response.tokens_out,
                   cost=price.cost(response.tokens_in, response.tokens_out) if price
                   else Decimal("0"))
    return persist(lambda: _record(store, run, agent, len(events), response, worst, actual,
                                   messages),
                   what=f"plan {run_id}")


def _record(store: DjangoRunStore, run: Run, agent: Agent, seen: int, response: Any,
            worst: Usage, actual: Usage, messages: Any) -> bool:
    """Record a planner turn and apply its verdict, under the run's lock (its conversation
    with it, beside the ledger)."""
    run_id = str(run.pk)
    with transaction.atomic(), run_lock.locked(run_id) as snapshot:
        now = history(run_id)
        if snapshot.status != RunStatus.PLANNING or len(now) != seen:
            budgets.release(run_id, "", worst)  # stopped, or another worker's turn landed
            return False
        budgets.settle(run_id, "", worst, actual)
        version = last_version(now) + 1
        data = {"version": version, "agent": agent.slug,
                "response": redact(response.to_dict(), secrets()),
                "tokens_in": actual.tokens_in, "tokens_out": actual.tokens_out,
                "cost": str(actual.cost)}
        _append(run_id, planner.PROPOSED, data, actor=f"agent:{agent.slug}")
        transcripts.keep(run_id, planner.PROPOSED, task="", step=version,
                         messages=redact(conversation(messages), secrets()))
        try:
            proposed: Any = planner.extract(data["response"]["text"])
        except PlanError as exc:
            proposed = None
            parse_error = str(exc)
        else:
            parse_error = ""
        plan, errors, used = check_for(run_id, proposed) if proposed is not None else (
            None, [parse_error or "the reply holds no plan"], [])
        if plan is None:
            _append(run_id, planner.REJECTED, {"version": version, "errors": errors})
            if planner.turns_left(agent.step_budget or planner.DEFAULT_TURNS,
                                  [*now, (planner.PROPOSED, data)]):
                return True
            _escalate(store, run, version, errors, proposed)
            return False
        _append(run_id, planner.VALIDATED, {"version": version,
                                            "estimate": str(planner.estimate(plan))})
        _settle_plan(store, run, plan, version, used)
    return False


def _fail_turn(store: DjangoRunStore, run_id: str, seen: int, why: str) -> bool:
    """A turn that could not happen (no planner, no budget, the provider failed): people
    decide, as for a planner that found no valid plan."""
    with transaction.atomic(), run_lock.locked(run_id) as snapshot:
        if snapshot.status != RunStatus.PLANNING or len(history(run_id)) != seen:
            return False
        run = Run.objects.select_related("process_version").get(pk=run_id)
        _escalate(store, run, last_version(history(run_id)), [why], None)
    return False


def _append(run_id: Any, kind: str, data: dict[str, Any], actor: str = "system") -> None:
    ledger.append(uuid.UUID(str(run_id)), kind, data, actor=actor)


def _executors() -> str:
    """What the planner may use: the active agents with the tools each is granted, the tools."""
    tools = {t.slug: t for t in Tool.objects.all()}
    lines = ["Agents (an agent task may use only the tools listed with its agent):"]
    for agent in Agent.objects.filter(status=Agent.Status.ACTIVE).order_by("slug"):
        granted = granted_to(agent.user_id, tools)
        names = ", ".join(n for n in sorted(tools) if granted(n)) or "none"
        lines.append(f"- {agent.slug} ({agent.name}): tools {names}")
    lines.append(f"Tools: {', '.join(sorted(tools)) or 'none'}.")
    return "\n".join(lines)


def _escalate(store: DjangoRunStore, run: Run, version: int, errors: list[str],
              proposed: Any) -> None:
    log.info("run %s: no valid plan (v%s), people decide: %s", run.pk, version,
             "; ".join(errors))
    store.set_run_status(str(run.pk), RunStatus.AWAITING_PLAN_APPROVAL,
                         reason="plan_invalid: the planner found no valid plan")
    approvals.request_open(
        run_id=run.pk, task_key="", reason=Reason.PLAN_INVALID,
        arguments=proposed if isinstance(proposed, dict) else {},
        detail="plan_invalid: " + "; ".join(errors), requested_by="system",
        run_started_by=run.created_by,
        context={"version": version, "validation": {"valid": False, "errors": errors}})


def _settle_plan(store: DjangoRunStore, run: Run, plan: Plan, version: int,
                 used: list[str]) -> None:
    """A validated plan becomes the run's: it runs at once, or waits for the design gate."""
    Run.objects.filter(pk=run.pk).update(plan=plan.to_dict(), plan_version=version)
    gate = plan_for_id(run.process_version_id).design_gate
    reasons = planner.gate_reasons(gate, plan, used, run.input)
    if not reasons:
        _accept(store, run, plan, version)
        return
    estimate = str(planner.estimate(plan))
    store.set_run_status(str(run.pk), RunStatus.AWAITING_PLAN_APPROVAL,
                         reason="plan_review: " + "; ".join(reasons))
    approvals.request_open(
        run_id=run.pk, task_key="", reason=Reason.PLAN_REVIEW, arguments=plan.to_dict(),
        detail="plan_review: " + "; ".join(reasons), requested_by="system",
        run_started_by=run.created_by,
        context={"version": version, "plan": plan.to_dict(), "estimate": estimate,
                 "validation": {"valid": True, "errors": []}, "gate": reasons})


def _accept(store: DjangoRunStore, run: Run, plan: Plan, version: int) -> None:
    """The plan's tasks are created and the run is queued (under the run's lock)."""
    Task.objects.bulk_create(
        Task(run=run, key=t.key, position=i, title=t.title or t.key.replace("_", " "),
             executor_type=t.executor_type, executor_ref=t.executor_ref,
             depends_on=list(t.depends_on), budget_tokens=t.budget.get("tokens"),
             budget_cost=Decimal(str(t.budget["cost"])) if "cost" in t.budget else None,
             status=TaskStatus.PENDING)
        for i, t in enumerate(plan.tasks))
    store.set_run_status(str(run.pk), RunStatus.QUEUED, reason=f"plan v{version} accepted")
    log.info("run %s: plan v%s accepted with %d tasks", run.pk, version, len(plan.tasks))
    outbox.emit("advance", run.pk)


# ---- people's decisions --------------------------------------------------------------------


def resume(run: Run, request: ApprovalRequest, todo: PlanDecision, user: Any) -> None:
    """Apply a decision on a plan request (inside the resume's transaction, the run locked):
    accept the plan, accept a reviewer's edit, or send the planner back to work."""
    run_id = str(run.pk)
    store = DjangoRunStore(actor=actor_of(user))
    with run_lock.locked(run_id) as snapshot:
        if snapshot.status != RunStatus.AWAITING_PLAN_APPROVAL:
            return
        events = history(run_id)
        person = user.get_username() if user is not None else ""
        if todo.action == "accept" and run.plan_version:
            plan = plan_of(run)
            _append(run_id, planner.APPROVED, {"version": run.plan_version, "by": person,
                                               "request": str(request.pk)},
                    actor=actor_of(user))
            _accept(store, run, plan, run.plan_version)
            return
        if todo.action == "edit":
            version = last_version(events) + 1
            _append(run_id, planner.EDITED, {"version": version, "plan": todo.plan,
                                             "by": person, "request": str(request.pk)},
                    actor=actor_of(user))
            plan, errors, _ = check_for(run_id, todo.plan)
            if plan is not None:
                _append(run_id, planner.VALIDATED, {"version": version,
                                                    "estimate": str(planner.estimate(plan))})
                Run.objects.filter(pk=run.pk).update(plan=plan.to_dict(), plan_version=version)
                _append(run_id, planner.APPROVED, {"version": version, "by": person,
                                                   "request": str(request.pk)},
                        actor=actor_of(user))
                _accept(store, run, plan, version)
                return
            # Valid when it was decided, not now (a grant was revoked meanwhile): replan.
            _append(run_id, planner.REJECTED, {"version": version, "errors": errors,
                                               "by_planner": False})
            todo = PlanDecision("replan", note="the edited plan is no longer valid: "
                                + "; ".join(errors))
        _append(run_id, planner.FEEDBACK, {"note": todo.note, "by": person,
                                           "request": str(request.pk)}, actor=actor_of(user))
        store.set_run_status(run_id, RunStatus.PLANNING, reason="sent back to the planner")
        outbox.emit("advance", run.pk)


def phase(run: Run) -> str:
    """Where a run is: planning, plan_review, production, verifying or done."""
    status = RunStatus(run.status)
    if status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED):
        return "done"
    if status in (RunStatus.PENDING, RunStatus.PLANNING):
        return "planning" if status == RunStatus.PLANNING or (
            plan_for_id(run.process_version_id).planning) else "production"
    if status == RunStatus.AWAITING_PLAN_APPROVAL:
        return "plan_review"
    if status == RunStatus.VERIFYING:
        return "verifying"
    return "production"


def register() -> None:
    """approvals may check a reviewer's edited plan (called when the app is ready)."""
    for reason in (Reason.PLAN_REVIEW, Reason.PLAN_INVALID):
        approvals.register_edit_check(reason, edit_problem)
