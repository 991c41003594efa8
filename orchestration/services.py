"""Actions on processes and runs. Each is atomic and writes its ledger event in the same
transaction; the work it implies is an outbox message of that same transaction
(orchestration/outbox.py), published after commit."""

from __future__ import annotations

import functools
import json
from decimal import Decimal, InvalidOperation
from typing import Any

import jsonschema
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit import config as config_audit
from audit import hygiene, ledger
from audit.ledger import actor_of
from jsonkit import check_schema, schema_problems
from orchestration import outbox, planning, retrieval, rules
from orchestration.engine import runner
from orchestration.engine.errors import PlanError
from orchestration.engine.plan import parse_plan
from orchestration.engine.states import RUN_TERMINAL, RunStatus, TaskStatus
from orchestration.models import Agent, Process, ProcessVersion, Run, Task
from orchestration.plans import plan_for
from orchestration.store import DjangoRunStore

# The requeue reason of tasks a released kill switch puts back (orchestration/kill_switches.py),
# which replay recognises.
KILL_SWITCH_RELEASED = "kill switch released"


class ServiceError(Exception):
    """A request the domain refuses, with a message fit to show the person who made it."""


class RunInputInvalid(ServiceError):
    pass


class RunNotCancellable(ServiceError):
    pass


def process_publish(
    *,
    process: Process,
    plan: dict[str, Any],
    input_schema: dict[str, Any],
    hydration_limit: int = 3,
    budgets: dict[str, Any] | None = None,
    by: AbstractBaseUser | None = None,
) -> ProcessVersion:
    """Validate and publish a new immutable version; it becomes the process's current one."""
    process_validate(plan=plan, input_schema=input_schema, hydration_limit=hydration_limit,
                     budgets=budgets)
    with transaction.atomic():
        previous = (ProcessVersion.objects.filter(pk=process.current_version_id).first()
                    if process.current_version_id else None)
        last = process.versions.order_by("-number").values_list("number", flat=True).first()
        version = ProcessVersion.objects.create(
            process=process, number=(last or 0) + 1, plan=plan, input_schema=input_schema,
            hydration_limit=hydration_limit, budgets=budgets or {},
        )
        Process.objects.filter(pk=process.pk).update(current_version=version)
        process.current_version = version
        process_identity(process, by=by)
        fields = ["number", "plan", "input_schema", "hydration_limit", "budgets"]
        config_audit.record(
            "process.publish", model="orchestration.process", object=process.slug,
            old={f: getattr(previous, f) for f in fields} if previous else {},
            new={f: getattr(version, f) for f in fields}, by=by)
    return version


def process_identity(process: Process, *, by: AbstractBaseUser | None = None) -> Any:
    """The service identity the process's plan-level steps act as (created on first use):
    a user that cannot sign in, granted tools like an agent."""
    from django.contrib.auth import get_user_model

    if process.service_user_id is not None:
        return process.service_user
    with transaction.atomic():
        locked = Process.objects.select_for_update().get(pk=process.pk)
        if locked.service_user_id is None:
            # Always a new user, never one that exists: taking over a person's account (or a
            # deleted process's identity with its grants) would hand the process its rights.
            users = get_user_model().objects
            name = f"process-{process.slug}"[:150]
            if users.filter(username=name).exists():
                name = f"process-{process.slug}"[:140] + f"-{process.pk.hex[:8]}"
            if users.filter(username=name).exists():
                raise ServiceError(f"cannot create the service identity of {process.slug!r}: "
                                   f"the username {name!r} is taken")
            user = users.create(username=name, is_active=True)
            user.set_unusable_password()
            user.save(update_fields=["password"])
            Process.objects.filter(pk=process.pk).update(service_user=user)
            config_audit.record("identity", model="orchestration.process", object=process.slug,
                                old={}, new={"service_user": user.get_username()}, by=by)
            locked.service_user = user
    process.service_user = locked.service_user
    return locked.service_user


def process_validate(*, plan: dict[str, Any], input_schema: dict[str, Any],
                     hydration_limit: int = 3, budgets: dict[str, Any] | None = None) -> None:
    """Raise ServiceError unless these could be published as a process version."""
    try:
        parsed = parse_plan(plan)
    except PlanError as exc:
        raise ServiceError(str(exc)) from None
    readers = dict(Agent.objects.filter(slug__in={t.executor_ref for t in parsed.tasks
                                                  if t.knowledge}).values_list("slug", "user_id"))
    problems = retrieval.plan_problems(parsed, readers)
    if problems:
        raise ServiceError("; ".join(problems))
    try:
        check_schema(input_schema)
    except jsonschema.SchemaError as exc:
        raise ServiceError(f"input schema is not a valid JSON Schema: {exc.message}") from None
    if hydration_limit < 1:
        raise ServiceError("hydration limit must be at least 1")
    for key, value in (budgets or {}).items():
        if key not in ("tokens", "cost", "steps", "wall_s"):
            raise ServiceError(f"unknown budget {key!r}; use tokens, cost, steps or wall_s")
        try:
            ok = Decimal(str(value)) > 0
        except InvalidOperation:
            ok = False
        if not ok:
            raise ServiceError(f"budget {key} must be a positive number, not {value!r}")


@functools.lru_cache(maxsize=256)
def _input_validator(version_id: Any, schema_json: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(schema_json))


def validate_run_input(version: ProcessVersion, data: Any) -> None:
    # First what no schema says (NaN passes "type": "number"; a NUL or a lone surrogate passes
    # "type": "string"), and what the run row and its ledger event could not hold.
    try:
        hygiene.check(data, "input")
    except hygiene.Refused as exc:
        raise RunInputInvalid(str(exc)) from None
    # Versions are immutable; the schema's text is part of the key all the same.
    validator = _input_validator(version.pk, json.dumps(version.input_schema or {"type": "object"},
                                                        sort_keys=True))
    problems = schema_problems(validator, data)
    if problems:
        raise RunInputInvalid("input does not match the process's input schema: " +
                              "; ".join(map(str, problems)))


def run_create(*, process: Process, input: Any, user: AbstractBaseUser | None,
               fork: tuple[Run, int, dict[str, Any]] | None = None) -> Run:
    """Start a run of the process's current version. ``fork`` (origin, step, reused outputs)
    makes it a fork: see ``run_fork``."""
    version = process.current_version
    if version is None:
        raise ServiceError(f"process {process.slug!r} has no published version")
    validate_run_input(version, input)
    plan = plan_for(version)
    budgets = version.budgets or {}
    origin, point, reused = fork if fork is not None else (None, None, {})
    with transaction.atomic():
        run = Run.objects.create(
            process_version=version, created_by=user, input=input,
            budget_tokens=budgets.get("tokens"), budget_steps=budgets.get("steps"),
            budget_cost=Decimal(str(budgets["cost"])) if budgets.get("cost") is not None
            else None,
            budget_wall_s=budgets.get("wall_s"), forked_from=origin, fork_point=point,
        )
        ledger.start_chain(run.pk)
        Task.objects.bulk_create(
            Task(run=run, key=t.key, position=i, title=t.title or t.key.replace("_", " "),
                 executor_type=t.executor_type, executor_ref=t.executor_ref,
                 depends_on=list(t.depends_on), budget_tokens=t.budget.get("tokens"),
                 budget_cost=Decimal(str(t.budget["cost"])) if "cost" in t.budget else None,
                 status=TaskStatus.SUCCEEDED if t.key in reused else TaskStatus.PENDING,
                 output=reused.get(t.key))
            for i, t in enumerate(plan.tasks)
        )
        ledger.append(
            run.pk, "run.created",
            {"process": process.slug, "version": version.number, "input": input},
            actor=actor_of(user),
        )
        if origin is not None:
            ledger.append(run.pk, "run.forked", {
                "origin": str(origin.pk), "step": point, "task": plan.tasks[(point or 1) - 1].key,
                "reused": sorted(reused)},
                actor=actor_of(user))
            for key, output in reused.items():
                ledger.append(run.pk, "task.succeeded",
                              {"task": key, "output": output, "reused_from": str(origin.pk)},
                              actor=actor_of(user))
        outbox.emit("advance", run.pk)
    return run


class ForkInvalid(ServiceError):
    pass


def run_fork(*, run: Run, step: int, user: AbstractBaseUser | None) -> Run:
    """Start a new run of the process's current version from task ``step`` (1-based, plan
    order) of ``run``: the tasks before it keep the origin's recorded outputs and are not run
    again; the task at ``step`` and everything after it run for real."""
    process = run.process_version.process
    version = process.current_version
    if version is None:
        raise ServiceError(f"process {process.slug!r} has no published version")
    plan = plan_for(version)
    if plan.planning:
        raise ForkInvalid("runs of a planned process plan their own tasks; forking one from a "
                          "step is not supported")
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= len(plan.tasks):
        raise ForkInvalid(f"step must be a task position from 1 to {len(plan.tasks)}, "
                          f"not {step!r}")
    origin = {t.key: t for t in run.tasks.all()}
    reused: dict[str, Any] = {}
    for spec in plan.tasks[:step - 1]:
        task = origin.get(spec.key)
        if task is None or task.status != TaskStatus.SUCCEEDED:
            raise ForkInvalid(f"task {spec.key!r} did not succeed in the origin run, so a fork "
                              f"cannot reuse it; fork from step {plan.tasks.index(spec) + 1} "
                              "or earlier")
        missing = [d for d in spec.depends_on if d not in reused]
        if missing:
            raise ForkInvalid(f"task {spec.key!r} depends on {', '.join(missing)}, which would "
                              "run again; fork from an earlier step")
        reused[spec.key] = task.output
    return run_create(process=process, input=run.input, user=user, fork=(run, step, reused))


def run_cancel(*, run: Run, user: AbstractBaseUser | None) -> Run:
    with transaction.atomic():
        locked = Run.objects.select_for_update(of=("self",)).get(pk=run.pk)
        if RunStatus(locked.status) in RUN_TERMINAL:
            raise RunNotCancellable(f"the run has already ended ({locked.status})")
        # Pending requests are locked before the run's chain head (the first append): a
        # reviewer deciding one of them holds the request and then wants the head, so taking
        # them the other way round could deadlock with that decision.
        approvals.requests_cancel_for_run(run.pk, actor=actor_of(user), lock_only=True)
        if not locked.cancel_requested:
            Run.objects.filter(pk=run.pk).update(cancel_requested=True)
            ledger.append(run.pk, "run.cancel_requested", {}, actor=actor_of(user))
        approvals.requests_cancel_for_run(run.pk, actor=actor_of(user))
        # The engine's own step applies the cancellation, in the same transaction.
        runner.advance(DjangoRunStore(actor=actor_of(user)), str(run.pk))
    run.refresh_from_db()
    return run


def resume_after_decision(request: ApprovalRequest, *, message_id: int | None = None) -> None:
    """A request was resolved: apply what the people decided and put the work back, in one
    transaction with consuming the resume message (so a lost worker leaves the message)."""
    with transaction.atomic():
        if not outbox.consume(message_id):
            return
        # Lock order: the run row first, then its task rows (orchestration/store.py).
        run = (Run.objects.select_for_update(of=("self",)).select_related("created_by")
               .filter(pk=request.run_id).first())
        if run is None or RunStatus(run.status) in RUN_TERMINAL:
            return
        decider = request.decisions.select_related("decider").order_by("-created_at").first()
        user = decider.decider if decider else None
        if request.reason in rules.PLAN_REASONS:  # a plan under review (orchestration/planning.py)
            decided = rules.plan_resolution(reason=request.reason, status=request.status,
                                            resolution=request.resolution or {})
            if decided.action == "cancel":
                run_cancel(run=run, user=user)
            else:
                planning.resume(run, request, decided, user)
            return
        task = Task.objects.filter(run_id=run.pk, key=request.task_key).first()

        def agent_steps() -> int | None:
            agent = Agent.objects.filter(slug=task.executor_ref).first() if task else None
            return agent.step_budget if agent is not None else None

        # What the decision does is orchestration/rules.py's, which replay applies too.
        todo = rules.apply_resolution(
            task_waiting=task is not None and task.status == TaskStatus.WAITING,
            reason=request.reason, resolution=request.resolution or {},
            agent_step_budget=agent_steps)
        if todo.action == "cancel":
            run_cancel(run=run, user=user)
            return
        if todo.action == "nothing" or task is None:
            return
        store = DjangoRunStore(actor=actor_of(user))
        if todo.action == "fail":
            store.finish_task(str(run.pk), task.key, TaskStatus.FAILED, error=todo.error)
            outbox.emit("advance", run.pk)
            return
        if todo.budget is not None:
            _raise_budget(run, task, todo.budget, actor=actor_of(user))
        if todo.reset_crashes:
            Task.objects.filter(pk=task.pk).update(crashes=0)  # a person chose to try again
        store.requeue_task(str(run.pk), task.key,
                           reason=f"approval {request.pk} {request.status}")
        released = runner.advance(store, str(run.pk)).released
        for key in dict.fromkeys([request.task_key, *released]):
            outbox.emit("execute", run.pk, key=key)


def _raise_budget(run: Run, task: Task, budget: dict[str, Any], *, actor: str) -> None:
    old = {"tokens": run.budget_tokens, "cost": str(run.budget_cost) if run.budget_cost
           is not None else None, "steps": run.budget_steps,
           "task_steps_extra": task.step_budget_extra}
    fields: dict[str, Any] = {}
    if "tokens" in budget:
        if run.budget_tokens is not None:
            fields["budget_tokens"] = run.budget_tokens + int(budget["tokens"])
        if task.budget_tokens is not None:
            Task.objects.filter(pk=task.pk).update(
                budget_tokens=task.budget_tokens + int(budget["tokens"]))
    if "cost" in budget:
        if run.budget_cost is not None:
            fields["budget_cost"] = run.budget_cost + Decimal(str(budget["cost"]))
        if task.budget_cost is not None:
            Task.objects.filter(pk=task.pk).update(
                budget_cost=task.budget_cost + Decimal(str(budget["cost"])))
    if "steps" in budget:
        Task.objects.filter(pk=task.pk).update(
            step_budget_extra=task.step_budget_extra + int(budget["steps"]))
        if run.budget_steps is not None:
            fields["budget_steps"] = run.budget_steps + int(budget["steps"])
    if "wall_s" in budget and run.budget_wall_s is not None:
        fields["budget_wall_s"] = run.budget_wall_s + int(budget["wall_s"])
    if fields:
        Run.objects.filter(pk=run.pk).update(**fields)
    ledger.append(run.pk, "budget.raised", {"task": task.key, "old": old, "raise": budget},
                  actor=actor)
