"""Where run work goes: Celery in distributed mode, the in-process thread pool in standalone.

Both paths call the same Celery task functions. Nothing calls this directly to start work:
state changes write outbox rows (orchestration/outbox.py), which are published through here.
The tasks that handle each topic (orchestration/tasks.py) sit above everything that publishes
work, so this module does not import them: they are routed here when the app is ready.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connections

log = logging.getLogger("switchboard.dispatch")

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
# Outbox topic → the Celery task that handles it, and the task's arguments for a message
# (from its run id, task key and request id); filled by ``route``.
Arguments = Callable[[str, str, str | None], tuple[Any, ...]]
_routes: dict[str, tuple[Any, Arguments]] = {}


def standalone() -> bool:
    return settings.SWITCHBOARD_MODE == "standalone"


def pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=settings.SWITCHBOARD_WORKER_THREADS,
                thread_name_prefix="switchboard-worker",
            )
        return _pool


def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``fn`` as a pool thread's work: on database connections of its own, closed after,
    and a failure logged rather than lost in the pool's future."""
    close_old_connections()
    try:
        fn(*args, **kwargs)
    except Exception:
        log.exception("run work %s%r failed", getattr(fn, "__name__", fn), args)
    finally:
        connections.close_all()


def in_pool(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``fn`` on this process's worker pool, with its own database connection; what it
    raises is logged."""
    try:
        pool().submit(_in_thread, fn, *args, **kwargs)
    except RuntimeError:  # that pool was shut down between lookup and submit
        pool().submit(_in_thread, fn, *args, **kwargs)


def submit(task: Any, *args: Any, **kwargs: Any) -> None:
    """Send a Celery task (by its task object) to wherever this mode runs work."""
    if standalone():
        in_pool(task.run, *args, **kwargs)
    else:
        # Fail fast when the broker is away: the message is an outbox row, and the relay sends
        # it again; an API request must not hang on a dead broker.
        task.apply_async(args=args, kwargs=kwargs, retry=False)


def send(topic: str, *, message_id: int | None, run_id: str, key: str = "",
         request_id: str | None = None) -> None:
    """Publish one outbox message (see orchestration/outbox.py); raises if the broker refuses."""
    try:
        task, arguments = _routes[topic]
    except KeyError:
        raise ValueError(f"unknown outbox topic {topic!r}") from None
    submit(task, *arguments(run_id, key, request_id), outbox_id=message_id)


def route(topic: str, task: Any, arguments: Arguments) -> None:
    """Handle ``topic`` messages with the Celery ``task``, called with
    ``arguments(run_id, key, request_id)`` and the message's id as ``outbox_id``."""
    _routes[topic] = (task, arguments)


def shutdown(wait: bool = True) -> None:
    """Stop the pool. With ``wait``, also drain work that running work enqueues meanwhile.

    The lock is never held while waiting: a worker finishing its job may itself enqueue (which
    takes the lock to find the pool); that work lands in a fresh pool, drained next round.
    """
    global _pool
    while True:
        with _pool_lock:
            current, _pool = _pool, None
        if current is None:
            return
        current.shutdown(wait=wait)
        if not wait:
            return
