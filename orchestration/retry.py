"""Units of work kept through database trouble: retried through lock conflicts and a database
that is briefly away, rather than thrown away."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    transaction,
)

log = logging.getLogger("switchboard.work")

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


def retrying[T](fn: Callable[..., T]) -> Callable[..., T]:
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
