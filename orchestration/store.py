"""The Django implementation of the engine's RunStore: rows for state, the ledger for steps.

Every write takes the run's lock first (orchestration/run_lock.py) and goes out as plain SQL
(orchestration/sql.py); a unit of work is retried through lock conflicts
(orchestration/retry.py)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from audit import ledger
from audit.models import Event
from orchestration import budgets, governance, leases, outbox, run_lock
from orchestration.call_records import CallRecords
from orchestration.delegations import DelegationRows
from orchestration.engine.errors import LeaseLost
from orchestration.engine.gate import CHECK_KINDS, JOURNAL_KINDS, Journal
from orchestration.engine.plan import TaskSpec
from orchestration.engine.states import (
    RUN_TERMINAL,
    TASK_TERMINAL,
    RunStatus,
    TaskStatus,
    check_run_transition,
    check_task_transition,
)
from orchestration.engine.store import RunSnapshot, TaskSnapshot
from orchestration.models import Task
from orchestration.plans import plan_of_run
from orchestration.retry import retrying
from orchestration.run_lock import TASK_SQL, TASKS_SQL, Locked, held_run, lock_run
from orchestration.sql import (
    dt_param,
    execute,
    fetch_one,
    flush_writes,
    json_param,
    loads,
    uuid_param,
    write,
)


class DjangoRunStore(DelegationRows, CallRecords):
    def __init__(self, actor: str = "system") -> None:
        self.actor = actor
        # The lease token the next release_and_claim gives its task, when the caller chose it
        # beforehand: a step retried after an unclear commit can then find what it claimed.
        self.next_lease = ""
        CallRecords.__init__(self)

    def _token(self) -> str:
        token, self.next_lease = self.next_lease or leases.new_token(), ""
        return token

    def claimed_by(self, run_id: str, token: str) -> TaskSnapshot | None:
        """The running task that holds ``token``, if a committed step claimed it."""
        row = (Task.objects.filter(run_id=run_id, lease_owner=token, status=TaskStatus.RUNNING)
               .values_list("key", "attempts", "crashes").first())
        if row is None:
            return None
        return TaskSnapshot(key=row[0], status=TaskStatus.RUNNING, attempts=row[1],
                            lease=token, crashes=row[2])

    def locked(self, run_id: str) -> AbstractContextManager[RunSnapshot]:
        return run_lock.locked(run_id)

    @retrying
    def record(self, run_id: str, kind: str, data: dict[str, Any], *, actor: str = "",
               lease: str = "") -> None:
        with transaction.atomic(savepoint=False):
            lock_run(run_id)
            if lease:
                self._hold(run_id, data.get("task", ""), lease)
            ledger.append(uuid.UUID(str(run_id)), kind, data, actor=actor or self.actor)

    @staticmethod
    def _hold(run_id: str, key: str, lease: str) -> None:
        """Under the run lock: refuse a checkpoint from a worker whose lease was taken over
        (it was thought lost, and another worker now runs the task)."""
        row = fetch_one(TASK_SQL, [uuid_param(run_id), key])
        if row is None or row[0] != TaskStatus.RUNNING or row[1] != lease:
            raise LeaseLost(f"task {key} of run {run_id} was taken over by another worker")

    def outcome_decision(self, run_id: str, call_key: str) -> str:
        """What people decided about a call whose outcome was unknown: "rerun" once a
        request about it was approved, "" otherwise (a rejection fails the task)."""
        from approvals.models import ApprovalRequest, Reason

        status = (ApprovalRequest.objects.filter(run_id=run_id, call_key=call_key,
                                                 reason=Reason.UNKNOWN_OUTCOME)
                  .order_by("-created_at").values_list("status", flat=True).first())
        approved = (ApprovalRequest.Status.APPROVED, ApprovalRequest.Status.EDITED)
        return "rerun" if status in approved else ""

    @retrying
    def set_run_status(
        self, run_id: str, status: str, *, result: Any = None, error: str = "", reason: str = ""
    ) -> None:
        with transaction.atomic(savepoint=False):
            lock_run(run_id)
            state = held_run(run_id)
            old = state.status if state is not None else fetch_one(
                "SELECT status FROM orchestration_run WHERE id = %s", [uuid_param(run_id)])[0]
            new = check_run_transition(old, status)
            if state is not None:
                state.status = new.value
            now = timezone.now()
            sets, params = ["status = %s", "updated_at = %s"], [new.value, dt_param(now)]
            if result is not None:
                sets.append("result = %s")
                params.append(json_param(result))
            if error:
                sets.append("error = %s")
                params.append(error)
            if new in RUN_TERMINAL:
                sets.append("finished_at = %s")
                params.append(dt_param(now))
            write(f"UPDATE orchestration_run SET {', '.join(sets)} WHERE id = %s",
                  [*params, uuid_param(run_id)])
            data: dict[str, Any] = {"from": old, "to": new.value}
            if reason:
                data["reason"] = reason
            if error:
                data["error"] = error
            if result is not None:
                data["result"] = result
            ledger.append(uuid.UUID(str(run_id)), "run.state", data, actor=self.actor)

    @retrying
    def release_task(self, run_id: str, key: str) -> None:
        with transaction.atomic(savepoint=False):
            lock_run(run_id)
            state = held_run(run_id)
            if state is not None and key in state.rows:
                check_task_transition(state.rows[key][0], TaskStatus.QUEUED)
                write('UPDATE orchestration_task SET status = %s'
                      ' WHERE run_id = %s AND "key" = %s',
                      [TaskStatus.QUEUED.value, uuid_param(run_id), key])
                state.rows[key][0] = TaskStatus.QUEUED.value
            else:
                updated = execute('UPDATE orchestration_task SET status = %s'
                                  ' WHERE run_id = %s AND "key" = %s AND status = %s',
                                  [TaskStatus.QUEUED.value, uuid_param(run_id), key,
                                   TaskStatus.PENDING.value])
                if not updated:
                    check_task_transition(self._status(run_id, key), TaskStatus.QUEUED)
            ledger.append(uuid.UUID(str(run_id)), "task.queued", {"task": key}, actor=self.actor)

    def _cancel_orphan(self, run_id: str, key: str, state: Locked | None) -> bool:
        """A lost worker's task in a run that ended or is being cancelled meanwhile is not run
        again: what it held is released and the task is cancelled."""
        if state is not None:
            status, cancel = state.status, state.snapshot.cancel_requested
        else:
            status, cancel = fetch_one("SELECT status, cancel_requested FROM orchestration_run"
                                       " WHERE id = %s", [uuid_param(run_id)])
        ended = RunStatus(status) in RUN_TERMINAL
        if not ended and not cancel:
            return False
        flush_writes()
        budgets.release_held(run_id, key)
        error = "the run ended while the worker running this task was lost"
        execute("UPDATE orchestration_task SET status = %s, error = %s, finished_at = %s,"
                " lease_owner = '', lease_expires_at = NULL WHERE run_id = %s AND \"key\" = %s",
                [TaskStatus.CANCELLED.value, error, dt_param(timezone.now()),
                 uuid_param(run_id), key])
        if state is not None and key in state.rows:
            state.rows[key][0] = TaskStatus.CANCELLED.value
        ledger.append(uuid.UUID(str(run_id)), "task.cancelled", {"task": key, "error": error},
                      actor=self.actor)
        if not ended:
            outbox.emit("advance", run_id)  # the cancellation can finish now
        return True

    def release_and_claim(self, run_id: str, key: str) -> TaskSnapshot:
        """pending → queued → running in one write, for a task the scheduling worker runs
        itself (under the run lock, inside its step)."""
        state = held_run(run_id)
        if state is None:
            raise RuntimeError("release_and_claim runs inside locked()")
        row = state.rows[key]
        check_task_transition(row[0], TaskStatus.QUEUED)
        now = timezone.now()
        token = self._token()
        attempts = row[3] + 1
        write('UPDATE orchestration_task SET status = %s, attempts = %s, started_at = %s,'
              ' lease_owner = %s, lease_expires_at = %s WHERE run_id = %s AND "key" = %s',
              [TaskStatus.RUNNING.value, attempts, dt_param(now), token,
               dt_param(now + leases.duration()), uuid_param(run_id), key])
        chain = uuid.UUID(str(run_id))
        ledger.append(chain, "task.queued", {"task": key}, actor=self.actor)
        ledger.append(chain, "task.started", {"task": key, "attempt": attempts},
                      actor=self.actor)
        state.rows[key] = [TaskStatus.RUNNING.value, token, now + leases.duration(), attempts,
                           row[4]]
        run_lock.prefetch(state, run_id, key)
        return TaskSnapshot(key=key, status=TaskStatus.RUNNING, attempts=attempts,
                            lease=token, crashes=row[4])

    @retrying
    def claim_task(self, run_id: str, key: str) -> TaskSnapshot | None:
        """queued → running under a new lease; or take over a running task whose lease has
        expired (its worker was lost: what it had reserved is released, and it counts as a
        crash). None when the task is not ours to run (done, or another worker holds it)."""
        with transaction.atomic(savepoint=False):
            lock_run(run_id)  # the run lock makes this read-then-write a claim
            state = held_run(run_id)
            row = state.rows.get(key) if state is not None else fetch_one(
                TASK_SQL, [uuid_param(run_id), key])
            if row is None:
                return None
            status, owner, expires, attempts, crashes = row
            if isinstance(expires, str):  # SQLite
                expires = datetime.fromisoformat(expires)
            if expires is not None and timezone.is_naive(expires):
                expires = timezone.make_aware(expires, UTC)
            now = timezone.now()
            takeover = status == TaskStatus.RUNNING and (expires is None or expires < now)
            if status != TaskStatus.QUEUED and not takeover:
                return None
            if takeover and self._cancel_orphan(run_id, key, state):
                return None
            token = self._token()
            if takeover:
                crashes += 1
                flush_writes()
                held = budgets.release_held(run_id, key)
                ledger.append(uuid.UUID(str(run_id)), "task.recovered", {
                    "task": key, "reason": "the worker running it was lost (lease expired)",
                    "lost_lease": owner, "crashes": crashes,
                    "released": {"tokens": held.tokens, "cost": str(held.cost),
                                 "steps": held.steps}}, actor=self.actor)
            attempts += 1
            write('UPDATE orchestration_task SET status = %s, attempts = %s, crashes = %s,'
                  ' started_at = %s, lease_owner = %s, lease_expires_at = %s'
                  ' WHERE run_id = %s AND "key" = %s',
                  [TaskStatus.RUNNING.value, attempts, crashes, dt_param(now), token,
                   dt_param(now + leases.duration()), uuid_param(run_id), key])
            ledger.append(uuid.UUID(str(run_id)), "task.started",
                          {"task": key, "attempt": attempts}, actor=self.actor)
            if state is not None:
                state.rows[key] = [TaskStatus.RUNNING.value, token, now + leases.duration(),
                                   attempts, crashes]
                run_lock.prefetch(state, run_id, key)
            return TaskSnapshot(key=key, status=TaskStatus.RUNNING, attempts=attempts,
                                lease=token, crashes=crashes)

    def task_inputs(
        self, run_id: str, key: str
    ) -> tuple[TaskSpec, Mapping[str, Any], dict[str, Any]]:
        prefetched = run_lock.take_prefetched(run_id, key)
        if prefetched is not None:
            plan, run_input = prefetched[0], prefetched[1]
        else:
            run_input, version_id, plan_version = fetch_one(
                "SELECT input, process_version_id, plan_version FROM orchestration_run"
                " WHERE id = %s", [uuid_param(run_id)])
            plan = plan_of_run(run_id, version_id, plan_version)
        spec = plan.by_key()[key]
        outputs: dict[str, Any] = {}
        if prefetched is not None and prefetched[2] is not None:
            outputs = prefetched[2]
        elif spec.depends_on:
            with connection.cursor() as cursor:
                cursor.execute(TASKS_SQL, [uuid_param(run_id)])
                outputs = {row[0]: loads(row[3]) for row in cursor.fetchall()
                           if row[0] in spec.depends_on}
        return spec, copy.deepcopy(loads(run_input)), outputs

    @retrying
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
            lock_run(run_id)
            state = held_run(run_id)
            row = state.rows.get(key) if state is not None else None
            old, owner = row[:2] if row is not None else fetch_one(
                TASK_SQL, [uuid_param(run_id), key])[:2]
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
            now = dt_param(timezone.now())
            write('UPDATE orchestration_task SET status = %s, output = %s, error = %s,'
                  " finished_at = %s, lease_owner = '', lease_expires_at = NULL"
                  ' WHERE run_id = %s AND "key" = %s',
                  [new.value, json_param(output), error, now, uuid_param(run_id), key])
            if old == TaskStatus.RUNNING and events:
                write("UPDATE orchestration_run SET steps = steps + 1,"
                      " tool_calls = tool_calls + %s, tokens_in = tokens_in + %s,"
                      " tokens_out = tokens_out + %s, cost = cost + %s, updated_at = %s"
                      " WHERE id = %s",
                      [usage["tool_calls"], usage["tokens_in"], usage["tokens_out"],
                       connection.ops.adapt_decimalfield_value(usage["cost"], 14, 6), now,
                       uuid_param(run_id)])
            data: dict[str, Any] = {"task": key}
            if new == TaskStatus.SUCCEEDED:
                data["output"] = output
            if error:
                data["error"] = error
            ledger.append(chain, f"task.{new.value}", data, actor=self.actor)
            if row is not None:
                row[0], row[1], row[2] = new.value, "", None
            if new in TASK_TERMINAL:
                self._return_unspent(run_id, key, state)
            if new == TaskStatus.WAITING and escalation:
                flush_writes()  # the escalation reads the rows this step changed
                governance.open_escalation(run_id=str(run_id), task_key=key,
                                           escalation=escalation, actor=self.actor)

    @retrying
    def requeue_task(self, run_id: str, key: str, *, reason: str) -> None:
        with transaction.atomic(savepoint=False):
            lock_run(run_id)
            state = held_run(run_id)
            if state is not None and key in state.rows:  # inside a scheduling step
                check_task_transition(state.rows[key][0], TaskStatus.QUEUED)
                write("UPDATE orchestration_task SET status = %s, lease_owner = '',"
                      ' lease_expires_at = NULL WHERE run_id = %s AND "key" = %s',
                      [TaskStatus.QUEUED.value, uuid_param(run_id), key])
                state.rows[key][:3] = [TaskStatus.QUEUED.value, "", None]
            else:
                old = self._status(run_id, key)
                check_task_transition(old, TaskStatus.QUEUED)
                Task.objects.filter(run_id=run_id, key=key).update(
                    status=TaskStatus.QUEUED, lease_owner="", lease_expires_at=None)
            ledger.append(uuid.UUID(str(run_id)), "task.requeued", {"task": key, "reason": reason},
                          actor=self.actor)

    def journal(self, run_id: str, key: str) -> Journal:
        """What the ledger holds for a task's agent loop, for a resume that calls nothing twice."""
        return Journal.fold(Event.objects.filter(
            chain=run_id, kind__in=JOURNAL_KINDS + CHECK_KINDS, data__task=key
        ).order_by("seq").values_list("kind", "data"))

    def _status(self, run_id: str, key: str) -> str:
        # Task rows are written only under their run's lock, so a plain read is current.
        return Task.objects.filter(run_id=run_id, key=key).values_list("status", flat=True).get()
