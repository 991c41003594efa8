"""Standalone mode: run work on a thread pool inside the web process."""

from __future__ import annotations

import logging

from django.db import DatabaseError

from orchestration import dispatch

log = logging.getLogger("switchboard.standalone")
_started = False


def _resume_unfinished() -> None:
    from orchestration import sweep

    try:
        sweep.recover_on_start()
    except DatabaseError as exc:  # e.g. not migrated yet
        log.warning("could not resume unfinished runs: %s", exc)


def start() -> None:
    """Take over what a previous process left unfinished, and start the sweep thread (the
    same one every Celery worker runs in distributed mode)."""
    global _started
    if _started or not dispatch.standalone():
        return
    _started = True
    from orchestration import sweep

    dispatch.in_pool(_resume_unfinished)
    sweep.start()
