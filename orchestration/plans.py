"""Parsed plans of process versions. Versions are immutable, so each one's plan is parsed once
and cached by the version's id."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from orchestration.engine.plan import Plan, parse_plan
from orchestration.models import ProcessVersion

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
