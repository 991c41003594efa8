"""What a worker does with a message: each step of a run is one transaction.

A step takes the run's lock, applies what happened (a task's outcome, a scheduling pass), puts
the tasks that became ready in the queue, claims one of them for this worker and writes an
outbox message for each of the others, and commits. The worker then runs the task it claimed
straight away: a chain of tasks moves without a round trip through the broker, and every
message a step implies is durable the moment the step is.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

import logcontext
from audit import ledger
from orchestration import leases, outbox, planning
from orchestration.engine import runner, tracing
from orchestration.engine.errors import LeaseLost
from orchestration.engine.runner import AdvanceResult, Outcome
from orchestration.engine.states import RunStatus, TaskStatus
from orchestration.engine.store import TaskSnapshot
from orchestration.executors import executors
from orchestration.models import Run
from orchestration.retry import DB_ERRORS, persist
from orchestration.sql import deferred_writes
from orchestration.store import DjangoRunStore

log = logging.getLogger("switchboard.work")
# Statuses a scheduling step leaves only a planned run in: it has no accepted plan yet.
PLANNING = (RunStatus.PENDING, RunStatus.PLANNING)


def _dispatch(run_id: str, result: AdvanceResult) -> None:
    for key in result.released:
        outbox.emit("execute", run_id, key=key)


def advance(run_id: str, message_id: int | None = None) -> None:
    """Schedule a run: release what is ready, run one of those tasks here."""
    store = DjangoRunStore()
    token = leases.new_token()

    def step() -> AdvanceResult | TaskSnapshot | None:
        with transaction.atomic(), deferred_writes(commit=True) as write, ledger.batched(write):
            if not outbox.consume(message_id):
                # Done already: by a twin delivery, or by this very step, whose commit went
                # through although the connection failed before it said so.
                return store.claimed_by(run_id, token) if message_id is not None else None
            store.next_lease = token
            try:
                result = runner.advance(store, run_id, take=1)
            except Run.DoesNotExist:
                return None
            _dispatch(run_id, result)
            return result

    result = persist(step, what=f"advance {run_id}")
    if isinstance(result, AdvanceResult) and result.status in PLANNING:
        planning.plan_run(run_id)  # a planned run without a plan: its planner's turns
        return
    if isinstance(result, TaskSnapshot):
        run_chain(store, run_id, result)
    elif result is not None and result.claimed:
        run_chain(store, run_id, result.claimed[0])


def execute(run_id: str, key: str, message_id: int | None = None) -> None:
    """Claim a released task (or take over one whose worker was lost) and run it."""
    store = DjangoRunStore()
    token = leases.new_token()

    def step() -> TaskSnapshot | None:
        with transaction.atomic(), deferred_writes(commit=True) as write, ledger.batched(write):
            if not outbox.consume(message_id):
                # Done already: by a twin delivery, or by this very step, whose commit went
                # through although the connection failed before it said so.
                return store.claimed_by(run_id, token) if message_id is not None else None
            store.next_lease = token
            return store.claim_task(run_id, key)  # None for a run or task that is gone

    claim = persist(step, what=f"claim {run_id}/{key}")
    if claim is not None:
        run_chain(store, run_id, claim)


def run_chain(store: DjangoRunStore, run_id: str, claim: TaskSnapshot | None) -> None:
    """Run a claimed task, record it with the next scheduling step, and go on with the task
    that step claimed, until a step leaves nothing for this worker."""
    while claim is not None:
        leases.hold(run_id, claim.key, claim.lease)
        context = logcontext.bound(run_id=run_id, task_key=claim.key)
        context.__enter__()
        try:
            outcome = persist(lambda c=claim: _run(store, run_id, c),
                               what=f"run {run_id}/{claim.key}")

            token = leases.new_token()

            def step(c: TaskSnapshot = claim, o: Outcome = outcome,
                     t: str = token) -> AdvanceResult:
                with (transaction.atomic(), deferred_writes(commit=True) as write,
                      ledger.batched(write)):
                    store.next_lease = t
                    result = runner.finish(store, run_id, c.key, o, lease=c.lease, take=1)
                    _dispatch(run_id, result)
                    return result

            try:
                result = persist(step, what=f"finish {run_id}/{claim.key}")
            except LeaseLost:
                # Either another worker took the task over (drop the outcome), or this step
                # committed before the connection failed and its retry found the task done:
                # then the task it claimed holds our token and is ours to run.
                successor = store.claimed_by(run_id, token)
                if successor is None:
                    raise
                result = AdvanceResult([], "", [successor])
            log.info("task %s of run %s: %s", claim.key, run_id, outcome.status)
        except LeaseLost as exc:
            log.warning("%s: the outcome is dropped", exc)
            return
        finally:
            leases.drop(run_id, claim.key)
            context.__exit__(None, None, None)
        claim = result.claimed[0] if result.claimed else None


def _process_slug(run_id: str) -> str:
    """The run's process, for the task's span; looked up only while tracing is on."""
    if not tracing.enabled():
        return ""
    slug = (Run.objects.filter(pk=run_id)
            .values_list("process_version__process__slug", flat=True).first())
    return slug or ""


def _run(store: DjangoRunStore, run_id: str, claim: TaskSnapshot) -> Outcome:
    try:
        return runner.run_claimed(store, run_id, claim, executors(),
                                  poison_after=settings.SWITCHBOARD_POISON_CRASHES,
                                  process=_process_slug(run_id))
    except (LeaseLost, *DB_ERRORS):
        raise
    except Exception as exc:  # an executor's own bug: the task fails, the worker goes on
        log.exception("task %s of run %s raised", claim.key, run_id)
        return Outcome(status=TaskStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
