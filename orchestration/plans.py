"""Parsed plans of process versions. Versions are immutable, so each one's plan is parsed once
and cached by the version's id."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from orchestration.engine.plan import Plan, parse_plan
from orchestration.models import ProcessVersion, Run

_plans: dict[uuid.UUID, Plan] = {}
_plans_lock = threading.Lock()


def plan_for_id(version_id: Any) -> Plan:
    key = version_id if isinstance(version_id, uuid.UUID) else uuid.UUID(str(version_id))
    plan = _plans.get(key)
    if plan is None:
        plan = plan_for(ProcessVersion.objects.only("plan").get(pk=key))
    return plan


def plan_for(version: ProcessVersion) -> Plan:
    """Process versions are immutable, so their parsed plans can be cached by id."""
    plan = _plans.get(version.pk)
    if plan is None:
        plan = parse_plan(version.plan)
        with _plans_lock:
            _plans[version.pk] = plan
    return plan


# Plans of planned runs, by (run id, plan version): a version of a run's plan never changes.
_run_plans: dict[tuple[str, int], Plan] = {}


def plan_of_run(run_id: Any, version_id: Any, plan_version: int = 0,
                data: Any = None) -> Plan:
    """The plan a run follows: its own accepted plan when it has one (``plan_version`` > 0),
    else its process version's. ``data`` is the run's plan when the caller read it already."""
    if not plan_version:
        return plan_for_id(version_id)
    key = (str(run_id), int(plan_version))
    plan = _run_plans.get(key)
    if plan is None:
        if data is None:
            data = Run.objects.filter(pk=run_id).values_list("plan", flat=True).first()
        plan = parse_plan(data)
        with _plans_lock:
            _run_plans[key] = plan
    return plan


def plan_of(run: Any) -> Plan:
    """The plan a Run row follows (see ``plan_of_run``)."""
    return plan_of_run(run.pk, run.process_version_id, run.plan_version, run.plan)
