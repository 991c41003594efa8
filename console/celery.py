"""The Celery application; every worker also runs the periodic sweep once it is ready."""

from __future__ import annotations

import inspect
import logging
import logging.config
import os
from contextvars import ContextVar
from typing import Any

from celery import Celery
from celery.signals import (
    celeryd_init,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_ready,
)

import logcontext

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")

app = Celery("switchboard")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _configure_logging(loglevel: int | str | None) -> None:
    # A worker logs as console/settings.py LOGGING says (JSON or text), like the web process,
    # Python warnings included; --loglevel sets the level of Celery's own logger.
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
    logging.captureWarnings(True)
    if loglevel:
        logging.getLogger("celery").setLevel(loglevel)


@celeryd_init.connect
def _log_from_the_start(options: dict[str, Any] | None = None, **kwargs: object) -> None:
    # Before the worker's own start-up checks, so their warnings are log lines too.
    _configure_logging((options or {}).get("loglevel"))


@setup_logging.connect
def _keep_our_logging(loglevel: int | str | None = None, **kwargs: object) -> None:
    # A receiver here stops Celery from replacing the root handler and from redirecting
    # stdout/stderr into its logger (worker_hijack_root_logger and the rest).
    _configure_logging(loglevel)


# What task_prerun bound, undone by task_postrun: both run in the thread (and context) that
# executes the task, so this is per task even when twin deliveries run side by side.
_task_bindings: ContextVar[tuple[Any, ...]] = ContextVar("switchboard_task_bindings", default=())


@task_prerun.connect
def _bind_run(task: Any, args: tuple = (), kwargs: dict | None = None, **rest: object) -> None:
    # A task that takes a run id (and a task key) binds them for all it logs, Celery's own
    # "succeeded"/"raised" lines included; work.py binds them again as its chain moves on.
    binding = None
    try:
        named = inspect.signature(task.run).bind_partial(*args, **(kwargs or {})).arguments
    except TypeError:
        named = {}
    if "run_id" in named:
        binding = logcontext.bound(run_id=named["run_id"], task_key=named.get("key"))
        binding.__enter__()
    _task_bindings.set((*_task_bindings.get(), binding))


@task_postrun.connect
def _unbind_run(**rest: object) -> None:
    stack = _task_bindings.get()
    if stack:
        _task_bindings.set(stack[:-1])
        if stack[-1] is not None:
            stack[-1].__exit__(None, None, None)


@worker_ready.connect
def _start_sweep(**kwargs: object) -> None:
    # Every worker runs the sweep (one at a time, under a lock): recovery needs no Celery beat
    # or any other process a deployment could forget.
    from orchestration import sweep

    sweep.start()


@worker_init.connect
def _trace_worker(sender: object = None, **kwargs: object) -> None:
    # A prefork pool's children set up their own tracer after the fork (below): the batch
    # span processor's export thread would not survive it. Other pools run tasks here.
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    from console import tracing

    pool = getattr(sender, "pool_cls", None) or app.conf.worker_pool
    try:
        pool = get_implementation(pool)  # a name ("threads", "processes") or the class
    except Exception:  # an unknown name: the worker itself reports it
        return
    if not (isinstance(pool, type) and issubclass(pool, PreforkPool)):
        tracing.setup("switchboard-worker")


@worker_process_init.connect
def _trace_worker_process(**kwargs: object) -> None:
    from console import tracing

    tracing.setup("switchboard-worker")
