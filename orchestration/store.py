"""The Django implementation of the engine's RunStore: rows for state, the ledger for steps."""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    transaction,
)
from django.utils import timezone

from audit import ledger
from audit.models import Event
from orchestration import governance, leases, metrics, outbox
from orchestration.engine.errors import LeaseLost
from orchestration.engine.gate import JOURNAL_KINDS, Journal
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

log = logging.getLogger("switchboard.work")
_plans: dict[uuid.UUID, Plan] = {}
_plans_lock = threading.Lock()


def plan_for_id(version_id: Any) -> Plan:
    key = version_id if isinstance(version_id, uuid.UUID) else uuid.UUID(str(version_id))
    plan = _plans.get(key)
    if plan is None:
        plan = plan_for(ProcessVersion.objects.only("plan").get(pk=key))
    return plan


def plan_for(version: ProcessVersion) -> Plan:
    """Process versions are immutable, so their parsed plans can be cached by id."""
    plan = _plans.get(version.pk)
    if plan is None:
        plan = parse_plan(version.plan)
        with _plans_lock:
            _plans[version.pk] = plan
    return plan


# The run whose row this thread's open transaction holds (see DjangoRunStore.locked), with its
# task rows as read under that lock: writes under the lock keep them current, so a step reads
# each row once.
_held = threading.local()
# Inputs of tasks claimed under a run lock, read from that lock's snapshot: the claimer runs the
# task right after commit and need not read them again.
_prefetched: dict[tuple[str, str], tuple[Any, Any, dict[str, Any]]] = {}


def _lock_run(run_id: str) -> None:
    """Every write to a run's state takes the run's row lock first: one lock order, no deadlocks,
    and one writer per run at a time (so its ledger sequence is written in order).

    The lock order, everywhere: run row → task rows → chain heads. Nothing on the hot path
    locks a row that many runs share (process versions, tools, agents, the global chain)."""
    if not connection.features.has_select_for_update:
        return  # SQLite: BEGIN IMMEDIATE (settings) already makes every writer go one at a time
    if _state(run_id) is not None:
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM orchestration_run WHERE id = %s FOR UPDATE",
                       [Run._meta.pk.get_db_prep_value(uuid.UUID(str(run_id)), connection)])


DB_ERRORS = (OperationalError, InterfaceError)


def persist[T](fn: Callable[[], T], *, what: str) -> T:
    """Retry a unit of work through lock conflicts and a database that is briefly away (a
    restart, a failover): the work in hand is kept, not thrown away, for up to
    ``SWITCHBOARD_DB_RETRY_SECONDS``."""
    deadline = time.monotonic() + settings.SWITCHBOARD_DB_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return fn()
        except DB_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database error, retrying in %.2f s: %s", what, delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            close_old_connections()
            if not connection.in_atomic_block:
                connection.close()


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


class _Locked:
    __slots__ = ("run", "status", "version", "snapshot", "rows")

    def __init__(self, run: str, status: str, version: Any, snapshot: RunSnapshot,
                 rows: dict[str, list[Any]]) -> None:
        self.run, self.status, self.version, self.snapshot, self.rows = (
            run, status, version, snapshot, rows)


def _state(run_id: Any) -> _Locked | None:
    state = getattr(_held, "state", None)
    if state is not None and state.run == str(run_id) and connection.in_atomic_block:
        return state
    return None


def _uuid(value: Any) -> Any:
    value = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    return Run._meta.pk.get_db_prep_value(value, connection)


def _dt(value: Any) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def _json(value: Any) -> Any:
    return Task._meta.get_field("output").get_db_prep_save(value, connection)


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _one(sql: str, params: list[Any]) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _exec(sql: str, params: list[Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


_writes = threading.local()


@contextmanager
def deferred_writes() -> Iterator[Callable[[str, list[Any]], None]]:
    """Collect a step's writes (whose results nothing reads) and send them together when the
    block ends: on PostgreSQL one round trip for the whole step, statements in order. Use it
    inside the step's transaction; if the block raises, nothing is sent. Reads of rows the
    buffer would change must flush first (``flush_writes``)."""
    if getattr(_writes, "buffer", None) is not None:
        yield _write  # the outer block sends
        return
    _writes.buffer = []
    try:
        yield _write
        flush_writes()
    finally:
        _writes.buffer = None


def _write(sql: str, params: list[Any]) -> None:
    buffer = getattr(_writes, "buffer", None)
    if buffer is None:
        _exec(sql, params)
    else:
        buffer.append((sql, params))


def flush_writes() -> None:
    buffer = getattr(_writes, "buffer", None)
    if not buffer:
        return
    statements = list(buffer)
    buffer.clear()
    if connection.vendor == "postgresql":
        # Client-side binding (Django's default with psycopg 3) sends this as one simple query.
        _exec("; ".join(sql for sql, _ in statements),
              [value for _, params in statements for value in params])
        return
    for sql, params in statements:
        _exec(sql, params)


# The hot path of every task transition, in plain SQL (the ORM costs about a millisecond of
# Python per statement; a whole step is a dozen statements).
# The run (locked) and its tasks in one round trip: one row per task.
# The run and its chain head, locked together. The task rows are read by a statement of their
# own, after the lock is held: under READ COMMITTED a row joined into a locking query but not
# locked itself comes from the snapshot taken before the query waited for the lock, so a step
# that waited behind another would see the tasks as they were before that step committed.
_LOCK_RUN_SQL = (
    "SELECT r.status, r.input, r.cancel_requested, r.process_version_id, v.hydration_limit,"
    " h.seq, h.head_hash"
    " FROM orchestration_run r JOIN orchestration_processversion v ON v.id = r.process_version_id"
    " JOIN audit_chainhead h ON h.chain = r.id"
    " WHERE r.id = %s{lock}")
# Every run has a chain head (run_create writes it); this is for one that does not.
_LOCK_BARE_RUN_SQL = (
    "SELECT r.status, r.input, r.cancel_requested, r.process_version_id, v.hydration_limit,"
    " NULL, NULL"
    " FROM orchestration_run r JOIN orchestration_processversion v ON v.id = r.process_version_id"
    " WHERE r.id = %s{lock}")
_TASKS_SQL = ('SELECT "key", status, attempts, output, error, lease_owner, lease_expires_at,'
              " crashes FROM orchestration_task WHERE run_id = %s")
_TASK_SQL = ('SELECT status, lease_owner, lease_expires_at, attempts, crashes'
             ' FROM orchestration_task WHERE run_id = %s AND "key" = %s')


class DjangoRunStore:
    def __init__(self, actor: str = "system") -> None:
        self.actor = actor
        # The lease token the next release_and_claim gives its task, when the caller chose it
        # beforehand: a step retried after an unclear commit can then find what it claimed.
        self.next_lease = ""

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

    @contextmanager
    def locked(self, run_id: str) -> Iterator[RunSnapshot]:
        # savepoint=False: inside a caller's unit of work this joins it (one commit per step).
        with transaction.atomic(savepoint=False):
            # FOR UPDATE OF r: the run row only, never the process version all its runs share.
            # Lock order: the run row, then its chain head (locked here so the step's appends
            # need not read it again). Task rows are written only under the run's lock.
            lock = (" FOR UPDATE OF r, h" if connection.features.has_select_for_update
                    else "")
            with connection.cursor() as cursor:
                cursor.execute(_LOCK_RUN_SQL.format(lock=lock), [_uuid(run_id)])
                row = cursor.fetchone()
                if row is None:
                    cursor.execute(_LOCK_BARE_RUN_SQL.format(lock=" FOR UPDATE OF r" if lock
                                                             else ""), [_uuid(run_id)])
                    row = cursor.fetchone()
                if row is None:
                    raise Run.DoesNotExist(f"no run {run_id}")
                cursor.execute(_TASKS_SQL, [_uuid(run_id)])
                fetched = cursor.fetchall()
            status, run_input, cancel_requested, version_id, hydration_limit = row[:5]
            head_seq, head_hash = row[5:7]
            if head_seq is not None:
                ledger.prime_head(uuid.UUID(str(run_id)), head_seq, head_hash)
            tasks = {row[0]: TaskSnapshot(key=row[0], status=row[1], attempts=row[2],
                                          output=_loads(row[3]), error=row[4])
                     for row in fetched}
            snapshot = RunSnapshot(
                run_id=str(run_id),
                status=status,
                plan=plan_for_id(version_id),
                input=_loads(run_input),
                hydration_limit=hydration_limit,
                tasks=tasks,
                cancel_requested=bool(cancel_requested),
            )
            outer = getattr(_held, "state", None)
            _held.state = _Locked(str(run_id), status, version_id, snapshot, {
                row[0]: [row[1], row[5], row[6], row[2], row[7]] for row in fetched})
            try:
                yield snapshot
            finally:
                _held.state = outer

    @_retrying
    def record(self, run_id: str, kind: str, data: dict[str, Any], *, actor: str = "",
               lease: str = "") -> None:
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            if lease:
                self._hold(run_id, data.get("task", ""), lease)
            ledger.append(uuid.UUID(str(run_id)), kind, data, actor=actor or self.actor)

    @staticmethod
    def _hold(run_id: str, key: str, lease: str) -> None:
        """Under the run lock: refuse a checkpoint from a worker whose lease was taken over
        (it was thought lost, and another worker now runs the task)."""
        row = _one(_TASK_SQL, [_uuid(run_id), key])
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

    @_retrying
    def set_run_status(
        self, run_id: str, status: str, *, result: Any = None, error: str = "", reason: str = ""
    ) -> None:
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            state = _state(run_id)
            old = state.status if state is not None else _one(
                "SELECT status FROM orchestration_run WHERE id = %s", [_uuid(run_id)])[0]
            new = check_run_transition(old, status)
            if state is not None:
                state.status = new.value
            now = timezone.now()
            sets, params = ["status = %s", "updated_at = %s"], [new.value, _dt(now)]
            if result is not None:
                sets.append("result = %s")
                params.append(_json(result))
            if error:
                sets.append("error = %s")
                params.append(error)
            if new in RUN_TERMINAL:
                sets.append("finished_at = %s")
                params.append(_dt(now))
            _write(f"UPDATE orchestration_run SET {', '.join(sets)} WHERE id = %s",
                   [*params, _uuid(run_id)])
            data: dict[str, Any] = {"from": old, "to": new.value}
            if reason:
                data["reason"] = reason
            if error:
                data["error"] = error
            if result is not None:
                data["result"] = result
            ledger.append(uuid.UUID(str(run_id)), "run.state", data, actor=self.actor)

    @_retrying
    def release_task(self, run_id: str, key: str) -> None:
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            state = _state(run_id)
            if state is not None and key in state.rows:
                check_task_transition(state.rows[key][0], TaskStatus.QUEUED)
                _write('UPDATE orchestration_task SET status = %s'
                       ' WHERE run_id = %s AND "key" = %s',
                       [TaskStatus.QUEUED.value, _uuid(run_id), key])
                state.rows[key][0] = TaskStatus.QUEUED.value
            else:
                updated = _exec('UPDATE orchestration_task SET status = %s'
                                ' WHERE run_id = %s AND "key" = %s AND status = %s',
                                [TaskStatus.QUEUED.value, _uuid(run_id), key,
                                 TaskStatus.PENDING.value])
                if not updated:
                    check_task_transition(self._status(run_id, key), TaskStatus.QUEUED)
            ledger.append(uuid.UUID(str(run_id)), "task.queued", {"task": key}, actor=self.actor)

    def _cancel_orphan(self, run_id: str, key: str, state: _Locked | None) -> bool:
        """A lost worker's task in a run that ended or is being cancelled meanwhile is not run
        again: what it held is released and the task is cancelled."""
        if state is not None:
            status, cancel = state.status, state.snapshot.cancel_requested
        else:
            status, cancel = _one("SELECT status, cancel_requested FROM orchestration_run"
                                  " WHERE id = %s", [_uuid(run_id)])
        ended = RunStatus(status) in RUN_TERMINAL
        if not ended and not cancel:
            return False
        flush_writes()
        governance.release_held(run_id, key)
        error = "the run ended while the worker running this task was lost"
        _exec("UPDATE orchestration_task SET status = %s, error = %s, finished_at = %s,"
              " lease_owner = '', lease_expires_at = NULL WHERE run_id = %s AND \"key\" = %s",
              [TaskStatus.CANCELLED.value, error, _dt(timezone.now()), _uuid(run_id), key])
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
        state = _state(run_id)
        if state is None:
            raise RuntimeError("release_and_claim runs inside locked()")
        row = state.rows[key]
        check_task_transition(row[0], TaskStatus.QUEUED)
        now = timezone.now()
        token = self._token()
        attempts = row[3] + 1
        _write('UPDATE orchestration_task SET status = %s, attempts = %s, started_at = %s,'
               ' lease_owner = %s, lease_expires_at = %s WHERE run_id = %s AND "key" = %s',
              [TaskStatus.RUNNING.value, attempts, _dt(now), token,
               _dt(now + leases.duration()), _uuid(run_id), key])
        chain = uuid.UUID(str(run_id))
        ledger.append(chain, "task.queued", {"task": key}, actor=self.actor)
        ledger.append(chain, "task.started", {"task": key, "attempt": attempts},
                      actor=self.actor)
        state.rows[key] = [TaskStatus.RUNNING.value, token, now + leases.duration(), attempts,
                           row[4]]
        self._prefetch(state, run_id, key)
        return TaskSnapshot(key=key, status=TaskStatus.RUNNING, attempts=attempts,
                            lease=token, crashes=row[4])

    @staticmethod
    def _prefetch(state: _Locked, run_id: str, key: str) -> None:
        snap = state.snapshot
        deps = snap.plan.by_key()[key].depends_on
        _prefetched[(str(run_id), key)] = (state.version, snap.input, {
            dep: copy.deepcopy(snap.tasks[dep].output) for dep in deps})

    @_retrying
    def claim_task(self, run_id: str, key: str) -> TaskSnapshot | None:
        """queued → running under a new lease; or take over a running task whose lease has
        expired (its worker was lost: what it had reserved is released, and it counts as a
        crash). None when the task is not ours to run (done, or another worker holds it)."""
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)  # the run lock makes this read-then-write a claim
            state = _state(run_id)
            row = state.rows.get(key) if state is not None else _one(
                _TASK_SQL, [_uuid(run_id), key])
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
            token = leases.new_token()
            if takeover:
                crashes += 1
                flush_writes()
                held = governance.release_held(run_id, key)
                ledger.append(uuid.UUID(str(run_id)), "task.recovered", {
                    "task": key, "reason": "the worker running it was lost (lease expired)",
                    "lost_lease": owner, "crashes": crashes,
                    "released": {"tokens": held.tokens, "cost": str(held.cost),
                                 "steps": held.steps}}, actor=self.actor)
            attempts += 1
            _write('UPDATE orchestration_task SET status = %s, attempts = %s, crashes = %s,'
                   ' started_at = %s, lease_owner = %s, lease_expires_at = %s'
                   ' WHERE run_id = %s AND "key" = %s',
                  [TaskStatus.RUNNING.value, attempts, crashes, _dt(now), token,
                   _dt(now + leases.duration()), _uuid(run_id), key])
            ledger.append(uuid.UUID(str(run_id)), "task.started",
                          {"task": key, "attempt": attempts}, actor=self.actor)
            if state is not None:
                state.rows[key] = [TaskStatus.RUNNING.value, token, now + leases.duration(),
                                   attempts, crashes]
                self._prefetch(state, run_id, key)
            return TaskSnapshot(key=key, status=TaskStatus.RUNNING, attempts=attempts,
                                lease=token, crashes=crashes)

    def task_inputs(
        self, run_id: str, key: str
    ) -> tuple[TaskSpec, Mapping[str, Any], dict[str, Any]]:
        prefetched = _prefetched.pop((str(run_id), key), None)
        if prefetched is not None:
            version_id, run_input = prefetched[0], prefetched[1]
        else:
            run_input, version_id = _one(
                "SELECT input, process_version_id FROM orchestration_run WHERE id = %s",
                [_uuid(run_id)])
        spec = plan_for_id(version_id).by_key()[key]
        outputs: dict[str, Any] = {}
        if prefetched is not None and prefetched[2] is not None:
            outputs = prefetched[2]
        elif spec.depends_on:
            with connection.cursor() as cursor:
                cursor.execute(_TASKS_SQL, [_uuid(run_id)])
                outputs = {row[0]: _loads(row[3]) for row in cursor.fetchall()
                           if row[0] in spec.depends_on}
        return spec, copy.deepcopy(_loads(run_input)), outputs

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
            state = _state(run_id)
            row = state.rows.get(key) if state is not None else None
            old, owner = row[:2] if row is not None else _one(_TASK_SQL, [_uuid(run_id), key])[:2]
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
            now = _dt(timezone.now())
            _write('UPDATE orchestration_task SET status = %s, output = %s, error = %s,'
                   " finished_at = %s, lease_owner = '', lease_expires_at = NULL"
                   ' WHERE run_id = %s AND "key" = %s',
                   [new.value, _json(output), error, now, _uuid(run_id), key])
            if old == TaskStatus.RUNNING and events:
                _write("UPDATE orchestration_run SET steps = steps + 1,"
                       " tool_calls = tool_calls + %s, tokens_in = tokens_in + %s,"
                       " tokens_out = tokens_out + %s, cost = cost + %s, updated_at = %s"
                       " WHERE id = %s",
                       [usage["tool_calls"], usage["tokens_in"], usage["tokens_out"],
                        connection.ops.adapt_decimalfield_value(usage["cost"], 14, 6), now,
                        _uuid(run_id)])
            data: dict[str, Any] = {"task": key}
            if new == TaskStatus.SUCCEEDED:
                data["output"] = output
            if error:
                data["error"] = error
            ledger.append(chain, f"task.{new.value}", data, actor=self.actor)
            if row is not None:
                row[0], row[1], row[2] = new.value, "", None
            if new == TaskStatus.WAITING and escalation:
                flush_writes()  # the escalation reads the rows this step changed
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

    def record_step(self, run_id: str, kind: str, data: dict[str, Any], *, usage: Any,
                    reserved: Any = None, lease: str = "") -> None:
        """Checkpoint one model or tool call and settle its reservation, atomically. The
        call's result is in hand: a database that is briefly away is waited for (``persist``)
        rather than the call made again."""
        if transaction.get_connection().in_atomic_block:
            self._record_step(run_id, kind, data, usage=usage, reserved=reserved, lease=lease)
            return
        tries = 0

        def attempt() -> None:
            nonlocal tries
            tries += 1
            if tries > 1 and self._recorded(run_id, kind, data):
                return  # the earlier try committed; only its answer was lost
            self._record_step(run_id, kind, data, usage=usage, reserved=reserved, lease=lease)

        persist(attempt, what=f"record {kind} of {run_id}/{data.get('task', '')}")

    @staticmethod
    def _recorded(run_id: str, kind: str, data: dict[str, Any]) -> bool:
        """Whether the ledger holds this very step already (same task, kind and call key or
        model step)."""
        same = {"data__task": data.get("task", "")}
        if "idempotency_key" in data:
            same["data__idempotency_key"] = data["idempotency_key"]
        elif "step" in data:
            same["data__step"] = data["step"]
        else:
            return False
        return Event.objects.filter(chain=run_id, kind=kind, **same).exists()

    @_retrying
    def _record_step(self, run_id: str, kind: str, data: dict[str, Any], *, usage: Any,
                     reserved: Any = None, lease: str = "") -> None:
        with transaction.atomic(savepoint=False):
            _lock_run(run_id)
            if lease:
                self._hold(run_id, data.get("task", ""), lease)
            ledger.append(uuid.UUID(str(run_id)), kind, data,
                          actor=data.get("actor", self.actor))
            transaction.on_commit(functools.partial(metrics.on_step, run_id, kind, data, usage))
            if reserved is not None or not usage.is_zero():
                governance.settle(run_id, data.get("task", ""), reserved, usage)

    def journal(self, run_id: str, key: str) -> Journal:
        """What the ledger holds for a task's agent loop, for a resume that calls nothing twice."""
        return Journal.fold(Event.objects.filter(
            chain=run_id, kind__in=JOURNAL_KINDS, data__task=key
        ).order_by("seq").values_list("kind", "data"))

    def _status(self, run_id: str, key: str) -> str:
        # Task rows are written only under their run's lock, so a plain read is current.
        return Task.objects.filter(run_id=run_id, key=key).values_list("status", flat=True).get()


def is_terminal(status: str) -> bool:
    return RunStatus(status) in RUN_TERMINAL
