"""The Celery application; every worker also runs the periodic sweep once it is ready."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_ready

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
