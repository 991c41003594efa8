"""Budgets: reserving a call's worst case before it runs, settling it for what it used after.

Budgets stack run → task → agent loop. A reservation is one conditional UPDATE per level, in
one transaction: the WHERE clause re-checks the cap on the locked row against used + reserved +
the new worst case, so two concurrent calls can never both pass a check only one of them fits.
On PostgreSQL both levels are one statement, committed on its own (one round trip).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from functools import cache
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from audit.statements import Prepared
from orchestration import metrics, rules, run_lock
from orchestration.engine.governance import Usage
from orchestration.models import Run, Task
from orchestration.precheck import TYPES, stop_sql, stop_statement


class _Refused(Exception):
    pass


# The hot path of every model and tool call: plain SQL, built once. The ORM's F() arithmetic
# costs about a millisecond of Python per statement; these run in tens of microseconds.
# The row of the run, and of its task, when the worst case %(tokens)s, %(cost)s, %(steps)s fits
# what is used and reserved under each cap.
_RUN_FITS = """
 WHERE id = %(run)s
   AND (budget_tokens IS NULL
        OR budget_tokens >= tokens_in + tokens_out + reserved_tokens + %(tokens)s)
   AND (budget_cost IS NULL OR budget_cost >= cost + reserved_cost + %(cost)s)
   AND (budget_steps IS NULL OR budget_steps >= steps + reserved_steps + %(steps)s)
"""
_TASK_FITS = """
 WHERE run_id = %(run)s AND "key" = %(key)s
   AND (budget_tokens IS NULL OR budget_tokens >= used_tokens + reserved_tokens + %(tokens)s)
   AND (budget_cost IS NULL OR budget_cost >= used_cost + reserved_cost + %(cost)s)
"""
_RESERVING = """
   SET reserved_tokens = reserved_tokens + %(tokens)s,
       reserved_cost = reserved_cost + %(cost)s,
       reserved_steps = reserved_steps + %(steps)s"""
_RESERVE_RUN = "UPDATE orchestration_run" + _RESERVING + _RUN_FITS
_RESERVE_TASK = "UPDATE orchestration_task" + _RESERVING + _TASK_FITS
_SETTLE_RUN = """
UPDATE orchestration_run
   SET reserved_tokens = reserved_tokens - %(r_tokens)s,
       reserved_cost = reserved_cost - %(r_cost)s,
       reserved_steps = reserved_steps - %(r_steps)s,
       steps = steps + %(steps)s,
       tool_calls = tool_calls + %(tool_calls)s,
       tokens_in = tokens_in + %(tokens_in)s,
       tokens_out = tokens_out + %(tokens_out)s,
       cost = cost + %(cost)s,
       updated_at = %(now)s
 WHERE id = %(run)s
"""
_SETTLE_TASK = """
UPDATE orchestration_task
   SET reserved_tokens = reserved_tokens - %(r_tokens)s,
       reserved_cost = reserved_cost - %(r_cost)s,
       reserved_steps = reserved_steps - %(r_steps)s,
       used_tokens = used_tokens + %(tokens)s,
       used_cost = used_cost + %(cost)s
 WHERE run_id = %(run)s AND "key" = %(key)s
"""


def _execute(sql: str, params: dict[str, Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def run_param(run_id: Any) -> Any:
    value = run_id if isinstance(run_id, uuid.UUID) else uuid.UUID(str(run_id))
    return Run._meta.pk.get_db_prep_value(value, connection)


def _money(value: Decimal) -> Any:
    return connection.ops.adapt_decimalfield_value(value, 14, 6)


# PostgreSQL: both reservations in one round trip. The task's UPDATE runs only once the run's
# has (its EXISTS over ``r`` is evaluated first), so the lock order stays run row, then task row.
# A reservation on its own (autocommit) need not wait for its WAL flush (``set_config``, local
# to its transaction): locks and visibility are unchanged, so concurrent reservations still
# cannot overspend, and only a crash of the database server itself could drop one, together
# with everything its call would have recorded (the step that records the call's result commits
# synchronously, which flushes the WAL up to and including the reservation). Inside a caller's
# transaction the setting would reach that transaction's own commit: there it stays as it is.
_RELAXED = "relaxed AS (SELECT set_config('synchronous_commit', 'off', true)),"
_STRICT = "relaxed AS (SELECT 1),"
_RESERVE_BOTH = (
    "WITH {relaxed} r AS (" + _RESERVE_RUN + " RETURNING 1),"
    " t AS (" + _RESERVE_TASK + " AND EXISTS (SELECT 1 FROM r) RETURNING 1)"
    " SELECT (SELECT count(*) FROM r) + 0 * (SELECT count(*) FROM relaxed),"
    " (SELECT count(*) FROM t)")
_RESERVE_RUN_ONLY = (
    "WITH {relaxed} r AS (" + _RESERVE_RUN + " RETURNING 1)"
    " SELECT (SELECT count(*) FROM r) + 0 * (SELECT count(*) FROM relaxed), 1")


_TYPES = {**TYPES, "tokens": "bigint", "cost": "numeric", "steps": "integer",
          "r_tokens": "bigint", "r_cost": "numeric", "r_steps": "integer",
          "tool_calls": "integer", "tokens_in": "bigint", "tokens_out": "bigint",
          "now": "timestamptz"}


@cache
def _reserve_statement(task: bool, relaxed: bool) -> Prepared:
    sql = _RESERVE_BOTH if task else _RESERVE_RUN_ONLY
    return Prepared(f"reserve{'_task' if task else ''}{'_relaxed' if relaxed else ''}",
                    sql.format(relaxed=_RELAXED if relaxed else _STRICT), _TYPES)


@cache
def _unless_stopped_statement(task: bool, vendor: str) -> Prepared:
    return Prepared(f"reserve_unless_stopped{'_task' if task else ''}", _UNLESS_STOPPED.format(
        stop=stop_sql(call=False), relaxed=_RELAXED,
        task=_UNLESS_STOPPED_TASK if task else "",
        task_count="(SELECT count(*) FROM t)" if task else "1"), _TYPES)


# PostgreSQL, the next call's checks run ahead, after a step's writes in its transaction (which
# holds the run's row lock from its start): the stop row and, unless it stops the work, the
# reservation at both levels or at neither. The task's row is locked and its caps checked
# before the run's UPDATE, so the run's part is never taken alone (a commit whose answer is
# lost then leaves either both parts held or none: see Ahead.release). The tool call's own
# key is ``call_key`` here: ``key`` is the task's.
_AHEAD = (
    "WITH s (cancel, switch, active{columns}) AS ({stop}),"
    " go AS (SELECT 1 FROM s WHERE NOT s.cancel AND s.switch IS NULL"
    " AND (%(agent)s IS NULL OR s.active = 1)),"
    " rf AS (SELECT 1 FROM orchestration_run" + _RUN_FITS + "),"
    " tf AS (SELECT 1 FROM orchestration_task" + _TASK_FITS + " FOR UPDATE),"
    " r AS (" + _RESERVE_RUN + " AND EXISTS (SELECT 1 FROM go) AND EXISTS (SELECT 1 FROM tf)"
    " RETURNING 1),"
    " t AS (" + _RESERVE_TASK + " AND EXISTS (SELECT 1 FROM r) RETURNING 1)"
    " SELECT s.cancel, s.switch, s.active{columns}, (SELECT count(*) FROM r),"
    " (SELECT count(*) FROM t), (SELECT count(*) FROM rf), (SELECT count(*) FROM tf) FROM s")


@cache
def _ahead_statement(call: bool, vendor: str) -> Prepared:
    return Prepared(f"ahead_{'tool' if call else 'model'}", _AHEAD.format(
        stop=stop_sql(call=call).replace("%(key)s", "%(call_key)s"),
        columns=_CALL_COLUMNS if call else ""), {**_TYPES, "call_key": "text"})


def _params(run_id: str, task_key: str, worst: Usage) -> dict[str, Any]:
    return {"run": run_param(run_id), "key": task_key, "tokens": worst.tokens,
            "cost": _money(worst.cost), "steps": worst.steps}


def reserve(run_id: str, task_key: str, worst: Usage, *, run: Run | None = None) -> str:
    """Reserve ``worst`` against the run's and the task's budgets; "" or why it was refused.

    ``run``, when given, supplies the wall-time budget and start (neither changes while a task
    runs: a raise happens while it is parked) and saves reading them again."""
    return _judged(run_id, task_key, worst, run, _reserve(run_id, task_key, worst))


# PostgreSQL, a model call: the stop signals (precheck.stop_sql) and, unless one is raised, the
# reservation, in one statement. The stop row comes back either way.
_UNLESS_STOPPED = (
    "WITH s (cancel, switch, active) AS ({stop}), {relaxed}"
    " r AS (" + _RESERVE_RUN + " AND EXISTS (SELECT 1 FROM s WHERE NOT s.cancel"
    " AND s.switch IS NULL AND (%(agent)s IS NULL OR s.active = 1)) RETURNING 1){task}"
    " SELECT s.cancel, s.switch, s.active,"
    " (SELECT count(*) FROM r) + 0 * (SELECT count(*) FROM relaxed), {task_count} FROM s")
# A tool call's stop row (precheck.stop_sql(call=True)) has three more columns: the grant,
# whether people were asked about the call, and the policies' fingerprint.
_CALL_COLUMNS = ", granted, asked, policies"
_UNLESS_STOPPED_TASK = (", t AS (" + _RESERVE_TASK + " AND EXISTS (SELECT 1 FROM r)"
                        " RETURNING 1)")


def stops(row: Any, agent: str | None) -> bool:
    """Whether a stop row (cancelled, engaged kill switch, agent active) stops the work."""
    return bool(row[0]) or row[1] is not None or bool(agent and not row[2])


def reserve_unless_stopped(run_id: str, task_key: str, worst: Usage, stop: dict[str, Any], *,
                           run: Run | None = None) -> tuple[Any, str | None]:
    """A model call's checks before it runs: the stop signals (``precheck.stop_sql``'s row
    for ``stop``'s parameters; None when the run is gone) and, when they raise no stop, the
    reservation of ``worst`` ("" or why it was refused; None when nothing was reserved)."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        with connection.cursor() as cursor:
            cursor.execute(*stop_statement(call=False).statement(stop))
            row = cursor.fetchone()
        if row is None or stops(row, stop["agent"]):
            return row, None
        return row, reserve(run_id, task_key, worst, run=run)
    statement = _unless_stopped_statement(bool(task_key), connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(*statement.statement({**stop, **_params(run_id, task_key, worst)}))
        row = cursor.fetchone()
    if row is None or stops(row, stop["agent"]):
        return row, None
    return row[:3], _judged(run_id, task_key, worst, run, (row[3], row[4]))


class Ahead:
    """A call's checks run ahead, in the transaction that records the call before it (the
    governor's ``ahead_of_tool``/``ahead_of_model``): the stop signals (for a tool call with
    the grant, whether people were asked about it and the policies in force) and, unless they
    stop the work, the reservation of ``worst`` at the run's and the task's level, both or
    neither. The store runs it after the step's writes (``sql.deferred_read``: on PostgreSQL
    one statement in the step's round trip), ``took`` keeps what it read, and ``committed``
    (the step's on-commit hook) makes it count: a rolled back step holds nothing. ``lost``: the
    step committed but its answer never came back (the store found it in the ledger on a
    retry), so whether this reserved anything is unknown."""

    __slots__ = ("run_id", "task_key", "worst", "stop", "tool", "key", "lease", "row",
                 "held", "fits", "ready", "lost", "stop_used")

    def __init__(self, run_id: str, task_key: str, worst: Usage, stop: dict[str, Any], *,
                 tool: str | None = None, key: str = "", lease: str = "") -> None:
        self.run_id, self.task_key, self.worst, self.stop = run_id, task_key, worst, stop
        self.tool, self.key, self.lease = tool, key, lease
        self.row: Any = None
        self.held = False  # reserved at both levels
        self.fits: tuple[bool, bool] | None = None  # (run, task); None: stopped, or no run
        self.ready = self.lost = self.stop_used = False

    def statement(self) -> tuple[str, list[Any]]:
        """PostgreSQL: the checks and the reservation as one statement (``took`` its row)."""
        return _ahead_statement(self.tool is not None, connection.vendor).statement(
            {**self.stop, "call_key": self.stop.get("key", ""),
             **_params(self.run_id, self.task_key, self.worst)})

    def took(self, row: Any) -> None:
        width = 3 if self.tool is None else 6
        self.row = row[:width] if row is not None else None
        if row is None or stops(row, self.stop["agent"]):
            self.held, self.fits = False, None
            return
        self.held = bool(row[width] and row[width + 1])
        self.fits = (bool(row[width + 2]), bool(row[width + 3]))

    def run(self) -> None:
        """Elsewhere: the stop row, then the reservation's UPDATEs, in the open transaction
        (one that writes, so it holds the database's write lock): the run's part is given
        back at once when the task's budget refuses."""
        with connection.cursor() as cursor:
            cursor.execute(*stop_statement(call=self.tool is not None).statement(self.stop))
            row = cursor.fetchone()
        self.row, self.held, self.fits = row, False, None
        if row is None or stops(row, self.stop["agent"]):
            return
        params = _params(self.run_id, self.task_key, self.worst)
        if not _execute(_RESERVE_RUN, params):
            self.fits = (False, True)
        elif _execute(_RESERVE_TASK, params):
            self.held, self.fits = True, (True, True)
        else:
            settle(self.run_id, "", self.worst, Usage())
            self.fits = (True, False)

    def committed(self) -> None:
        self.ready = True

    def judged(self, run: Run | None) -> str:
        """What the reservation came to, as ``reserve`` answers (only once it is ``ready``
        and the stop row raised no stop)."""
        assert self.fits is not None
        if self.held:
            return _judged(self.run_id, self.task_key, self.worst, run, (1, 1))
        if not self.fits[0]:
            return _judged(self.run_id, self.task_key, self.worst, run, (0, 0))
        why = _why_task(self.run_id, self.task_key, self.worst)
        metrics.refused(why)
        return why

    def release(self) -> None:
        """Give back what it holds: nothing when it never committed or did not reserve. A
        ``lost`` one gives back what the task holds: the task has no other call in flight
        (the call the step recorded is settled), and the run's part was reserved with the
        task's or not at all. Under a lease, only while the task is still this worker's:
        one that took the task over has given back everything it held already."""
        if self.lost:
            with transaction.atomic():
                if self._still_ours():
                    release_held(self.run_id, self.task_key)
        elif self.ready and self.held:
            with transaction.atomic():
                if self._still_ours():
                    settle(self.run_id, self.task_key, self.worst, Usage())

    def _still_ours(self) -> bool:
        """Takes the run's lock, as every writer of the task's row does, and reads its lease."""
        row = run_lock.lock_step(self.run_id, self.task_key)
        return row is not None and (not self.lease or row[1] == self.lease)


def _judged(run_id: str, task_key: str, worst: Usage, run: Run | None,
            done: tuple[int, int]) -> str:
    """What a reservation came to: "" when it stands, else why not (and nothing held)."""
    run_ok, task_ok = done
    try:
        if run_ok and not task_ok:  # the run's part committed alone: give it back
            release(run_id, "", worst)
        if not run_ok:
            raise _Refused(_why_run(run_id, worst))
        if not task_ok:
            raise _Refused(_why_task(run_id, task_key, worst))
    except _Refused as refused:
        metrics.refused(str(refused))
        return str(refused)
    if run is None:
        run = Run.objects.only("budget_wall_s", "created_at").get(pk=run_id)
    if run.budget_wall_s and timezone.now() > run.created_at + timedelta(
            seconds=run.budget_wall_s):
        release(run_id, task_key, worst)
        spent = f"budget_exhausted: the run's wall-time budget of {run.budget_wall_s} s is spent"
        metrics.refused(spent)
        return spent
    return ""


def _reserve(run_id: str, task_key: str, worst: Usage) -> tuple[int, int]:
    """(run reserved, task reserved); a task refused leaves the run's part held (``_judged``
    gives it back). No task key: a call of the run itself (its planner's)."""
    params = _params(run_id, task_key, worst)
    if connection.vendor == "postgresql":
        # Outside a transaction, one statement in autocommit mode: its own transaction, one
        # round trip in all.
        statement = _reserve_statement(bool(task_key), not connection.in_atomic_block)
        with connection.cursor() as cursor:
            cursor.execute(*statement.statement(params))
            return cursor.fetchone()
    with transaction.atomic():
        run_ok = _execute(_RESERVE_RUN, params)
        task_ok = not task_key or (run_ok and _execute(_RESERVE_TASK, params))
        return run_ok, task_ok


def release(run_id: str, task_key: str, reserved: Usage) -> None:
    with transaction.atomic():
        settle(run_id, task_key, reserved, Usage())


_SETTLE_RUN_AT, _SETTLE_TASK_AT = (Prepared("settle_run", _SETTLE_RUN, _TYPES),
                                   Prepared("settle_task", _SETTLE_TASK, _TYPES))


def settle(run_id: str, task_key: str, reserved: Usage | None, actual: Usage, *,
           write: Callable[[str, list[Any]], None] | None = None) -> None:
    """Swap a reservation for the real usage (call inside the step's transaction); ``write``
    takes the statements instead of running them (a step sending its writes together)."""
    reserved = reserved or Usage()
    params = {
        "run": run_param(run_id), "key": task_key,
        "r_tokens": reserved.tokens, "r_cost": _money(reserved.cost), "r_steps": reserved.steps,
        "steps": actual.steps, "tool_calls": actual.tool_calls, "tokens_in": actual.tokens_in,
        "tokens_out": actual.tokens_out, "tokens": actual.tokens, "cost": _money(actual.cost),
        "now": connection.ops.adapt_datetimefield_value(timezone.now()),
    }
    for statement, needed in ((_SETTLE_RUN_AT, True), (_SETTLE_TASK_AT, bool(task_key))):
        if needed:
            sql, values = statement.statement(params)
            if write is not None:
                write(sql, values)
            else:
                with connection.cursor() as cursor:
                    cursor.execute(sql, values)


def release_held(run_id: str, task_key: str) -> Usage:
    """Give back whatever a lost worker still had reserved for the task (inside the takeover's
    transaction): its calls in flight died with it."""
    with connection.cursor() as cursor:
        cursor.execute(
            'SELECT reserved_tokens, reserved_cost, reserved_steps FROM orchestration_task'
            ' WHERE run_id = %s AND "key" = %s', [run_param(run_id), task_key])
        row = cursor.fetchone()
    if row is None or not any(row):
        return Usage()
    held = Usage(tokens_in=int(row[0]), cost=Decimal(str(row[1])), steps=int(row[2]))
    settle(run_id, task_key, held, Usage())
    return held


def _why_run(run_id: str, worst: Usage) -> str:
    run = Run.objects.get(pk=run_id)
    if rules.over_cap(run.budget_tokens, run.tokens_in + run.tokens_out, run.reserved_tokens,
                      worst.tokens):
        return (f"budget_exhausted: run tokens {run.tokens_in + run.tokens_out} used + "
                f"{run.reserved_tokens} reserved + {worst.tokens} needed > cap {run.budget_tokens}")
    if rules.over_cap(run.budget_cost, run.cost, run.reserved_cost, worst.cost):
        return (f"budget_exhausted: run cost {run.cost} used + {run.reserved_cost} reserved + "
                f"{worst.cost} needed > cap {run.budget_cost}")
    return (f"budget_exhausted: run steps {run.steps} used + {run.reserved_steps} reserved + "
            f"{worst.steps} needed > cap {run.budget_steps}")


def _why_task(run_id: str, key: str, worst: Usage) -> str:
    task = Task.objects.get(run_id=run_id, key=key)
    if rules.over_cap(task.budget_tokens, task.used_tokens, task.reserved_tokens,
                      worst.tokens):
        return (f"budget_exhausted: task {key} tokens {task.used_tokens} used + "
                f"{worst.tokens} needed > cap {task.budget_tokens}")
    return (f"budget_exhausted: task {key} cost {task.used_cost} used + {worst.cost} needed > "
            f"cap {task.budget_cost}")
