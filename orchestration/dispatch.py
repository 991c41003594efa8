"""Where run work goes: Celery in distributed mode, the in-process thread pool in standalone.

Both paths call the same Celery task functions. Call these from ``transaction.on_commit``.
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


def _in_thread(fn: Callable[..., Any], *args: Any) -> None:
    close_old_connections()
    try:
        fn(*args)
    except Exception:
        log.exception("run work %s%r failed", getattr(fn, "__name__", fn), args)
    finally:
        connections.close_all()


def submit(task: Any, *args: Any) -> None:
    """Send a Celery task (by its task object) to wherever this mode runs work."""
    if standalone():
        try:
            pool().submit(_in_thread, task.run, *args)
        except RuntimeError:  # that pool was shut down between lookup and submit
            pool().submit(_in_thread, task.run, *args)
    else:
        task.delay(*args)


def enqueue_advance(run_id: Any) -> None:
    from orchestration.tasks import advance_run

    submit(advance_run, str(run_id))


def enqueue_execute(run_id: Any, key: str) -> None:
    from orchestration.tasks import execute_task

    submit(execute_task, str(run_id), key)


def enqueue_resume(request_id: Any) -> None:
    from orchestration.tasks import resume_after_decision

    submit(resume_after_decision, str(request_id))


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
