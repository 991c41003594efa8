"""The run lock: every write to a run's state takes its row lock first, and a step reads the
run and its tasks once, under that lock, into a snapshot that its own writes keep current."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connection, transaction

from audit import ledger
from audit.statements import Prepared
from orchestration.engine.store import RunSnapshot, TaskSnapshot
from orchestration.models import Run
from orchestration.plans import plan_of_run
from orchestration.sql import loads, uuid_param

# The run whose row this thread's open transaction holds (see ``locked``), with its task rows
# as read under that lock: writes under the lock keep them current, so a step reads each row
# once.
_held = threading.local()
# Inputs of tasks claimed under a run lock, read from that lock's snapshot: the claimer runs the
# task right after commit and need not read them again.
_prefetched: dict[tuple[str, str], tuple[Any, Any, dict[str, Any]]] = {}

# The run and its chain head, locked together. The task rows are read by a statement of their
# own, after the lock is held: under READ COMMITTED a row joined into a locking query but not
# locked itself comes from the snapshot taken before the query waited for the lock, so a step
# that waited behind another would see the tasks as they were before that step committed.
LOCK_RUN_SQL = (
    "SELECT r.status, r.input, r.cancel_requested, r.process_version_id, v.hydration_limit,"
    " h.seq, h.head_hash, r.plan_version"
    " FROM orchestration_run r JOIN orchestration_processversion v ON v.id = r.process_version_id"
    " JOIN audit_chainhead h ON h.chain = r.id"
    " WHERE r.id = %s{lock}")
# Every run has a chain head (run_create writes it); this is for one that does not.
LOCK_BARE_RUN_SQL = (
    "SELECT r.status, r.input, r.cancel_requested, r.process_version_id, v.hydration_limit,"
    " NULL, NULL, r.plan_version"
    " FROM orchestration_run r JOIN orchestration_processversion v ON v.id = r.process_version_id"
    " WHERE r.id = %s{lock}")
# The run's tasks: one row per task.
TASKS_SQL = ('SELECT "key", status, attempts, output, error, lease_owner, lease_expires_at,'
             " crashes FROM orchestration_task WHERE run_id = %s")
TASK_SQL = ('SELECT status, lease_owner, lease_expires_at, attempts, crashes'
            ' FROM orchestration_task WHERE run_id = %s AND "key" = %s')


class Locked:
    """A locked run: its status, version, snapshot, and task rows
    (``[status, lease owner, lease expiry, attempts, crashes]`` by key)."""

    __slots__ = ("run", "status", "version", "snapshot", "rows")

    def __init__(self, run: str, status: str, version: Any, snapshot: RunSnapshot,
                 rows: dict[str, list[Any]]) -> None:
        self.run, self.status, self.version, self.snapshot, self.rows = (
            run, status, version, snapshot, rows)


def held_run(run_id: Any) -> Locked | None:
    """The locked state of ``run_id`` when this thread's open transaction holds its lock."""
    state = getattr(_held, "state", None)
    if state is not None and state.run == str(run_id) and connection.in_atomic_block:
        return state
    return None


def lock_run(run_id: str) -> None:
    """Every write to a run's state takes the run's row lock first: one lock order, no deadlocks,
    and one writer per run at a time (so its ledger sequence is written in order).

    The lock order, everywhere: run row → task rows → chain heads. Nothing on the hot path
    locks a row that many runs share (process versions, tools, agents, the global chain)."""
    if not connection.features.has_select_for_update:
        return  # SQLite: BEGIN IMMEDIATE (settings) already makes every writer go one at a time
    if held_run(run_id) is not None:
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM orchestration_run WHERE id = %s FOR UPDATE",
                       [Run._meta.pk.get_db_prep_value(uuid.UUID(str(run_id)), connection)])


# A scheduling step's lock and its tasks read, planned once per connection (PostgreSQL).
RUN_LOCK = Prepared("run_lock", LOCK_RUN_SQL.format(lock=" FOR UPDATE OF r, h")
                    .replace("%s", "%(run)s"), {"run": "uuid"})
RUN_TASKS = Prepared("run_tasks", TASKS_SQL.replace("%s", "%(run)s"), {"run": "uuid"})

# One step's checkpoint: the run and its chain head locked together (the step's appends then
# skip the head read), and, as a second statement of the same round trip, the task's row read
# once the lock is held (so it is current: see LOCK_RUN_SQL).
STEP_LOCK = Prepared("step_lock", "SELECT h.seq, h.head_hash FROM orchestration_run r"
                     " JOIN audit_chainhead h ON h.chain = r.id WHERE r.id = %(run)s"
                     " FOR UPDATE OF r, h", {"run": "uuid"})
TASK_ROW = Prepared("task_row", TASK_SQL.replace("run_id = %s", "run_id = %(run)s")
                    .replace('"key" = %s', '"key" = %(key)s'), {"run": "uuid", "key": "text"})


# A step written at a head it already knows (PostgreSQL): sent ahead of its writes in their one
# round trip with the commit, the run and its chain head are locked, then (a statement of its
# own, so it reads the rows as they are once the lock is held) the head and the task's lease
# are checked to be what the step assumed; if either moved, the transaction fails and nothing
# of the step lands (``moved_on`` tells that failure apart).
MOVED_ON = "switchboard: the run moved on since the step's last write"
STEP_EXPECT = Prepared(
    "step_expect",
    "SELECT switchboard_expect((SELECT h.seq = %(seq)s AND h.head_hash = %(hash)s"
    " FROM audit_chainhead h WHERE h.chain = %(run)s) AND (%(lease)s = '' OR EXISTS ("
    " SELECT 1 FROM orchestration_task t WHERE t.run_id = %(run)s AND t.\"key\" = %(key)s"
    " AND t.status = 'running' AND t.lease_owner = %(lease)s)), %(message)s)",
    {"run": "uuid", "seq": "bigint", "hash": "text", "key": "text", "lease": "text",
     "message": "text"})


def expect_step(run_id: str, task_key: str, lease: str, head: tuple[int, str],
                write: Any) -> None:
    """Give ``write`` (a step's deferred writes) the statements that lock the run and its head
    and fail the step unless the head is still ``head`` and, with a ``lease``, the task is
    still running under it. The step's appends then hash onto ``head`` without reading it."""
    params = {"run": uuid_param(run_id), "seq": head[0], "hash": head[1], "key": task_key,
              "lease": lease, "message": MOVED_ON}
    write(*STEP_LOCK.statement(params))
    write(*STEP_EXPECT.statement(params))
    ledger.prime_head(uuid.UUID(str(run_id)), head[0], head[1])


def moved_on(exc: BaseException) -> bool:
    """Whether ``exc`` is a step's expectation failing (see ``expect_step``)."""
    cause = exc.__cause__
    return (getattr(cause, "sqlstate", None) == "P0001"
            and str(getattr(getattr(cause, "diag", None), "message_primary", "")) == MOVED_ON)


def lock_step(run_id: str, task_key: str = "") -> Any:
    """Take the run's lock for one step's writes and read ``task_key``'s row
    (``TASK_SQL``'s columns, None without a key or a row): one round trip on PostgreSQL."""
    read = [uuid_param(run_id), task_key]
    if not connection.features.has_select_for_update or held_run(run_id) is not None:
        lock_run(run_id)
        return _task_row(read) if task_key else None
    params = {"run": uuid_param(run_id), "key": task_key}
    if task_key:
        head, rows = _lock_then_read(STEP_LOCK, TASK_ROW, params)
        row = rows[0] if rows else None
    else:
        head, row = _lock_then_read(STEP_LOCK, None, params)[0], None
    if head is None:  # no chain head (or no run): the plain lock, then the row under it
        lock_run(run_id)
        return _task_row(read) if task_key else None
    ledger.prime_head(uuid.UUID(str(run_id)), head[0], head[1])
    return row


def _lock_then_read(lock: Prepared, read: Prepared | None,
                    params: dict[str, Any]) -> tuple[Any, list[Any]]:
    """``lock``'s row and ``read``'s rows, the second statement run once the first holds its
    locks (so it reads current rows), in one round trip (PostgreSQL)."""
    lock_sql, lock_params = lock.statement(params)
    read_sql, read_params = read.statement(params) if read is not None else ("", [])
    with connection.cursor() as cursor:
        # Client-side binding (Django's default with psycopg 3): one simple query.
        cursor.execute(f"{lock_sql}; {read_sql}" if read_sql else lock_sql,
                       [*lock_params, *read_params])
        locked_row = cursor.fetchone()
        if read is None:
            return locked_row, []
        cursor.nextset()
        return locked_row, cursor.fetchall()


def _task_row(params: list[Any]) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(TASK_SQL, params)
        return cursor.fetchone()


@contextmanager
def locked(run_id: str) -> Iterator[RunSnapshot]:
    """Lock the run (and its chain head) and read it with its tasks, for the block's writes."""
    # savepoint=False: inside a caller's unit of work this joins it (one commit per step).
    with transaction.atomic(savepoint=False):
        # FOR UPDATE OF r: the run row only, never the process version all its runs share.
        # Lock order: the run row, then its chain head (locked here so the step's appends
        # need not read it again). Task rows are written only under the run's lock.
        lock = (" FOR UPDATE OF r, h" if connection.features.has_select_for_update
                else "")
        with connection.cursor() as cursor:
            if lock:  # PostgreSQL: the lock, then the tasks read under it, in one round trip
                row, fetched = _lock_then_read(RUN_LOCK, RUN_TASKS, {"run": uuid_param(run_id)})
            else:
                cursor.execute(LOCK_RUN_SQL.format(lock=lock), [uuid_param(run_id)])
                row = cursor.fetchone()
            if row is None:  # (the tasks read then was not under the lock: read again)
                cursor.execute(LOCK_BARE_RUN_SQL.format(lock=" FOR UPDATE OF r" if lock
                                                        else ""), [uuid_param(run_id)])
                row = cursor.fetchone()
                if row is None:
                    raise Run.DoesNotExist(f"no run {run_id}")
                cursor.execute(TASKS_SQL, [uuid_param(run_id)])
                fetched = cursor.fetchall()
            elif not lock:
                cursor.execute(TASKS_SQL, [uuid_param(run_id)])
                fetched = cursor.fetchall()
        status, run_input, cancel_requested, version_id, hydration_limit = row[:5]
        head_seq, head_hash, plan_version = row[5:8]
        if head_seq is not None:
            ledger.prime_head(uuid.UUID(str(run_id)), head_seq, head_hash)
        tasks = {row[0]: TaskSnapshot(key=row[0], status=row[1], attempts=row[2],
                                      output=loads(row[3]), error=row[4])
                 for row in fetched}
        snapshot = RunSnapshot(
            run_id=str(run_id),
            status=status,
            plan=plan_of_run(run_id, version_id, plan_version),
            input=loads(run_input),
            hydration_limit=hydration_limit,
            tasks=tasks,
            cancel_requested=bool(cancel_requested),
        )
        outer = getattr(_held, "state", None)
        _held.state = Locked(str(run_id), status, version_id, snapshot, {
            row[0]: [row[1], row[5], row[6], row[2], row[7]] for row in fetched})
        try:
            yield snapshot
        finally:
            _held.state = outer


def prefetch(state: Locked, run_id: str, key: str) -> None:
    """Keep a claimed task's inputs as the lock's snapshot has them, for ``take_prefetched``."""
    snap = state.snapshot
    deps = snap.plan.by_key()[key].depends_on
    _prefetched[(str(run_id), key)] = (snap.plan, snap.input, {
        dep: copy.deepcopy(snap.tasks[dep].output) for dep in deps})


def take_prefetched(run_id: str, key: str) -> tuple[Any, Any, dict[str, Any]] | None:
    """(the run's plan, run input, dependencies' outputs) of a task claimed under a run lock
    in this process, once."""
    return _prefetched.pop((str(run_id), key), None)
