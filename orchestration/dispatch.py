"""Where run work goes: Celery in distributed mode, the in-process thread pool in standalone.

Both paths call the same Celery task functions. Nothing calls this directly to start work:
state changes write outbox rows (orchestration/outbox.py), which are published through here.
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


def run_in_worker(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call ``fn`` as a pool thread's work: on database connections of its own, closed after,
    and a failure logged rather than lost in the pool's future."""
    close_old_connections()
    try:
        fn(*args, **kwargs)
    except Exception:
        log.exception("run work %s%r failed", getattr(fn, "__name__", fn), args)
    finally:
        connections.close_all()


def submit(task: Any, *args: Any, **kwargs: Any) -> None:
    """Send a Celery task (by its task object) to wherever this mode runs work."""
    if standalone():
        try:
            pool().submit(run_in_worker, task.run, *args, **kwargs)
        except RuntimeError:  # that pool was shut down between lookup and submit
            pool().submit(run_in_worker, task.run, *args, **kwargs)
    else:
        # Fail fast when the broker is away: the message is an outbox row, and the relay sends
        # it again; an API request must not hang on a dead broker.
        task.apply_async(args=args, kwargs=kwargs, retry=False)


def send(topic: str, *, message_id: int | None, run_id: str, key: str = "",
         request_id: str | None = None) -> None:
    """Publish one outbox message (see orchestration/outbox.py); raises if the broker refuses."""
    from orchestration import tasks

    if topic == "advance":
        submit(tasks.advance_run, run_id, outbox_id=message_id)
    elif topic == "execute":
        submit(tasks.execute_task, run_id, key, outbox_id=message_id)
    elif topic == "resume":
        submit(tasks.resume_after_decision, request_id, outbox_id=message_id)
    elif topic == "replay":
        submit(tasks.replay_check, request_id, outbox_id=message_id)
    else:
        raise ValueError(f"unknown outbox topic {topic!r}")


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
