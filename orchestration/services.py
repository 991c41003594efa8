"""Actions on processes and runs. Each is atomic and writes its ledger event in the same
transaction; work is enqueued only after commit."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import jsonschema
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from audit import ledger
from orchestration import dispatch
from orchestration.engine import runner
from orchestration.engine.errors import PlanError
from orchestration.engine.plan import parse_plan
from orchestration.engine.states import RUN_TERMINAL, RunStatus, TaskStatus
from orchestration.models import Process, ProcessVersion, Run, Task
from orchestration.store import DjangoRunStore, plan_for


class ServiceError(Exception):
    """A request the domain refuses, with a message fit to show the person who made it."""


class RunInputInvalid(ServiceError):
    pass


class RunNotCancellable(ServiceError):
    pass


def actor_of(user: AbstractBaseUser | None) -> str:
    if user is None:
        return "system"
    agent = getattr(user, "agent_identity", None)
    if agent is not None:
        return f"agent:{agent.slug}"
    return f"user:{user.get_username()}"


def process_publish(
    *,
    process: Process,
    plan: dict[str, Any],
    input_schema: dict[str, Any],
    hydration_limit: int = 3,
    budgets: dict[str, Any] | None = None,
    gates: dict[str, Any] | None = None,
) -> ProcessVersion:
    """Validate and publish a new immutable version; it becomes the process's current one."""
    try:
        parse_plan(plan)
    except PlanError as exc:
        raise ServiceError(str(exc)) from None
    try:
        jsonschema.Draft202012Validator.check_schema(input_schema)
    except jsonschema.SchemaError as exc:
        raise ServiceError(f"input schema is not a valid JSON Schema: {exc.message}") from None
    if hydration_limit < 1:
        raise ServiceError("hydration limit must be at least 1")
    with transaction.atomic():
        last = process.versions.order_by("-number").values_list("number", flat=True).first()
        version = ProcessVersion.objects.create(
            process=process, number=(last or 0) + 1, plan=plan, input_schema=input_schema,
            hydration_limit=hydration_limit, budgets=budgets or {}, gates=gates or {},
        )
        Process.objects.filter(pk=process.pk).update(current_version=version)
        process.current_version = version
    return version


def validate_run_input(version: ProcessVersion, data: Any) -> None:
    validator = jsonschema.Draft202012Validator(version.input_schema or {"type": "object"})
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        parts = []
        for err in errors[:5]:
            where = "/".join(str(p) for p in err.absolute_path)
            parts.append(f"{where}: {err.message}" if where else err.message)
        raise RunInputInvalid("input does not match the process's input schema: " +
                              "; ".join(parts))


def run_create(*, process: Process, input: Any, user: AbstractBaseUser | None) -> Run:
    version = process.current_version
    if version is None:
        raise ServiceError(f"process {process.slug!r} has no published version")
    validate_run_input(version, input)
    plan = plan_for(version)
    with transaction.atomic():
        run = Run.objects.create(process_version=version, created_by=user, input=input)
        Task.objects.bulk_create(
            Task(run=run, key=t.key, position=i, title=t.title or t.key.replace("_", " "),
                 executor_type=t.executor_type, executor_ref=t.executor_ref,
                 depends_on=list(t.depends_on))
            for i, t in enumerate(plan.tasks)
        )
        ledger.open_chain(run.pk)
        ledger.append(
            run.pk, "run.created",
            {"process": process.slug, "version": version.number, "input": input},
            actor=actor_of(user),
        )
        transaction.on_commit(lambda: dispatch.enqueue_advance(run.pk))
    return run


def run_cancel(*, run: Run, user: AbstractBaseUser | None) -> Run:
    with transaction.atomic():
        locked = Run.objects.select_for_update().get(pk=run.pk)
        if RunStatus(locked.status) in RUN_TERMINAL:
            raise RunNotCancellable(f"the run has already ended ({locked.status})")
        if not locked.cancel_requested:
            Run.objects.filter(pk=run.pk).update(cancel_requested=True)
            ledger.append(run.pk, "run.cancel_requested", {}, actor=actor_of(user))
    # The engine's own step applies the cancellation under the run lock.
    runner.advance(DjangoRunStore(actor=actor_of(user)), str(run.pk))
    run.refresh_from_db()
    return run


STALE_AFTER = timedelta(minutes=10)


def tasks_recover_stale(*, older_than: timedelta = STALE_AFTER) -> int:
    """Requeue tasks a lost worker left running, and nudge runs that have no work in flight."""
    cutoff = timezone.now() - older_than
    stale = Task.objects.filter(status=TaskStatus.RUNNING, started_at__lt=cutoff).values_list(
        "run_id", "key")
    count = 0
    store = DjangoRunStore()
    for run_id, key in stale:
        runner.recover(store, str(run_id), [key])
        transaction.on_commit(lambda r=run_id, k=key: dispatch.enqueue_execute(r, k))
        count += 1
    for run_id, key in Task.objects.filter(status=TaskStatus.QUEUED,
                                           run__updated_at__lt=cutoff).values_list("run_id", "key"):
        dispatch.enqueue_execute(run_id, key)
    for run_id in Run.objects.filter(status__in=[RunStatus.PENDING, RunStatus.QUEUED,
                                                 RunStatus.RUNNING],
                                     updated_at__lt=cutoff).values_list("pk", flat=True):
        dispatch.enqueue_advance(run_id)
    return count


