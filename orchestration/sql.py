"""Plain SQL for the hot path of every task transition (the ORM costs about a millisecond of
Python per statement; a whole step is a dozen statements): parameters adapted to the
connection, one-statement reads and writes, and a step's writes deferred to one round trip."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connection

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


_writes = threading.local()


@contextmanager
def deferred_writes() -> Iterator[Callable[[str, list[Any]], None]]:
    """Collect a step's writes (whose results nothing reads) and send them together when the
    block ends: on PostgreSQL one round trip for the whole step, statements in order. Use it
    inside the step's transaction; if the block raises, nothing is sent. Reads of rows the
    buffer would change must flush first (``flush_writes``)."""
    if getattr(_writes, "buffer", None) is not None:
        yield write  # the outer block sends
        return
    _writes.buffer = []
    try:
        yield write
        flush_writes()
    finally:
        _writes.buffer = None


def write(sql: str, params: list[Any]) -> None:
    """Run a statement whose result nothing reads: now, or with the step's other writes when
    inside ``deferred_writes``."""
    buffer = getattr(_writes, "buffer", None)
    if buffer is None:
        execute(sql, params)
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
        execute("; ".join(sql for sql, _ in statements),
                [value for _, params in statements for value in params])
        return
    for sql, params in statements:
        execute(sql, params)
