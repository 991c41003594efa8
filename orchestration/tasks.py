"""Celery tasks: thin, take ids, re-fetch, and are safe to deliver twice.

Each carries the id of the outbox message it was sent for (orchestration/outbox.py); the
handler deletes that row in the transaction that does the work. Database and broker errors are
retried with backoff; if even that fails, the outbox row is still there and the relay sends the
message again.
"""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import InterfaceError, OperationalError
from kombu.exceptions import OperationalError as BrokerError

import logcontext
from approvals.models import ApprovalRequest
from orchestration import dispatch, replay_jobs, services, work
from orchestration import sweep as sweeper

log = logging.getLogger("switchboard.tasks")
RETRY = {"autoretry_for": (OperationalError, InterfaceError, BrokerError),
         "retry_backoff": 1, "retry_backoff_max": 30, "retry_jitter": True, "max_retries": 12}


@shared_task(name="orchestration.advance_run", acks_late=True, **RETRY)
def advance_run(run_id: str, outbox_id: int | None = None) -> None:
    with logcontext.bound(run_id=run_id):
        work.advance(run_id, outbox_id)


@shared_task(name="orchestration.execute_task", acks_late=True, **RETRY)
def execute_task(run_id: str, key: str, outbox_id: int | None = None) -> None:
    with logcontext.bound(run_id=run_id, task_key=key):
        work.execute(run_id, key, outbox_id)


@shared_task(name="orchestration.resume_after_decision", acks_late=True, **RETRY)
def resume_after_decision(request_id: str, outbox_id: int | None = None) -> None:
    request = ApprovalRequest.objects.filter(pk=request_id).first()
    if request is not None:
        with logcontext.bound(run_id=request.run_id):
            services.resume_after_decision(request, message_id=outbox_id)


@shared_task(name="orchestration.replay_check", acks_late=True, **RETRY)
def replay_check(check_id: str, outbox_id: int | None = None) -> None:
    replay_jobs.perform(check_id, outbox_id)


@shared_task(name="orchestration.sweep", **RETRY)
def sweep() -> None:
    """The periodic sweep (orchestration/sweep.py). Workers run it themselves; this task lets
    a deployment that prefers Celery beat schedule it too."""
    sweeper.sweep_once()


def route_topics() -> None:
    """Have the outbox's messages handled by these tasks (called when the app is ready)."""
    dispatch.route("advance", advance_run, lambda run_id, key, request_id: (run_id,))
    dispatch.route("execute", execute_task, lambda run_id, key, request_id: (run_id, key))
    dispatch.route("resume", resume_after_decision,
                   lambda run_id, key, request_id: (request_id,))
    dispatch.route("replay", replay_check, lambda run_id, key, request_id: (request_id,))
