"""Replay's cost grows with the run's length, not with its square: each event is projected for
comparison a fixed number of times, however many steps and people's decisions the run holds."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

from approvals import services as approvals
from approvals.models import Policy
from orchestration import services
from orchestration.engine.plan import parse_plan
from orchestration.models import Process, Run
from orchestration.replay import Recorded, comparison, policies_as_of, replay
from orchestration.replay.driver import Replay
from tests.conftest import VENDOR_INPUT

EVERY = 10  # every tenth step calls a sanctioned country, which needs a person's approval


def long_plan(steps: int) -> dict[str, Any]:
    tasks = []
    for i in range(steps):
        country = "XX" if i % EVERY == EVERY - 1 else "DE"
        task = {"key": f"s{i:04d}", "executor": {"type": "tool", "ref": "check_sanctions"},
                "args": {"name": f"Vendor {i}", "country": country}}
        if i:
            task["depends_on"] = [f"s{i - 1:04d}"]
        tasks.append(task)
    return {"tasks": tasks}


def recorded_run(run: Run, steps: int) -> list[Recorded]:
    """A ledger of ``steps`` sanctions checks, one after another, every tenth approved by a
    person: recorded by driving the replay itself with results for every call and deciding
    each request as it comes up."""
    plan = long_plan(steps)
    run_id = str(run.pk)
    results = [Recorded(seq=i + 1, kind="tool.called", data={
        "task": t["key"], "idempotency_key": f"{run_id}:{t['key']}:0",
        "result": {"clear": True, "list": "consolidated-2026-11"}})
        for i, t in enumerate(plan["tasks"])]
    driver = Replay(run_id, results, parse_plan(plan), run.input, 3,
                    policies_as_of(timezone.now()), process="vendor-onboarding")
    while driver.run() == "waiting":
        request = next(r for r in driver.state.requests.values() if r.status == "pending")
        data = {"request": request.id, "status": "approved",
                "resolution": {"action": "proceed", "arguments": request.arguments}}
        driver.store.record(run_id, "approval.resolved", data)
        driver._apply(Recorded(seq=0, kind="approval.resolved", data=data))
    assert driver.store.runs[run_id].snapshot.status == "succeeded"
    return [Recorded(seq=e.seq, kind=e.kind, data=e.data) for e in driver.store.events(run_id)]


@pytest.mark.django_db
def test_replay_is_linear_in_the_runs_length(demo: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    policy = Policy.objects.create(slug="sanctioned-country", name="Sanctioned country")
    approvals.policy_publish(policy=policy, tool="check_sanctions", risk_class="",
                             conditions=[{"arg": "country", "op": "==", "value": "XX"}],
                             decider_group=Group.objects.get(name="reviewer"),
                             required_approvals=1, deadline_minutes=60, on_expiry="reject")
    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=dict(VENDOR_INPUT),
                              user=User.objects.get(username="operator"))

    projected = 0
    project = comparison.project

    def counted(kind: str, data: Any) -> Any:
        nonlocal projected
        projected += 1
        return project(kind, data)

    monkeypatch.setattr(comparison, "project", counted)
    cost: dict[int, tuple[int, int, float]] = {}
    for steps in (250, 500):
        events = recorded_run(run, steps)
        assert sum(e.kind == "approval.resolved" for e in events) == steps // EVERY
        projected = 0
        started = time.perf_counter()
        result = replay(run, events=events, plan=long_plan(steps))
        elapsed = time.perf_counter() - started
        assert result.ok, result.summary()
        assert result.compared > 4 * steps
        cost[steps] = (projected, len(events), elapsed)
        # Indexing the ledger, recording the replay's events and comparing the two: each
        # event is projected at most twice on each side.
        assert projected <= 4 * len(events)
    assert cost[500][0] <= 2.2 * cost[250][0]
    assert cost[500][2] < 60, f"replaying 500 steps took {cost[500][2]:.1f} s"
