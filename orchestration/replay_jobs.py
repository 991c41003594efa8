"""Replay checks: a replay of a run from its ledger (orchestration/replay.py), done by a worker.

``request_check`` writes a queued ``ReplayCheck`` and a ``replay`` outbox message in one
transaction, so a committed request always gets done, even if the web process dies right after.
A worker (a Celery task in distributed mode, a thread in standalone) marks it running, replays
the run and stores the verdict, beating a heartbeat on the check every third of
``SWITCHBOARD_LEASE_SECONDS`` meanwhile. A worker lost mid-replay leaves the check running with
a heartbeat that stops: the sweep (and the next request for the same run) queues it again once
the heartbeat is older than ``SWITCHBOARD_LEASE_SECONDS``, as for a task's lease. That is safe
because a replay calls nothing external, and only the first verdict is kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from orchestration import outbox
from orchestration.models import Outbox, ReplayCheck, Run
from orchestration.retry import DB_ERRORS, persist

log = logging.getLogger("switchboard.replay_jobs")
TOPIC = Outbox.Topic.REPLAY
PENDING = (ReplayCheck.Status.QUEUED, ReplayCheck.Status.RUNNING)


def request_check(run: Run, user: Any = None) -> tuple[ReplayCheck, bool]:
    """Queue a replay check of ``run``; ``(check, created)``. While one is queued or running
    for this run, that one is returned instead (and queued again if its worker was lost)."""
    for _ in range(3):
        existing = run.replay_checks.filter(status__in=PENDING).first()
        if existing is not None:
            if recover(ReplayCheck.objects.filter(pk=existing.pk)):
                existing.refresh_from_db()
            return existing, False
        try:
            with transaction.atomic():
                check = ReplayCheck.objects.create(
                    run=run, requested_by=user if user is not None and user.is_authenticated
                    else None)
                outbox.emit(TOPIC, run.pk, request_id=check.pk)
            return check, True
        except IntegrityError:  # a concurrent request queued one first: return that one
            continue
    raise RuntimeError(f"could not queue a replay check of run {run.pk}")


def perform(check_id: str, message_id: int | None = None) -> None:
    """What the worker does with a ``replay`` message."""
    from orchestration.replay import replay

    def claim() -> Any:
        with transaction.atomic():
            if not outbox.consume(message_id):
                return None  # a duplicate delivery: its twin has it
            check = (ReplayCheck.objects.select_for_update().filter(pk=check_id)
                     .values_list("run_id", "status").first())
            if check is None or check[1] not in PENDING:
                return None
            now = timezone.now()
            ReplayCheck.objects.filter(pk=check_id).update(
                status=ReplayCheck.Status.RUNNING, started_at=now, heartbeat_at=now,
                attempts=F("attempts") + 1)
            return check[0]

    run_id = persist(claim, what=f"start replay check {check_id}")
    if run_id is None:
        return
    try:
        with _heartbeat(check_id):
            result = persist(lambda: replay(Run.objects.select_related(
                "process_version__process").get(pk=run_id)), what=f"replay check {check_id}")
    except DB_ERRORS:
        raise  # it stays running: the sweep queues it again
    except Exception as exc:  # a bug in the replay itself: say so, keep the worker going
        log.exception("replay check %s of run %s failed", check_id, run_id)
        verdict = {"status": ReplayCheck.Status.FAILED,
                   "summary": f"the replay failed: {type(exc).__name__}: {exc}"}
    else:
        status = (ReplayCheck.Status.MATCHED if result.ok else
                  ReplayCheck.Status.DIVERGED if result.divergence is not None else
                  ReplayCheck.Status.FAILED)
        verdict = {"status": status, "compared": result.compared, "summary": result.summary(),
                   "divergence": result.divergence.message() if result.divergence else ""}

    def store() -> int:
        # Only the first verdict counts: a twin that finished first has already written it.
        return ReplayCheck.objects.filter(pk=check_id, status__in=PENDING).update(
            finished_at=timezone.now(), **verdict)

    persist(store, what=f"finish replay check {check_id}")


@contextmanager
def _heartbeat(check_id: str) -> Iterator[None]:
    """Beat the check's heartbeat from a thread of its own while the replay runs."""
    stop = threading.Event()
    interval = max(0.2, settings.SWITCHBOARD_LEASE_SECONDS / 3)

    def beat() -> None:
        try:
            while not stop.wait(interval):
                try:
                    ReplayCheck.objects.filter(
                        pk=check_id, status=ReplayCheck.Status.RUNNING).update(
                        heartbeat_at=timezone.now())
                except DB_ERRORS as exc:  # the database is away: the check may be taken over
                    log.warning("could not beat replay check %s: %s", check_id, exc)
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=beat, name=f"replay-heartbeat-{check_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _stale(now: Any, *, lost: bool = False) -> Q:
    """Checks no worker is doing: running without a heartbeat for a lease's length (or at all,
    when ``lost``: a standalone process starting finds the previous one's work lost), or queued
    without a message."""
    running = Q(status=ReplayCheck.Status.RUNNING)
    if not lost:
        running &= Q(beat__lt=now - timedelta(seconds=settings.SWITCHBOARD_LEASE_SECONDS))
    queued = Q(status=ReplayCheck.Status.QUEUED,
               created_at__lt=now - timedelta(seconds=2 * settings.SWITCHBOARD_REDELIVER_SECONDS))
    return running | queued


def recover(checks: QuerySet[ReplayCheck] | None = None, *, lost: bool = False,
            limit: int = 500) -> int:
    """Queue again the stale checks among ``checks`` (all by default) that have no message in
    flight (a queued one with a message is the outbox relay's); returns how many."""
    now = timezone.now()
    qs = (ReplayCheck.objects.all() if checks is None else checks).annotate(
        beat=Coalesce("heartbeat_at", "started_at")).filter(_stale(now, lost=lost))
    qs = qs.filter(~Exists(Outbox.objects.filter(topic=TOPIC, request_id=OuterRef("pk"))))
    count = 0
    with transaction.atomic():
        for pk, run_id, status in qs.values_list("pk", "run_id", "status")[:limit]:
            if ReplayCheck.objects.filter(pk=pk, status=status).update(
                    status=ReplayCheck.Status.QUEUED):
                outbox.emit(TOPIC, run_id, request_id=pk)
                count += 1
    if count:
        log.info("queued %d replay checks again", count)
    return count
