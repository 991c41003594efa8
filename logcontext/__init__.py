"""What every log line says about the work it was written in (pure Python, no Django).

The code that does a run's work binds the run id and task key (orchestration/work.py,
orchestration/tasks.py, console/celery.py), the request middleware binds the request id
(console/middleware.py); ``ContextFilter``, on the log handler (console/settings.py ``LOGGING``),
copies them onto every record, with the trace and span ids of the active OpenTelemetry span
when there is one. ``JsonFormatter`` writes a record as one JSON object per line,
``TextFormatter`` as a line for people with the same fields appended.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

try:  # tracing is optional: without the package there is no trace id to report
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - opentelemetry-api is installed where tracing is used
    _trace = None

run_id: ContextVar[str | None] = ContextVar("switchboard_run_id", default=None)
task_key: ContextVar[str | None] = ContextVar("switchboard_task_key", default=None)
request_id: ContextVar[str | None] = ContextVar("switchboard_request_id", default=None)

_VARS = {"run_id": run_id, "task_key": task_key, "request_id": request_id}
# The fields a record may carry, in the order the text format appends them.
FIELDS = ("run_id", "task_key", "request_id", "trace_id", "span_id")


@contextmanager
def bound(**values: object) -> Iterator[None]:
    """Bind ``run_id``, ``task_key`` and/or ``request_id`` for the code inside the block (and the
    log lines it writes); the previous values come back after it."""
    tokens = [(_VARS[name], _VARS[name].set(None if value is None else str(value)))
              for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, str]:
    """The fields bound here now (the ones not bound are left out)."""
    found = {name: value for name, var in _VARS.items() if (value := var.get()) is not None}
    if _trace is not None:
        context = _trace.get_current_span().get_span_context()
        if context.is_valid:
            found["trace_id"] = format(context.trace_id, "032x")
            found["span_id"] = format(context.span_id, "016x")
    return found


class ContextFilter(logging.Filter):
    """Adds the bound fields to each record. Put it on a handler, so that records propagated
    from every logger pass through it; it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = current()
        if "request_id" not in fields:
            # Django logs a request's 4xx/5xx answer after the middleware returned, with the
            # request attached to the record.
            given = getattr(getattr(record, "request", None), "request_id", None)
            if isinstance(given, str):
                fields["request_id"] = given
        for name, value in fields.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class JsonFormatter(_JsonFormatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the bound fields,
    any ``extra`` the call passed, and the formatted exception if there was one."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("fmt", "%(levelname)s %(name)s %(message)s")
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("timestamp", "time")
        # The HTTP request Django attaches to its own records is not JSON; its id is.
        kwargs.setdefault("reserved_attrs", [*RESERVED_ATTRS, "request", "server_time"])
        super().__init__(**kwargs)  # type: ignore[arg-type]


class TextFormatter(logging.Formatter):
    """``time level logger message`` and, when bound, `` [run_id=... task_key=...]``."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("fmt", "%(asctime)s %(levelname)s %(name)s %(message)s")
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = [f"{name}={value}" for name in FIELDS
                  if (value := getattr(record, name, None)) is not None]
        return f"{line} [{' '.join(fields)}]" if fields else line
