"""The Django implementation of the engine's RunStore: rows for state, the ledger for steps."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from django.db import OperationalError, connection, transaction
from django.db.models import F
from django.utils import timezone

from audit import ledger
from audit.models import Event
from orchestration import governance, leases
from orchestration.engine.agent import Journal
from orchestration.engine.errors import LeaseLost
from orchestration.engine.plan import Plan, TaskSpec, parse_plan
from orchestration.engine.states import (
    RUN_TERMINAL,
    RunStatus,
    TaskStatus,
    check_run_transition,
    check_task_transition,
)
from orchestration.engine.store import RunSnapshot, TaskSnapshot
from orchestration.models import ProcessVersion, Run, Task

JOURNAL_KINDS = ("model.called", "tool.intent", "tool.called", "tool.failed")
_plans: dict[uuid.UUID, Plan] = {}
_plans_lock = threading.Lock()


def plan_for(version: ProcessVersion) -> Plan:
    """Process versions are immutable, so their parsed plans can be cached by id."""
    plan = _plans.get(version.pk)
    if plan is None:
        plan = parse_plan(version.plan)
        with _plans_lock:
            _plans[version.pk] = plan
    return plan


# The run whose row this thread's open transaction already holds (see DjangoRunStore.locked).
_held = threading.local()


def _lock_run(run_id: str) -> None:
    """Every write to a run's state takes the run's row lock first: one lock order, no deadlocks,
    and one writer per run at a time (so its ledger sequence is written in order).

    The lock order, everywhere: run row → task rows → chain heads. Nothing on the hot path
    locks a row that many runs share (process versions, tools, agents, the global chain)."""
    if not connection.features.has_select_for_update:
        return  # SQLite: BEGIN IMMEDIATE (settings) already makes every writer go one at a time
    if getattr(_held, "run", None) == str(run_id) and connection.in_atomic_block:
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM orchestration_run WHERE id = %s FOR UPDATE",
                       [Run._meta.pk.get_db_prep_value(uuid.UUID(str(run_id)), connection)])


def _retrying[T](fn: Callable[..., T]) -> Callable[..., T]:
    """Retry a whole unit of work when the database reports a lock conflict."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if transaction.get_connection().in_atomic_block:
            return fn(*args, **kwargs)  # the outer unit of work owns the retry
        for attempt in range(6):
            try:
                return fn(*args, **kwargs)
            except OperationalError:
                if attempt == 5:
                    raise
                time.sleep(0.02 * 2**attempt)
        raise AssertionError("unreachable")

    return wrapper


class DjangoRunStore:
    def __init__(self, actor: str = "system") -> None:
        self.actor = actor

    @contextmanager
    def locked(self, run_id: str) -> Iterator[RunSnapshot]:
        # savepoint=False: inside a caller's unit of work this joins it (one commit per step).
        with transaction.atomic(savepoint=False):
            # of=("self",): lock the run row only, never the process version all its runs share.
            run = (Run.objects.select_for_update(of=("self",)).select_related("process_version")
                   .get(pk=run_id))
            outer = getattr(_held, "run", None)
            _held.run = str(run.pk)
            tasks = {
                t.key: TaskSnapshot(key=t.key, status=t.status, attempts=t.attempts,
                                    output=t.output, error=t.error)
                for t in Task.objects.filter(run_id=run.pk).only(
                    "key", "status", "attempts", "output", "error")
            }
            try:
                yield RunSnapshot(
                    run_id=str(run.pk),
                    status=run.status,
                    plan=plan_for(run.process_version),
                    input=run.input,
                    hydration_limit=run.process_version.hydration_limit,
                    tasks=tasks,
                    cancel_requested=run.cancel_requested,
                )
            finally:
                _held.run = outer

    @_retrying
    def record(self, run_id: str, kind: str, data: dict[str, Any], *, actor: str = "") -> None:
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            ledger.append(uuid.UUID(str(run_id)), kind, data, actor=actor or self.actor)

    @_retrying
    def set_run_status(
        self, run_id: str, status: str, *, result: Any = None, error: str = "", reason: str = ""
    ) -> None:
        with transaction.atomic(savepoint=False):
            run = Run.objects.select_for_update(of=("self",)).only("status").get(pk=run_id)
            old = run.status
            new = check_run_transition(old, status)
            fields: dict[str, Any] = {"status": new.value, "updated_at": timezone.now()}
            if result is not None:
                fields["result"] = result
            if error:
                fields["error"] = error
            if new in RUN_TERMINAL:
                fields["finished_at"] = timezone.now()
            Run.objects.filter(pk=run_id).update(**fields)
            data: dict[str, Any] = {"from": old, "to": new.value}
            if reason:
                data["reason"] = reason
            if error:
                data["error"] = error
            if result is not None:
                data["result"] = result
            ledger.append(run.pk, "run.state", data, actor=self.actor)

    @_retrying
    def release_task(self, run_id: str, key: str) -> None:
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            updated = Task.objects.filter(run_id=run_id, key=key, status=TaskStatus.PENDING).update(
                status=TaskStatus.QUEUED
            )
            if not updated:
                check_task_transition(self._status(run_id, key), TaskStatus.QUEUED)
            ledger.append(uuid.UUID(str(run_id)), "task.queued", {"task": key}, actor=self.actor)

    @_retrying
    def claim_task(self, run_id: str, key: str) -> TaskSnapshot | None:
        """queued → running under a new lease; or take over a running task whose lease has
        expired (its worker was lost: what it had reserved is released, and it counts as a
        crash). None when the task is not ours to run (done, or another worker holds it)."""
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)  # the run lock makes this read-then-write a claim
            row = (Task.objects.filter(run_id=run_id, key=key)
                   .values_list("status", "lease_owner", "lease_expires_at", "attempts",
                                "crashes").first())
            if row is None:
                return None
            status, owner, expires, attempts, crashes = row
            now = timezone.now()
            takeover = status == TaskStatus.RUNNING and (expires is None or expires < now)
            if status != TaskStatus.QUEUED and not takeover:
                return None
            token = leases.new_token()
            if takeover:
                crashes += 1
                held = governance.release_held(run_id, key)
                ledger.append(uuid.UUID(str(run_id)), "task.recovered", {
                    "task": key, "reason": "the worker running it was lost (lease expired)",
                    "lost_lease": owner, "crashes": crashes,
                    "released": {"tokens": held.tokens, "cost": str(held.cost),
                                 "steps": held.steps}}, actor=self.actor)
            attempts += 1
            Task.objects.filter(run_id=run_id, key=key).update(
                status=TaskStatus.RUNNING, attempts=attempts, crashes=crashes, started_at=now,
                lease_owner=token, lease_expires_at=now + leases.duration())
            ledger.append(uuid.UUID(str(run_id)), "task.started",
                          {"task": key, "attempt": attempts}, actor=self.actor)
            return TaskSnapshot(key=key, status=TaskStatus.RUNNING, attempts=attempts,
                                lease=token, crashes=crashes)

    def task_inputs(
        self, run_id: str, key: str
    ) -> tuple[TaskSpec, Mapping[str, Any], dict[str, Any]]:
        run = Run.objects.select_related("process_version").only(
            "input", "process_version__plan").get(pk=run_id)
        spec = plan_for(run.process_version).by_key()[key]
        outputs: dict[str, Any] = {}
        if spec.depends_on:
            outputs = dict(
                Task.objects.filter(run_id=run_id, key__in=spec.depends_on).values_list(
                    "key", "output")
            )
        return spec, run.input, outputs

    @_retrying
    def finish_task(
        self,
        run_id: str,
        key: str,
        status: str,
        *,
        output: Any = None,
        error: str = "",
        events: list[tuple[str, dict[str, Any]]] | None = None,
        escalation: Mapping[str, Any] | None = None,
        lease: str = "",
    ) -> None:
        chain = uuid.UUID(str(run_id))
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            old, owner = Task.objects.filter(run_id=run_id, key=key).values_list(
                "status", "lease_owner").get()
            if lease and (old != TaskStatus.RUNNING or owner != lease):
                raise LeaseLost(f"task {key} of run {run_id} was taken over by another worker")
            new = check_task_transition(old, status)
            usage = {"tokens_in": 0, "tokens_out": 0, "cost": Decimal("0"), "tool_calls": 0}
            for kind, data in events or ():
                ledger.append(chain, kind, data, actor=data.get("actor", self.actor))
                if kind.startswith("tool."):
                    usage["tool_calls"] += 1
                usage["tokens_in"] += int(data.get("tokens_in", 0))
                usage["tokens_out"] += int(data.get("tokens_out", 0))
                usage["cost"] += Decimal(str(data.get("cost", "0")))
            Task.objects.filter(run_id=run_id, key=key).update(
                status=new.value, output=output, error=error, finished_at=timezone.now(),
                lease_owner="", lease_expires_at=None,
            )
            if old == TaskStatus.RUNNING and events:
                Run.objects.filter(pk=run_id).update(
                    steps=F("steps") + 1,
                    tool_calls=F("tool_calls") + usage["tool_calls"],
                    tokens_in=F("tokens_in") + usage["tokens_in"],
                    tokens_out=F("tokens_out") + usage["tokens_out"],
                    cost=F("cost") + usage["cost"],
                    updated_at=timezone.now(),
                )
            data: dict[str, Any] = {"task": key}
            if new == TaskStatus.SUCCEEDED:
                data["output"] = output
            if error:
                data["error"] = error
            ledger.append(chain, f"task.{new.value}", data, actor=self.actor)
            if new == TaskStatus.WAITING and escalation:
                governance.open_escalation(run_id=str(run_id), task_key=key,
                                           escalation=escalation, actor=self.actor)

    @_retrying
    def requeue_task(self, run_id: str, key: str, *, reason: str) -> None:
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            old = self._status(run_id, key)
            check_task_transition(old, TaskStatus.QUEUED)
            Task.objects.filter(run_id=run_id, key=key).update(
                status=TaskStatus.QUEUED, lease_owner="", lease_expires_at=None)
            ledger.append(uuid.UUID(str(run_id)), "task.requeued", {"task": key, "reason": reason},
                          actor=self.actor)

    @_retrying
    def record_step(self, run_id: str, kind: str, data: dict[str, Any], *, usage: Any,
                    reserved: Any = None) -> None:
        """Checkpoint one model or tool call and settle its reservation, atomically."""
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            ledger.append(uuid.UUID(str(run_id)), kind, data,
                          actor=data.get("actor", self.actor))
            if reserved is not None or not usage.is_zero():
                governance.settle(run_id, data.get("task", ""), reserved, usage)

    def journal(self, run_id: str, key: str) -> Journal:
        """What the ledger holds for a task's agent loop, for a resume that calls nothing twice."""
        journal = Journal()
        events = Event.objects.filter(
            chain=run_id, kind__in=JOURNAL_KINDS, data__task=key
        ).order_by("seq").values_list("kind", "data")
        for kind, data in events:
            if kind == "model.called":
                journal.turns[int(data["step"])] = data["response"]
            elif kind == "tool.intent":
                journal.intents.add(data["idempotency_key"])
            elif kind == "tool.called":
                journal.results[data["idempotency_key"]] = {"result": data["result"]}
            elif kind == "tool.failed":
                journal.results[data["idempotency_key"]] = {"error": data["error"]}
        return journal

    def _status(self, run_id: str, key: str) -> str:
        # Task rows are written only under their run's lock, so a plain read is current.
        return Task.objects.filter(run_id=run_id, key=key).values_list("status", flat=True).get()


def is_terminal(status: str) -> bool:
    return RunStatus(status) in RUN_TERMINAL
