"""Standalone mode: run work on a thread pool inside the web process."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from django.db import DatabaseError

from orchestration import dispatch

log = logging.getLogger("switchboard.standalone")
_started = False
_stop = threading.Event()


def _resume_unfinished() -> None:
    from orchestration.services import tasks_recover_stale

    try:
        # In standalone mode this process is the only worker: anything left running is stale.
        tasks_recover_stale(older_than=timedelta(0))
    except DatabaseError as exc:  # e.g. not migrated yet
        log.warning("could not resume unfinished runs: %s", exc)


def _sweep_forever() -> None:
    from django.conf import settings

    from orchestration.tasks import sweep

    while not _stop.wait(settings.SWITCHBOARD_SWEEP_SECONDS):
        dispatch.pool().submit(dispatch._in_thread, sweep.run)


def start() -> None:
    """Start the pool's first job and the in-process scheduler (the standalone Celery beat)."""
    global _started
    if _started or not dispatch.standalone():
        return
    _started = True
    dispatch.pool().submit(dispatch._in_thread, _resume_unfinished)
    threading.Thread(target=_sweep_forever, name="switchboard-sweep", daemon=True).start()
