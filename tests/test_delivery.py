"""A task delivered twice executes once: the conditional claim decides, not the broker."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from audit.models import Event
from orchestration import dispatch, services
from orchestration.engine import runner
from orchestration.models import Process, Task
from orchestration.store import DjangoRunStore
from orchestration.tasks import execute_task
from tests.conftest import artifact_path, wait_for, wait_for_run


def _released_run(monkeypatch: pytest.MonkeyPatch, operator: Any, vendor_input: dict) -> str:
    """A run whose first task is queued but which nothing has picked up yet."""
    monkeypatch.setattr(dispatch, "send", lambda topic, **kw: None)
    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=vendor_input, user=operator)
    released = runner.advance(DjangoRunStore(), str(run.pk)).released
    assert released == ["validate"]
    return str(run.pk)


def _started(run_id: str, key: str) -> int:
    return sum(1 for data in Event.objects.filter(chain=run_id, kind="task.started")
               .values_list("data", flat=True) if data["task"] == key)


@pytest.mark.django_db(transaction=True)
def test_it_executes_a_task_delivered_twice_at_once_only_once(
    monkeypatch: pytest.MonkeyPatch, operator: Any, vendor_input: dict
) -> None:
    run_id = _released_run(monkeypatch, operator, vendor_input)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def deliver() -> None:
        from django.db import connection

        try:
            barrier.wait()
            execute_task.run(run_id, "validate")
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    task = Task.objects.get(run_id=run_id, key="validate")
    assert task.status == "succeeded"
    assert task.attempts == 1
    assert _started(run_id, "validate") == 1
    assert Event.objects.filter(chain=run_id, kind="tool.called",
                                data__task="validate").count() == 1


@pytest.mark.django_db(transaction=True)
def test_it_ignores_a_late_redelivery_of_a_finished_task(
    monkeypatch: pytest.MonkeyPatch, operator: Any, vendor_input: dict
) -> None:
    run_id = _released_run(monkeypatch, operator, vendor_input)
    execute_task.run(run_id, "validate")
    execute_task.run(run_id, "validate")
    assert Task.objects.get(run_id=run_id, key="validate").attempts == 1
    assert _started(run_id, "validate") == 1


@pytest.mark.distributed
@pytest.mark.django_db(transaction=True)
def test_it_executes_once_when_the_broker_delivers_twice(
    monkeypatch: pytest.MonkeyPatch, operator: Any, vendor_input: dict, celery_worker: Any
) -> None:
    run_id = _released_run(monkeypatch, operator, vendor_input)
    first = execute_task.delay(run_id, "validate")
    second = execute_task.delay(run_id, "validate")

    run = wait_for_run(run_id)
    assert run.status == "succeeded", run.error
    log = artifact_path("celery-worker.log")
    wait_for(lambda: all(f"{r.id}] succeeded" in log.read_text() for r in (first, second)),
             what="the worker to process both deliveries")
    assert _started(run_id, "validate") == 1
    assert Task.objects.get(run_id=run_id, key="validate").attempts == 1
