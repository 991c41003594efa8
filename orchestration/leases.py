"""Leases on running tasks, renewed by a heartbeat while the worker that holds them lives.

Claiming a task gives it a lease: a fencing token (unique to that claim) and an expiry
``SWITCHBOARD_LEASE_SECONDS`` ahead. A thread in every process that runs tasks renews the
leases it holds every third of that, in one UPDATE. When a worker dies (``kill -9``, a lost
machine) its leases stop being renewed; once one has expired, a redelivered or re-sent message
may take the task over (``DjangoRunStore.claim_task``), and the old holder's late outcome is
refused because its token no longer matches (``LeaseLost``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

log = logging.getLogger("switchboard.leases")

_lock = threading.Lock()
_held: dict[tuple[str, str], str] = {}  # (run id, task key) → lease token
_thread_pid: int | None = None
_wake = threading.Event()


def duration() -> timedelta:
    return timedelta(seconds=settings.SWITCHBOARD_LEASE_SECONDS)


def new_token() -> str:
    """A fencing token naming the process that holds it (for people reading the ledger)."""
    host = socket.gethostname()[:24]
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:16]}"


def hold(run_id: str, key: str, token: str) -> None:
    """Keep renewing ``token`` until ``drop``; starts this process's heartbeat on first use."""
    global _thread_pid
    with _lock:
        _held[(str(run_id), key)] = token
        if _thread_pid != os.getpid():  # first use, or a forked pool child
            _thread_pid = os.getpid()
            threading.Thread(target=_beat, name="switchboard-lease-heartbeat",
                             daemon=True).start()


def drop(run_id: str, key: str) -> None:
    with _lock:
        _held.pop((str(run_id), key), None)


def held() -> list[str]:
    with _lock:
        return list(_held.values())


def renew(tokens: list[str]) -> int:
    """Push the expiry of these leases forward; returns how many are still ours.

    One autocommitted statement per lease: the heartbeat never holds one task row while
    waiting for another (a step holds its run's task rows until it commits), so it cannot
    take part in a deadlock."""
    until = connection.ops.adapt_datetimefield_value(timezone.now() + duration())
    renewed = 0
    with connection.cursor() as cursor:
        for token in tokens:
            cursor.execute("UPDATE orchestration_task SET lease_expires_at = %s"
                           " WHERE status = 'running' AND lease_owner = %s", [until, token])
            renewed += cursor.rowcount
    return renewed


def _beat() -> None:
    pid = os.getpid()
    interval = max(0.2, settings.SWITCHBOARD_LEASE_SECONDS / 3)
    while _thread_pid == pid:
        _wake.wait(interval)
        tokens = held()
        if not tokens:
            continue
        try:
            close_old_connections()
            renew(tokens)
        except Exception as exc:  # never let the heartbeat die: its leases would all lapse
            # The database is away: the leases may lapse and be taken over; the holders find
            # out when they next checkpoint or record their outcome.
            log.warning("could not renew %d task leases: %s", len(tokens), exc)
            try:
                connection.close()
            except Exception:
                pass
