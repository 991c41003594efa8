"""The console's Celery tasks: thin, take an id, safe to deliver twice (see
orchestration/tasks.py for the conventions)."""

from __future__ import annotations

from celery import shared_task

from console import notifications
from orchestration.tasks import RETRY


@shared_task(name="console.deliver_notification", acks_late=True, **RETRY)
def deliver_notification(delivery_id: str, outbox_id: int | None = None) -> None:
    notifications.deliver(delivery_id, outbox_id)
