"""The periodic sweep: what keeps a deployment whole with no process beyond the workers.

Every worker process (and the standalone server) runs ``start()``: a thread that, every
``SWITCHBOARD_SWEEP_SECONDS``, becomes the sweeper if no other process is one right now (a
PostgreSQL advisory lock; a dead sweeper's lock goes with its connection) and then:

- relays outbox messages that are due (lost by the broker, unsent during an outage);
- sends an ``execute`` message for every running task whose lease has expired, so a killed
  worker's tasks are taken over within a lease and a sweep (about 15 s by default);
- re-sends work nothing is holding: queued tasks and active runs without a message in flight,
  and waiting tasks whose approval request has been decided (the resume message was lost), or
  whose kill switch has been released (the release was interrupted);
- enforces approval deadlines and seals committed ledger events into the global chain;
- queues again replay checks whose worker was lost (orchestration/replay_jobs.py).
- deletes the text of model conversations past their retention (orchestration/transcripts.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit import ledger
from orchestration import (
    heartbeat,
    kill_switches,
    metrics,
    outbox,
    replay_jobs,
    signals,
    transcripts,
)
from orchestration.engine import delegation
from orchestration.engine.states import RUN_TERMINAL, RunStatus, TaskStatus
from orchestration.models import PAUSED, Outbox, Run, Task

log = logging.getLogger("switchboard.sweep")
_ADVISORY_KEY = 0x5357_4545_5031  # "SWEEP1": one sweeper at a time across all processes
_BATCH = 500
_started_pid: int | None = None
_stop = threading.Event()


def sweep_once() -> dict[str, int]:
    """One pass; returns what it did (for logs and tests)."""
    figures = {
        "relayed": outbox.relay(limit=_BATCH),
        "taken_over": _expired_leases(),
        "stalled": _unheld_work(),
        "resumed": _decided_waits(),
        "unpaused": kill_switches.resume_unpaused(),
        "expired": approvals.requests_expire(),
        "sealed": ledger.seal(),
        "replays": replay_jobs.recover(),
        "transcripts_expired": transcripts.expire(),
    }
    for receiver, result in signals.swept.send_robust(sender=sweep_once):
        if isinstance(result, Exception):
            log.error("sweep receiver %s failed: %s", receiver, result)
    if any(v for k, v in figures.items() if k != "sealed"):
        log.info("sweep: %s", figures)
    return figures


def _no_message(topic: str, *, with_key: bool) -> Exists:
    match = Q(run_id=OuterRef("run_id"), topic=topic)
    if with_key:
        match &= Q(key=OuterRef("key"))
    return ~Exists(Outbox.objects.filter(match))


def _expired_leases() -> int:
    now = timezone.now()
    lapsed = (Task.objects.filter(status=TaskStatus.RUNNING)
              .filter(Q(lease_expires_at__lt=now) | Q(lease_expires_at__isnull=True))
              .filter(_no_message("execute", with_key=True))
              .values_list("run_id", "key")[:_BATCH])
    taken_over = _emit_execute(list(lapsed))
    metrics.LEASE_TAKEOVERS.inc(taken_over)
    return taken_over


def _emit_execute(pairs: list[tuple[object, str]]) -> int:
    if not pairs:
        return 0
    with transaction.atomic():
        for run_id, key in pairs:
            outbox.emit("execute", run_id, key=key)
    return len(pairs)


def _unheld_work() -> int:
    """A safety net under the outbox: work in a state that needs a message but has none."""
    cutoff = timezone.now() - timedelta(seconds=2 * settings.SWITCHBOARD_REDELIVER_SECONDS)
    queued = list(Task.objects.filter(status=TaskStatus.QUEUED, run__updated_at__lt=cutoff)
                  .filter(_no_message("execute", with_key=True))
                  .values_list("run_id", "key")[:_BATCH])
    count = _emit_execute(queued)
    in_flight = Task.objects.filter(run_id=OuterRef("pk"),
                                    status__in=[TaskStatus.QUEUED, TaskStatus.RUNNING])
    idle = list(Run.objects.filter(
        status__in=[RunStatus.PENDING, RunStatus.PLANNING, RunStatus.QUEUED, RunStatus.RUNNING],
        updated_at__lt=cutoff)
        .filter(~Exists(in_flight), ~Exists(Outbox.objects.filter(run_id=OuterRef("pk"))))
        .values_list("pk", flat=True)[:_BATCH])
    if idle:
        with transaction.atomic():
            for run_id in idle:
                outbox.emit("advance", run_id)
    return count + len(idle)


def _decided_waits() -> int:
    """Waiting tasks whose request was decided but whose resume never happened."""
    requests = ApprovalRequest.objects.filter(run_id=OuterRef("run_id"),
                                              task_key=OuterRef("key"))
    stuck = list(
        Task.objects.filter(status=TaskStatus.WAITING)
        .exclude(run__status__in=[s.value for s in RUN_TERMINAL])
        .exclude(error__startswith=f"{PAUSED}:")  # a kill switch's, not a decision's
        # A caller waiting on what it delegated: its own scheduling step wakes it, and an
        # earlier decision of its task must not be applied again (a budget raised twice).
        .exclude(error__startswith=f"{delegation.WAITING}:")
        .filter(Exists(requests.exclude(status=ApprovalRequest.Status.PENDING)),
                ~Exists(requests.filter(status=ApprovalRequest.Status.PENDING)),
                ~Exists(Outbox.objects.filter(run_id=OuterRef("run_id"), topic="resume")))
        .values_list("run_id", "key")[:_BATCH])
    if not stuck:
        return 0
    with transaction.atomic():
        for run_id, key in stuck:
            latest = (ApprovalRequest.objects.filter(run_id=run_id, task_key=key)
                      .exclude(status=ApprovalRequest.Status.PENDING)
                      .order_by("-decided_at", "-created_at").values_list("pk", flat=True)
                      .first())
            outbox.emit("resume", run_id, request_id=latest)
    return len(stuck)


def recover_on_start() -> dict[str, int]:
    """Standalone: this process is the only worker, so whatever a previous one left running
    is lost; take it over now rather than after its lease."""
    Task.objects.filter(status=TaskStatus.RUNNING).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))
    replay_jobs.recover(lost=True)
    outbox.relay(limit=100_000, all_now=True)
    return sweep_once()


@contextmanager
def _leader() -> Iterator[bool]:
    if connection.vendor != "postgresql":
        yield True  # SQLite: standalone, one process
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [_ADVISORY_KEY])
        mine = bool(cursor.fetchone()[0])
    try:
        yield mine
    finally:
        if mine:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [_ADVISORY_KEY])


def _loop() -> None:
    from django.db import close_old_connections

    heartbeat.beat()
    while not _stop.wait(settings.SWITCHBOARD_SWEEP_SECONDS):
        heartbeat.beat()
        try:
            close_old_connections()
            with _leader() as mine:
                if mine:
                    sweep_once()
        except Exception:  # the database or broker is away: try again next round
            log.exception("sweep failed")
            try:
                connection.close()
            except Exception:
                pass


def start() -> None:
    """Start this process's sweep thread (idempotent)."""
    global _started_pid
    if _started_pid == os.getpid():
        return
    _started_pid = os.getpid()
    threading.Thread(target=_loop, name="switchboard-sweep", daemon=True).start()
