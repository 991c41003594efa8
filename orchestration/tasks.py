"""Celery tasks: thin, take ids, re-fetch, and are safe to deliver twice."""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import OperationalError

from orchestration import dispatch
from orchestration.engine import runner
from orchestration.executors import executors
from orchestration.models import Run
from orchestration.store import DjangoRunStore

log = logging.getLogger("switchboard.tasks")


@shared_task(name="orchestration.advance_run", acks_late=True, autoretry_for=(OperationalError,),
             retry_backoff=True, max_retries=5)
def advance_run(run_id: str) -> None:
    if not Run.objects.filter(pk=run_id).exists():
        return
    result = runner.advance(DjangoRunStore(), run_id)
    for key in result.released:
        dispatch.enqueue_execute(run_id, key)


@shared_task(name="orchestration.execute_task", acks_late=True)
def execute_task(run_id: str, key: str) -> None:
    if not Run.objects.filter(pk=run_id).exists():
        return
    if runner.execute(DjangoRunStore(), run_id, key, executors()):
        dispatch.enqueue_advance(run_id)


@shared_task(name="orchestration.recover_stale_tasks")
def recover_stale_tasks() -> int:
    from orchestration.services import tasks_recover_stale

    return tasks_recover_stale()


@shared_task(name="orchestration.resume_after_decision", acks_late=True)
def resume_after_decision(request_id: str) -> None:
    from approvals.models import ApprovalRequest
    from orchestration import services

    request = ApprovalRequest.objects.filter(pk=request_id).first()
    if request is not None:
        services.resume_after_decision(request)


@shared_task(name="orchestration.sweep")
def sweep() -> None:
    """Periodic: enforce approval deadlines and pick up work a lost worker left behind."""
    from approvals.services import requests_expire
    from orchestration.services import tasks_recover_stale

    requests_expire()
    tasks_recover_stale()
