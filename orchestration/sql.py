"""Plain SQL for the hot path of every task transition (the ORM costs about a millisecond of
Python per statement; a whole step is a dozen statements): parameters adapted to the
connection, one-statement reads and writes, and a step's writes deferred to one round trip."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from django.db import connection
from psycopg.pq import TransactionStatus

from orchestration.models import Run, Task


def uuid_param(value: Any) -> Any:
    value = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    return Run._meta.pk.get_db_prep_value(value, connection)


def dt_param(value: Any) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def json_param(value: Any) -> Any:
    return Task._meta.get_field("output").get_db_prep_save(value, connection)


def loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def fetch_one(sql: str, params: list[Any]) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def execute(sql: str, params: list[Any]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def execute_reading(sql: str, params: list[Any], index: int) -> Any:
    """Run several statements (PostgreSQL) and return the first row of the ``index``-th."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for _ in range(index):
            cursor.nextset()
        return cursor.fetchone()


_writes = threading.local()
_IDLE = TransactionStatus.IDLE


@contextmanager
def deferred_writes(*, commit: bool = False) -> Iterator[Callable[[str, list[Any]], None]]:
    """Collect a step's writes (whose results nothing reads) and send them together when the
    block ends: on PostgreSQL one round trip for the whole step, statements in order. Use it
    inside the step's transaction; if the block raises, nothing is sent. Reads of rows the
    buffer would change must flush first (``flush_writes``).

    ``commit``: the block ends its transaction (nothing after it reads or writes the database
    before the enclosing ``transaction.atomic()`` exits): when that is the outermost one, the
    COMMIT goes in the same round trip as the writes, and Django's own commit then finds no
    transaction open and sends nothing. Nested in a caller's transaction (a test's, a batch's)
    the writes are sent alone and the caller commits."""
    if getattr(_writes, "buffer", None) is not None:
        yield write  # the outer block sends
        return
    _writes.buffer = []
    _writes.read = None
    try:
        yield write
        flush_writes(commit=commit)
    finally:
        _writes.buffer = _writes.read = None


class Reader(Protocol):
    def statement(self) -> tuple[str, list[Any]]: ...  # PostgreSQL: one statement
    def took(self, row: Any) -> None: ...  # its first row (None when it has none)
    def run(self) -> None: ...  # elsewhere: run it in the open transaction


def deferred_read(reader: Reader) -> None:
    """A read (one at most) to run after the step's writes, in their transaction: on
    PostgreSQL as the last statement of their round trip, before its COMMIT. Outside
    ``deferred_writes`` it runs now."""
    if getattr(_writes, "buffer", None) is None:
        _read(reader)
    else:
        _writes.read = reader


def _read(reader: Reader) -> None:
    if connection.vendor != "postgresql":
        reader.run()
        return
    reader.took(execute_reading(*reader.statement(), 0))


def write(sql: str, params: list[Any]) -> None:
    """Run a statement whose result nothing reads: now, or with the step's other writes when
    inside ``deferred_writes``."""
    buffer = getattr(_writes, "buffer", None)
    if buffer is None:
        execute(sql, params)
    else:
        buffer.append((sql, params))


def _ends_outermost() -> bool:
    """Whether this connection's only atomic block is one that commits on exit, so a COMMIT
    sent now is the one Django would send at its end."""
    return (connection.vendor == "postgresql" and len(connection.atomic_blocks) == 1
            and connection.commit_on_exit and not connection.needs_rollback)


def flush_writes(*, commit: bool = False) -> None:
    buffer = getattr(_writes, "buffer", None)
    reader, _writes.read = getattr(_writes, "read", None), None
    if not buffer:
        if reader is not None:
            _read(reader)
        return
    statements = list(buffer)
    buffer.clear()
    if connection.vendor == "postgresql":
        if reader is not None:
            statements.append(reader.statement())
        # Client-side binding (Django's default with psycopg 3) sends this as one simple query.
        sql = "; ".join(sql for sql, _ in statements)
        params = [value for _, params in statements for value in params]
        ends = commit and _ends_outermost()
        if ends:
            sql = f"{sql}; COMMIT"
        if reader is None:
            execute(sql, params)
        else:
            reader.took(execute_reading(sql, params, len(statements) - 1))
        if ends and connection.connection.info.transaction_status != _IDLE:
            raise RuntimeError("the step's COMMIT did not end its transaction")
        return
    _run_sqlite(statements)
    if reader is not None:
        reader.run()


_QMARK = re.compile(r"(?<!%)%s")
_qmark: dict[str, str] = {}


def _run_sqlite(statements: list[tuple[str, list[Any]]]) -> None:
    """SQLite: the step's writes on the driver's own cursor, their placeholders converted once
    per statement text. Django's cursor converts and wraps at every call: 27-31 µs a statement
    against 3-5 µs here (ten UPDATEs of one row in a transaction, median of 300), and a step
    sends about ten."""
    connection.ensure_connection()
    cursor = connection.connection.cursor()
    try:
        with connection.wrap_database_errors:  # the driver's errors as Django's, as usual
            for sql, params in statements:
                query = _qmark.get(sql)
                if query is None:
                    if len(_qmark) > 1000:  # (statements built with varying text)
                        _qmark.clear()
                    query = _qmark[sql] = _QMARK.sub("?", sql).replace("%%", "%")
                cursor.execute(query, params)
    finally:
        cursor.close()
