"""A run of vendor-onboarding through the API, in whichever mode this pass runs."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import Event
from audit.verify import verify_chain
from tests.conftest import wait_for_run


@pytest.mark.django_db(transaction=True)
def test_it_runs_vendor_onboarding_to_the_end(runner: None, api: Any, vendor_input: dict) -> None:
    created = api.post("/api/v1/runs", {"process": "vendor-onboarding", "input": vendor_input})
    assert created.status_code == 201, created.content
    run_id = created.json()["id"]

    run = wait_for_run(run_id)
    assert run.status == "succeeded", run.error

    body = api.get(f"/api/v1/runs/{run_id}").json()
    assert body["status"] == "succeeded"
    assert body["result"] == {"vendor_id": body["result"]["vendor_id"], "status": "active",
                              "risk": "low"}
    assert body["result"]["vendor_id"].startswith("V-")
    assert body["usage"]["steps"] == 6
    assert body["usage"]["tool_calls"] == 6
    assert {t["status"] for t in body["tasks"]} == {"succeeded"}

    kinds = [e["kind"] for e in api.get(f"/api/v1/runs/{run_id}/events").json()["events"]]
    assert kinds[0] == "run.created"
    assert kinds.count("task.succeeded") == 6
    assert kinds[-1] == "run.state"
    assert verify_chain(run.pk).ok


@pytest.mark.django_db(transaction=True)
def test_it_never_has_more_than_three_tasks_active(runner: None, api: Any, demo: None) -> None:
    from orchestration.grants import grant_plan_tools
    from orchestration.models import Process
    from orchestration.services import process_publish

    process = Process.objects.create(slug="wide", name="Wide", pattern="deterministic")
    tasks = [{"key": f"check_{i}", "executor": {"type": "tool", "ref": "lookup_order"},
              "args": {"order_id": f"ORD-{i}"}} for i in range(8)]
    tasks.append({"key": "join", "executor": {"type": "tool", "ref": "lookup_order"},
                  "depends_on": [t["key"] for t in tasks], "args": {"order_id": "ORD-J"}})
    process_publish(process=process, plan={"tasks": tasks}, input_schema={"type": "object"})
    grant_plan_tools(process, by=None)
    run_id = api.post("/api/v1/runs", {"process": "wide", "input": {}}).json()["id"]
    run = wait_for_run(run_id)
    assert run.status == "succeeded", run.error

    # Reconstruct concurrency from the ledger: queued/started raise it, a finish lowers it.
    active = peak = 0
    for event in Event.objects.filter(chain=run.pk).order_by("seq"):
        if event.kind == "task.queued":
            active += 1
            peak = max(peak, active)
        elif event.kind in ("task.succeeded", "task.failed", "task.cancelled"):
            active -= 1
    assert peak == 3
    assert active == 0
