from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")

app = Celery("switchboard")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


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
